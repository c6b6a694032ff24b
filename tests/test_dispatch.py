"""ops/cpu/dispatch.py's table says what runs: for every CLI scheme, its prediction for this
machine equals what the probe (diffquant.cpu_paths) records when one layer runs, at one, a few
and many rows; for the schemes whose kernels depend on the build, on every build of the C
kernels this machine executes, and without them."""

import pytest

from diffquant import cpu_paths
from diffquant.ops.__main__ import main
from diffquant.ops.cpu import dispatch
from diffquant.ops.native import build
from diffquant.spec import available_backends, backend_schemes

SCHEMES = [f"{b}:{s}" for b in available_backends() for s in backend_schemes(b)]
# schemes whose kernels differ between builds (the C kernels, the 4-bit one-row loop, AMX)
BY_BUILD = ["torchao:int8wo", "torchao:int8dq", "torchao:int4wo", "quanto:int4", "quanto:int2",
            "gguf:q8_0", "gguf:q4_k", "modelopt:int8", "bitsandbytes:nf4"]


def _predicted(scheme):
    return {m: dispatch.predict(scheme, m) for m in dispatch.ROWS}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_table_predicts_what_runs(scheme):
    assert _predicted(scheme) == cpu_paths.probe(scheme)


@pytest.mark.parametrize("scheme", BY_BUILD)
def test_the_table_predicts_what_runs_on_every_build(scheme, native_target):
    assert _predicted(scheme) == cpu_paths.probe(scheme)


@pytest.mark.parametrize("scheme", BY_BUILD)
def test_the_table_predicts_what_runs_without_the_c_kernels(scheme, monkeypatch):
    monkeypatch.setitem(build._state, "lib", None)
    assert not dispatch.has("C kernels")
    assert _predicted(scheme) == cpu_paths.probe(scheme)


def test_every_cli_scheme_has_one_route():
    routed = [s for route in dispatch.ROUTES.values() for s in route.schemes]
    assert sorted(routed) == sorted(SCHEMES)


def test_python_m_diffquant_ops_prints_the_table_and_what_runs_here(capsys):
    main([])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == dispatch.machine() and out[1].startswith("capabilities: C kernels: ")
    assert "| gguf Q8_0 | GGUF blocks: 32 int8 and an f16 scale | gguf:q8_0 | C gemv |" in \
        "\n".join(out)
    row = next(line for line in out if line.startswith("| `gguf:q8_0` |"))
    assert row == "| `gguf:q8_0` | " + " | ".join(_predicted("gguf:q8_0").values()) + " |"
