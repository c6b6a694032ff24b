"""ops/ by role, checked: formats/ (reference math, pure torch) imports nothing from cpu/ or
native/, native/ nothing from cpu/, nothing in ops/ anything of diffquant's outside it but its
errors; and the C interface checks itself: a library whose kernel table differs from
native/registry.py's is refused when it loads, and a call with a missing, extra or ill-kinded
argument is refused by name."""

import ast
from pathlib import Path

import pytest
import torch

from diffquant.ops.native import build, registry

OPS = Path(__file__).parents[1] / "src" / "diffquant" / "ops"


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(the layers of ops/ that the module at ``path``, one layer down, imports: "cpu",
    "formats", "native"; the modules of diffquant outside ops/ it imports: "errors")."""
    layers, above = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 2:
                layers.add((node.module or "").split(".")[0])
            elif node.level > 2:
                above.add(node.module)
            continue
        else:
            continue
        for name in names:
            if name.startswith("diffquant.ops."):
                layers.add(name.split(".")[2])
            elif name.startswith("diffquant"):
                above.add(name.partition(".")[2])
    return layers, above


@pytest.mark.parametrize("layer,forbidden", [("formats", {"cpu", "native"}),
                                             ("native", {"cpu"})])
def test_each_layer_imports_only_the_layers_below_it(layer, forbidden):
    for path in sorted((OPS / layer).glob("*.py")):
        layers, _ = _imports(path)
        assert not layers & forbidden, f"{layer}/{path.name} imports {sorted(layers & forbidden)}"


def test_ops_imports_nothing_above_it_but_errors():
    for path in sorted(OPS.glob("*/*.py")):
        _, above = _imports(path)
        assert above <= {"errors"}, f"{path.relative_to(OPS)} imports {sorted(above)}"


class _Lib:
    """A loaded library's table, as ctypes gives it: names and argument lists as bytes."""

    def __init__(self, table):
        self.table = list(table.items())

    def dq_kernel_count(self):
        return len(self.table)

    def dq_kernel_name(self, i):
        return self.table[i][0].encode()

    def dq_kernel_args(self, i):
        return self.table[i][1].encode()


def test_the_library_table_is_the_declared_one():
    if not build.available():
        pytest.skip("no C compiler here")
    table = build.library().dq_kernels
    assert sorted(table) == sorted(registry.KERNELS)
    assert table["int8_rows"][1:3] == (("q", "k", "scale", "scale_step", "out", "ld"),
                                      (True, False, True, False, True, False))


def test_a_library_whose_table_differs_is_refused_by_name():
    table = dict(registry.KERNELS)
    table["decode"] = "qtype:i blocks:p out:p n_blocks:i ld_out:i out_bf16:i"  # two swapped
    del table["gemv"]
    table["gemm"] = "x:p"
    with pytest.raises(build.InterfaceError, match=r"decode: the library takes \(qtype:i blocks:p "
                                                   r"out:p n_blocks:i.*gemv: declared in "
                                                   r"registry.py, not in the library.*gemm: in "
                                                   r"the library, not declared"):
        registry.check(_Lib(table))


def test_a_call_is_checked_against_the_declared_arguments():
    if not build.available():
        pytest.skip("no C compiler here")
    q, out = torch.zeros(2, 64, dtype=torch.int8), torch.empty(2, 64, dtype=torch.bfloat16)
    scale = torch.ones(2, dtype=torch.bfloat16)
    args = dict(q=q, k=64, scale=scale, scale_step=1, out=out, ld=64)
    assert registry.run("int8_rows", 2, **args) and not out.any()
    with pytest.raises(TypeError, match=r"int8_rows takes q, k, scale, scale_step, out, ld; got "):
        registry.run("int8_rows", 2, **args, extra=1)
    with pytest.raises(TypeError, match=r"int8_rows takes q, k, scale, scale_step, out, ld; ld "
                                        r"is missing"):
        registry.run("int8_rows", 2, **{k: v for k, v in args.items() if k != "ld"}, lda=64)
    with pytest.raises(TypeError, match=r"int8_rows: scale must be a tensor or None"):
        registry.run("int8_rows", 2, **{**args, "scale": scale.data_ptr()})
    with pytest.raises(TypeError, match=r"int8_rows: k must be an int, got Tensor"):
        registry.run("int8_rows", 2, **{**args, "k": torch.tensor(64)})
    with pytest.raises(ValueError, match=r"no C kernel 'int8_row'"):
        registry.run("int8_row", 2, **args)


def test_the_trace_names_the_kernels_run():
    if not build.available():
        pytest.skip("no C compiler here")
    out = torch.empty(1, 64, dtype=torch.bfloat16)
    with registry.trace() as seen:
        registry.run("int8_rows", 1, q=torch.zeros(1, 64, dtype=torch.int8), k=64,
                     scale=torch.ones(1, dtype=torch.bfloat16), scale_step=0, out=out, ld=64)
    assert seen == ["int8_rows"]
