"""ops/native/csrc/int8_amx.c: int8 dynamic quantization's product on AMX tiles gives
formats/torchao.int8_dynamic_linear's bits (torchao's reference) for every shape it takes, is
used by the int8dq layer wherever the CPU has AMX, and leaves other shapes to torch._int_mm."""

from pathlib import Path

import pytest
import torch

from diffquant.ops.cpu import int8_dynamic as fi
from diffquant.ops.formats import torchao as iq
from diffquant.ops.native import build as native
from diffquant.ops.native import int8_amx as native_amx


def _cpu_has_amx() -> bool:
    try:
        return "amx_int8" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


pytestmark = pytest.mark.usefixtures("native_target")  # every build: AMX only in some


@pytest.fixture
def amx(native_target):
    """Skips where the build in use has no AMX product (test_amx_is_available_exactly_where_the_
    cpu_and_the_build_have_it fails where it should have one)."""
    if not native_amx.amx_available():
        pytest.skip(f"{native_target}: no AMX int8 in this build on this CPU")


def _case(m, k, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)).to(torch.bfloat16)
    x = (torch.randn(m, k, generator=g) * 3).to(torch.bfloat16)
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    q, s = iq.int8_quantize_per_channel(w)
    return x, q, s, bias


def _build_targets_amx(target: str) -> bool:
    """Whether the compiler emits AMX for ``target`` (gcc 11 and later do for this CPU's
    native build where it has AMX, and for sapphirerapids)."""
    cc = native.shutil.which("cc") or native.shutil.which("gcc")
    if not cc or target not in native.TARGETS:  # the emulated build has no AMX
        return False
    out = native.subprocess.run([cc, native.TARGETS[target], "-dM", "-E", "-"], input="",
                                capture_output=True, text=True).stdout
    return "__AMX_INT8__" in out and "__AMX_TILE__" in out


def test_amx_is_available_exactly_where_the_cpu_and_the_build_have_it(native_target):
    # on Linux 5.16 and later, which grants the tile registers on request
    assert native_amx.amx_available() == (_cpu_has_amx() and _build_targets_amx(native_target))


@pytest.mark.usefixtures("amx")
@pytest.mark.parametrize("m,k,n", [
    (1, 64, 16),        # one token, one tile of channels
    (5, 192, 48),       # a channel block of 16 after a full 32
    (33, 128, 272),     # a second token pair, past one channel block (256)
    (300, 256, 96),     # past one token block (256)
    (40, 4160, 32),     # K split in steps (2048, 2048, 64): sums parked and reloaded
])
def test_amx_product_is_the_reference_bit_for_bit(m, k, n):
    x, q, s, bias = _case(m, k, n)
    xp = torch.empty((m + 31) // 32 * 2, k // 4, 16, 4, dtype=torch.int8)
    sx = native_amx.quantize_rows_vnni(x, xp)
    for b in (None, bias):
        assert torch.equal(native_amx.amx_int8_linear(q, xp, m, sx, s, b),
                           iq.int8_dynamic_linear(x, q, s, b))


@pytest.mark.usefixtures("amx")
def test_vnni_layout_holds_the_per_token_codes_and_scales():
    m, k = 37, 128
    x = _case(m, k, 16)[0]
    xp = torch.full((4, k // 4, 16, 4), 99, dtype=torch.int8)
    sx = native_amx.quantize_rows_vnni(x, xp)
    q0, s0 = fi.quantize_rows_int8(x)
    assert torch.equal(sx, s0)
    tokens = xp.permute(0, 2, 1, 3).reshape(64, k)                      # [g, k/4, l, 4] -> [t, k]
    assert torch.equal(tokens[:m], q0)
    assert (tokens[m:] == 99).all()                                     # padding left alone
    x[3, 5] = float("nan")
    assert native_amx.quantize_rows_vnni(x, xp) is None


@pytest.mark.usefixtures("amx")
@pytest.mark.parametrize("r0,r1", [(0, 37), (5, 21), (16, 32), (17, 18)])
def test_vnni_quantizes_a_thread_range_without_touching_other_tokens(r0, r1):
    m, k = 37, 64                     # one thread's tokens [r0, r1), groups of 16 split or whole
    x = _case(m, k, 16)[0]
    xp = torch.full((3, k // 4, 16, 4), 99, dtype=torch.int8)
    scale = torch.zeros(m)
    c = native.ctypes.c_int64
    assert native.library().dq_quantize_rows_vnni_bf16(
        c(x.data_ptr()), c(k), c(r0), c(r1), c(k), c(xp.data_ptr()), c(scale.data_ptr())) == 0
    tokens = xp.permute(0, 2, 1, 3).reshape(48, k)
    q0, s0 = fi.quantize_rows_int8(x)
    assert torch.equal(tokens[r0:r1], q0[r0:r1]) and torch.equal(scale[r0:r1], s0[r0:r1, 0])
    assert (tokens[:r0] == 99).all() and (tokens[r1:] == 99).all()
    assert not scale[:r0].any() and not scale[r1:].any()


@pytest.mark.usefixtures("amx")
def test_amx_refuses_what_it_cannot_take():
    x, q, s, _ = _case(4, 64, 16)
    with pytest.raises(ValueError, match=r"xp must be int8 \[>= 1, 16, 16, 4\]"):
        native_amx.quantize_rows_vnni(x, torch.empty(1, 16, 8, 4, dtype=torch.int8))
    xp = torch.empty(1, 16, 16, 4, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"xp holds 16 tokens, needs at least 32"):
        native_amx.amx_int8_linear(q, xp, 4, torch.ones(4), s, None)
    assert not native_amx.amx_int8_supported(x[:, :48], q[:, :48].contiguous())  # K % 64
    assert not native_amx.amx_int8_supported(x, q[:8])                          # N % 16


@pytest.mark.usefixtures("amx")
@pytest.mark.parametrize("k,takes_amx", [(128, True), (96, False)])
def test_the_int8dq_layer_takes_amx_where_the_shape_allows(k, takes_amx, monkeypatch):
    x, q, s, bias = _case(50, k, 48)
    calls = []
    real = native_amx.amx_int8_linear
    monkeypatch.setattr(native_amx, "amx_int8_linear", lambda *a: calls.append(1) or real(*a))
    y = fi.linear_int8_dynamic(x.reshape(5, 10, k), fi.prepare_int8_dynamic(q, s), bias)
    assert calls == ([1] if takes_amx else [])
    assert torch.equal(y.reshape(50, 48), iq.int8_dynamic_linear(x, q, s, bias))


@pytest.mark.usefixtures("amx")
def test_tokens_with_nan_fall_back_to_the_torch_path():
    x, q, s, bias = _case(20, 128, 32)
    x[2, 7] = float("inf")
    y = fi.linear_int8_dynamic(x, fi.prepare_int8_dynamic(q, s), bias)
    torch.testing.assert_close(y, iq.int8_dynamic_linear(x, q, s, bias), rtol=0, atol=0,
                               equal_nan=True)
