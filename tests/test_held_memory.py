"""What a quantized layer holds after forwards: for every scheme the CLI lists, one layer runs
one, a few and many rows; then every byte reachable from it (parameters, buffers, any attribute,
closures of its prepared form, each storage once) is what ``get_memory_footprint`` reports, and
at most 1.05x its stored pieces (issue 25: prepared copies made a GGUF Q4_0 model hold 2.14x)."""

import functools
import types

import pytest
import torch
from torch import nn

from diffquant import cpu_paths
from diffquant.modeling import ModelMixin
from diffquant.spec import available_backends, backend_schemes

SCHEMES = [f"{b}:{s}" for b in available_backends() for s in backend_schemes(b)]
_PLAIN = (str, bytes, int, float, complex, bool, type(None), type, types.ModuleType, torch.dtype,
          torch.device, types.BuiltinFunctionType)


def held_bytes(root) -> int:
    """Every storage reachable from ``root``, modules and functions' closures included, once."""
    seen, storages, total, stack = set(), set(), 0, [root]
    while stack:
        o = stack.pop()
        if isinstance(o, _PLAIN) or id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            if type(o) not in (torch.Tensor, nn.Parameter) and hasattr(o, "__tensor_flatten__"):
                stack.extend(getattr(o, n) for n in o.__tensor_flatten__()[0])
            elif (key := (o.untyped_storage().data_ptr(), o.device)) not in storages:
                storages.add(key)
                total += o.untyped_storage().nbytes()
            stack.extend(vars(o).values())
        elif isinstance(o, dict):
            stack.extend([*o.keys(), *o.values()])
        elif isinstance(o, (list, tuple, set, frozenset)):
            stack.extend(o)
        elif isinstance(o, types.FunctionType):
            for cell in o.__closure__ or ():
                try:
                    stack.append(cell.cell_contents)
                except ValueError:
                    pass
            stack.extend(o.__defaults__ or ())
        elif isinstance(o, (types.MethodType, functools.partial)):
            stack.extend(vars(o).values() if isinstance(o, functools.partial) else [o.__self__])
            if isinstance(o, functools.partial):
                stack.extend([o.func, o.args, o.keywords])
        else:
            stack.extend(getattr(o, "__dict__", {}).values())
    return total


def stored_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_after_forwards_a_layer_holds_its_footprint_and_no_copies(scheme):
    model = cpu_paths._layer(scheme, n=64, k=512)
    stored = stored_bytes(model)
    with torch.no_grad():
        for rows in (1, 3, 40, 1):
            model(torch.randn(rows, 512).to(torch.bfloat16))
    footprint = ModelMixin.get_memory_footprint(model)
    assert held_bytes(model) == footprint
    assert footprint <= 1.05 * stored, f"{scheme}: holds {footprint / stored:.3f}x its pieces"


def test_the_footprint_counts_what_a_layer_keeps_beside_its_pieces():
    """torchao int8's one-row product keeps its scale cast to bf16: counted."""
    model = cpu_paths._layer("torchao:int8wo", n=64, k=512)
    before = ModelMixin.get_memory_footprint(model)
    assert before == stored_bytes(model)
    with torch.no_grad():
        model(torch.randn(1, 512).to(torch.bfloat16))
    assert ModelMixin.get_memory_footprint(model) == held_bytes(model) == before + 64 * 2
