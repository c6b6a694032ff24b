"""ops/native/bnb4: bitsandbytes' 4-bit one-row product and decode in C give torch's and
bitsandbytes' numbers (within bf16 rounding for the one-row products), in every build this
machine can execute (each test runs once per target: tests/native_targets.py)."""

import pytest
import torch

from diffquant.ops.native import bnb4 as native_bnb4
from diffquant.ops.native import build as native
from diffquant.quantizers.bitsandbytes import BnB4BitLinear

pytestmark = pytest.mark.usefixtures("native_target")


def assert_same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


# -- bitsandbytes 4-bit, one row ---------------------------------------------------------------
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", False), ("nf4", True), ("fp4", True)])
def test_bnb_4bit_one_row_runs_in_c_within_bf16_rounding(quant_type, double_quant, monkeypatch):
    n, k = 48, 256
    with torch.device("meta"):
        layer = BnB4BitLinear(k, n, True, quant_type=quant_type, double_quant=double_quant)
    w = (torch.randn(n, k) * 0.05).to(torch.bfloat16)
    layer.load_piece("weight", w, pre_quantized=False, dtype=torch.bfloat16, device=None)
    layer.bias = torch.nn.Parameter(torch.randn(n).to(torch.bfloat16), requires_grad=False)
    x = torch.randn(1, k).to(torch.bfloat16)
    calls = []
    real = native_bnb4.lut4_gemv
    monkeypatch.setattr(native_bnb4, "lut4_gemv", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with torch.no_grad():
        y = layer(x)
        wq = layer.dequantized_weight().float()
        ref = x.float() @ wq.t() + layer.bias.float()               # dequantize, then matmul
        many = layer(x.expand(3, k).contiguous())                   # bitsandbytes' own path
    assert calls == [1] and y.shape == (1, n) and y.dtype == torch.bfloat16
    bound = x.float().abs() @ wq.abs().t() * 2.0**-7 + layer.bias.float().abs() * 2.0**-8 + 1e-6
    assert ((y.float() - ref).abs() <= bound).all()
    assert ((many[0].float() - ref[0]).abs() <= bound[0]).all()
    tables = (layer._lut4_tables()[0], layer._absmax(layer.quant_state()))
    portable = native_bnb4.lut4_gemv(layer.weight, *tables, 64, (n, k), x, portable=True)
    assert torch.equal(portable, real(layer.weight, *tables, 64, (n, k), x))


@pytest.mark.parametrize("k", [256, 16512])  # past the 4096 values a thread widens on its stack
def test_bnb_4bit_one_row_widens_a_bf16_row_in_c_as_torch_would(k):
    g = torch.Generator().manual_seed(k)
    n = 40
    packed = torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8, generator=g)
    lut = torch.linspace(-1, 1, 16)
    absmax = torch.rand(n * k // 64, generator=g)
    x = torch.randn(1, k, generator=g).to(torch.bfloat16)
    y = native_bnb4.lut4_gemv(packed, lut, absmax, 64, (n, k), x)
    as_float = native_bnb4.lut4_gemv(packed, lut, absmax, 64, (n, k), x.float())
    assert y.dtype == torch.bfloat16 and as_float.dtype == torch.float32
    assert torch.equal(y, as_float.to(torch.bfloat16))


def lut4_weight(n, k, blocksize):
    """A random bitsandbytes-layout 4-bit weight: (packed uint8 [N*K/2], 16 code values, absmax
    per block (> 0.5), the codes of the flat weight in element order)."""
    g = torch.Generator().manual_seed(blocksize + k)
    packed = torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8, generator=g)
    lut = torch.randn(16, generator=g)
    absmax = torch.rand(-(-n * k // blocksize), generator=g) + 0.5
    return packed, lut, absmax, torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(-1).long()


# blocks of 64 (bitsandbytes' default), and of 128 / 256 over rows of 192 values: blocks that
# start in one row and end in the next (the vector loops track the block, not divide per step)
@pytest.mark.parametrize("blocksize,k", [(64, 256), (128, 192), (256, 192), (64, 96)])
def test_bnb_4bit_one_row_vector_and_portable_loops_agree_and_are_close(blocksize, k):
    n = 70
    packed, lut, absmax, codes = lut4_weight(n, k, blocksize)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(k)).to(torch.bfloat16)
    y = native_bnb4.lut4_gemv(packed, lut, absmax, blocksize, (n, k), x)
    assert torch.equal(native_bnb4.lut4_gemv(packed, lut, absmax, blocksize, (n, k), x, portable=True), y)
    w = (lut[codes].double() * absmax.double().repeat_interleave(blocksize)[:n * k]).view(n, k)
    exact = x.double() @ w.t()
    assert ((y.double() - exact).abs() <= x.double().abs() @ w.abs().t() * 2.0**-8 + 1e-30).all()


# blocks of 64 over rows of 128 (the vector loops), of 32 (the scalar loop), of 128 over rows
# of 192 (blocks across rows), of 3 (a pair of values across two blocks); absmax values that
# overflow, are infinite, NaN, zero, subnormal
@pytest.mark.parametrize("blocksize,k", [(64, 128), (32, 128), (128, 192), (3, 12)])
def test_bnb_4bit_decode_is_torchs_product_rounded_to_bf16(blocksize, k):
    n = 70
    packed, lut, absmax, codes = lut4_weight(n, k, blocksize)
    absmax[:6] = torch.tensor([3e38, float("inf"), float("nan"), 0.0, 1e-40, -2.0])
    out = native_bnb4.lut4_decode_into(packed, lut, absmax, blocksize,
                                  torch.empty(n, k, dtype=torch.bfloat16))
    ref = (lut[codes] * absmax.repeat_interleave(blocksize)).view(n, k).to(torch.bfloat16)
    assert_same(out, ref)  # NaN where torch's is (its own bits for NaN vary by code path)


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", False), ("fp4", True)])
def test_bnb_4bit_many_rows_give_bitsandbytes_bits_from_a_reused_buffer(quant_type, double_quant,
                                                                         monkeypatch):
    n, k = 48, 256
    with torch.device("meta"):
        layer = BnB4BitLinear(k, n, True, quant_type=quant_type, double_quant=double_quant)
    layer.load_piece("weight", (torch.randn(n, k) * 0.05).to(torch.bfloat16), pre_quantized=False,
                     dtype=torch.bfloat16, device=None)
    layer.bias = torch.nn.Parameter(torch.randn(n).to(torch.bfloat16), requires_grad=False)
    x = torch.randn(2, 5, k).to(torch.bfloat16)
    with torch.no_grad():
        compiled = layer(x)
        monkeypatch.setitem(native._state, "lib", None)             # bitsandbytes' matmul_4bit
        assert torch.equal(layer(x), compiled)
