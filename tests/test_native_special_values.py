"""Every C kernel keeps its reference's bits for the values where CPUs' conversions and vector
loops part ways: subnormal scales and products (AVX512_BF16's conversion flushes them to
zero), signed zeros, infinities and NaN. Each test runs on every build this machine can
execute (tests/native_targets.py): the portable, AVX2, AVX-512 (or its emulation) and native
ones. The one-row products sum in a fixed lane order, so their vector and scalar loops must
agree bit for bit too."""

import pytest
import torch

from diffquant.ops.formats import gguf as gd
from diffquant.ops.formats import torchao as iq
from diffquant.ops.native import bnb4 as native_bnb4
from diffquant.ops.native import build as native
from diffquant.ops.native import gguf as native_gguf
from diffquant.ops.native import int4 as native_int4
from diffquant.ops.native import int8_dynamic as native_int8
from diffquant.ops.native import int8_weight as native_int8w
from tests.test_fast_linear import gguf_blocks
from tests.test_native import SPECIAL_HALVES, assert_same, lut4_weight, with_scales

pytestmark = pytest.mark.usefixtures("native_target")

BF16 = torch.bfloat16
# scales worth a look: subnormal in float32 and bf16 (1e-40), subnormal in bf16 only (3e-39),
# tiny normal (1e-38: its products with codes below 1 are subnormal), both zeros, both
# infinities, NaN, huge (its products overflow), ordinary
SPECIAL = torch.tensor([1e-40, 3e-39, 1e-38, 0.0, -0.0, float("inf"), float("-inf"),
                        float("nan"), 3e38, -2.5, 0.0123])


def cycled(n, dtype=torch.float32, shift=0):
    """n values cycling through SPECIAL (from ``shift``), in ``dtype``."""
    return SPECIAL[(torch.arange(n) + shift) % len(SPECIAL)].to(dtype)


# -- decodes into a bf16 buffer ---------------------------------------------------------------
@pytest.mark.parametrize("k", [48, 50])  # whole vectors of 16; a scalar tail
def test_int8_rows_keep_special_scales(k):
    q = torch.randint(-128, 128, (44, k), dtype=torch.int8, generator=torch.Generator().manual_seed(k))
    q[:, :3] = torch.tensor([0, 1, -1], dtype=torch.int8)          # exact zeros, subnormal +-s
    scale = cycled(44, BF16)
    out = native_int8w.int8_rows_into(q, scale, torch.empty(44, k, dtype=BF16))
    assert_same(out, q.to(BF16) * scale.view(-1, 1))                 # quanto's / modelopt's op
    for one in SPECIAL.to(BF16):                                     # one scale for the tensor
        assert_same(native_int8w.int8_rows_into(q, one.reshape(1), torch.empty(44, k, dtype=BF16)),
                    q.to(BF16) * one)


@pytest.mark.parametrize("group", [32, 64, 16])  # the vector loop (group % 32 == 0); the scalar
def test_int4_tinygemm_decode_keeps_special_scales_and_zeros(group):
    n, k = 44, 128
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(group))
    scale = cycled(n * (k // group), BF16).view(n, -1)
    zero = cycled(n * (k // group), BF16, shift=3).view(n, -1)
    out = native_int4.int4_tinygemm_into(packed, scale, zero, torch.empty(n, k, dtype=BF16))
    u = torch.stack([packed & 0x0F, packed >> 4], dim=-1).view(n, k).to(torch.int16)
    s, z = scale.repeat_interleave(group, 1), zero.repeat_interleave(group, 1)
    assert_same(out, (u - 8).to(BF16) * s + z)                       # two bf16 ops, each rounded


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("g", [32, 40])  # whole vectors of 16; a scalar tail
def test_quanto_decode_keeps_special_scales_and_shifts(bits, g):
    per_byte = 8 // bits
    p = 11                                                           # byte rows
    r = p * per_byte                                                 # group rows
    packed = torch.randint(0, 256, (p, g), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(bits * g))
    scale, shift = cycled(r, BF16).view(r, 1), cycled(r, BF16, shift=5).view(r, 1)
    out = native_int4.quanto_bits_into(packed, bits, scale, shift, torch.empty(r, g, dtype=BF16))
    i = torch.arange(r)
    codes = (packed[i % p].int() >> ((i // p) * bits).view(r, 1)) & ((1 << bits) - 1)
    assert_same(out, codes.to(BF16) * scale - shift)                 # quanto's op order


@pytest.mark.parametrize("blocksize,k", [(64, 128), (32, 128), (3, 12)])  # vector, scalar loops
def test_bnb_4bit_decode_keeps_special_absmax(blocksize, k):
    n = 44
    packed, lut, absmax, codes = lut4_weight(n, k, blocksize)
    lut[:2] = torch.tensor([0.25, -0.0])                             # products below absmax, -0
    absmax = cycled(absmax.numel())
    out = native_bnb4.lut4_decode_into(packed, lut, absmax, blocksize,
                                  torch.empty(n, k, dtype=BF16))
    assert_same(out, (lut[codes] * absmax.repeat_interleave(blocksize)[:n * k]).view(n, k).to(BF16))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_gguf_decode_keeps_special_half_scales(qtype, dtype):
    """Half-float scales: subnormal, both zeros, both infinities, NaN (a half's smallest value
    times a code is far above float32's subnormals, so products cannot be subnormal here)."""
    halves = torch.cat([SPECIAL_HALVES, torch.tensor([-0.0, float("-inf"), 6e-8])])
    k = 256 if qtype in ("Q4_K", "Q6_K") else 64
    blocks = with_scales(gguf_blocks(20, k, qtype), qtype, halves)
    out = native_gguf.decode_into(blocks, gd.ggml_type(qtype), torch.empty(20, k, dtype=dtype))
    assert_same(out, gd.dequantize(blocks, qtype, dtype))


# -- the output ends of int8's products -------------------------------------------------------
@pytest.mark.parametrize("with_bias", [False, True])
def test_scale_rows_keeps_special_scales_and_products(with_bias):
    y = (torch.randn(44, 48, generator=torch.Generator().manual_seed(1)) * 3).to(BF16)
    y[:, :3] = torch.tensor([1e-38, -0.0, 0.5]).to(BF16)            # subnormal products
    scale = cycled(48, BF16)
    bias = cycled(48, BF16, shift=4) if with_bias else None
    ref = y.clone().mul_(scale)
    ref = ref if bias is None else ref.add_(bias)
    assert_same(native_int8w.scale_rows_(y, scale, bias), ref)


@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_output_keeps_special_channel_scales_and_biases(with_bias):
    g = torch.Generator().manual_seed(7)
    acc = torch.randint(-2**20, 2**20, (44, 33), dtype=torch.int32, generator=g)
    acc[:, :3] = torch.tensor([0, 1, -1], dtype=torch.int32)
    sx = torch.rand(44, 1, generator=g) * 1e-3
    sx[:2] = torch.tensor([[1e-38], [1e-30]])                        # subnormal products
    sw = cycled(33)
    bias = cycled(33, BF16, shift=2) if with_bias else None
    y = (acc.to(torch.float32) * sx).to(BF16) * sw                   # int8_dynamic_linear's ops
    ref = (y if bias is None else y + bias).to(BF16)
    assert_same(native_int8.int8_output_bf16(acc, sx, sw, bias), ref)


@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_dynamic_row_keeps_special_channel_scales_and_biases(with_bias):
    n, k = 33, 64
    q, _ = iq.int8_quantize_per_channel(torch.randn(n, k, generator=torch.Generator().manual_seed(2)))
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(3)).to(BF16)
    x[0, :2] = torch.tensor([1e-40, -0.0])                           # a subnormal activation
    sw = cycled(n)
    bias = cycled(n, BF16, shift=6) if with_bias else None
    y = native_int8.int8_dynamic_row(x, q, sw, bias)
    assert_same(y, iq.int8_dynamic_linear(x, q, sw.view(n, 1), bias))


# -- one-row products: the vector and scalar loops agree on every value --------------------------
def _one_row_products():
    """name -> (x [1, K] bf16 with special values, f(x, portable))"""
    g = torch.Generator().manual_seed(9)
    q8, q6 = gguf_blocks(44, 256, "Q8_0"), gguf_blocks(44, 512, "Q6_K")
    q8[:12] = with_scales(q8[:12], "Q8_0", SPECIAL_HALVES)          # special rows, finite rows
    q6[:12] = with_scales(q6[:12], "Q6_K", SPECIAL_HALVES)
    q = torch.randint(-128, 128, (44, 256), dtype=torch.int8, generator=g)
    nf4, lut, _, _ = lut4_weight(44, 256, 64)
    absmax = cycled(44 * 256 // 64)
    codes = torch.randint(0, 16, (44, 256), dtype=torch.uint8, generator=g)
    packed, sz = native_int4.pack_rows(codes, cycled(44 * 4).view(44, 4),
                                       cycled(44 * 4, shift=3).view(44, 4))
    return {
        "Q8_0": (256, lambda x, p: native_gguf.gemv(q8, gd.GGMLType.Q8_0, x, p)),
        "Q6_K": (512, lambda x, p: native_gguf.gemv(q6, gd.GGMLType.Q6_K, x, p)),
        "int8": (256, lambda x, p: native_int8w.int8_gemv(q, cycled(44, BF16), x, p,
                                                    post=cycled(44, BF16, shift=1),
                                                    bias=cycled(44, BF16, shift=2))),
        "nf4": (256, lambda x, p: native_bnb4.lut4_gemv(nf4, lut, absmax, 64, (44, 256), x, p)),
        "int4": (256, lambda x, p: native_int4.gemv(packed, sz, 64, x, p)),
    }


@pytest.mark.parametrize("case", ["Q8_0", "Q6_K", "int8", "nf4", "int4"])
def test_one_row_loops_agree_on_special_weights_and_activations(case):
    k, f = _one_row_products()[case]
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(4)).to(BF16) * 1e-20
    x[0, :4] = torch.tensor([1e-40, -0.0, 0.0, 3e-39])               # subnormal activations
    vector, portable = f(x, False), f(x, True)
    assert vector is not None and portable is not None
    assert_same(vector, portable)
    assert vector.isnan().any() and vector.isfinite().any()          # the specials reached it
