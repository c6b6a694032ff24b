"""ops/native/: every C kernel gives its reference's numbers (bit for bit, or within bf16
rounding for the one-row products) and splits rows across threads correctly, in every build
this machine can execute (each test runs once per target: tests/native_targets.py).
tests/test_native_build.py tests the build itself."""

import pytest
import torch

from diffquant.ops.cpu import gguf as fg
from diffquant.ops.cpu import int8_dynamic as fi
from diffquant.ops.cpu import linear as fl
from diffquant.ops.cpu import quantize as cq
from diffquant.ops.formats import gguf as gd
from diffquant.ops.formats import torchao as iq
from diffquant.ops.native import bnb4 as native_bnb4
from diffquant.ops.native import build as native
from diffquant.ops.native import gguf as native_gguf
from diffquant.ops.native import int8_dynamic as native_int8
from diffquant.ops.native import int8_weight as native_int8w
from tests.test_fast_linear import gguf_blocks
from tests.test_fast_paths import LAYER_CASES
from tests.test_native_bnb4 import lut4_weight

TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
# half-float scales worth a look: normal, negative, subnormal, zero, largest, inf, NaN
SPECIAL_HALVES = torch.tensor([0.0123, -2.5, 3e-7, 0.0, 65504.0, float("inf"), float("nan")])


pytestmark = pytest.mark.usefixtures("native_target")


def assert_same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def with_scales(blocks, qtype, halves):
    """blocks with every half-float scale field (d, and m/dmin where there is one) cycled
    through ``halves``."""
    block, size = gd.BLOCK_LAYOUT[gd.ggml_type(qtype)]
    offsets = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q4_K": (0, 2), "Q6_K": (208,)}[qtype]
    b = blocks.clone().view(blocks.shape[0], -1, size)
    values = halves.half().view(torch.uint8).view(-1, 2)
    idx = torch.arange(b.shape[0] * b.shape[1]).view(b.shape[:2]) % len(halves)
    for j, off in enumerate(offsets):
        b[..., off:off + 2] = values[(idx + j) % len(halves)]
    return b.view(blocks.shape)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_is_bit_identical_to_the_reference(qtype, dtype):
    k = 512 if qtype in ("Q4_K", "Q6_K") else 96
    blocks = gguf_blocks(200, k, qtype)  # 200 rows: split over threads at unequal bounds
    out = torch.full((200, k), float("nan"), dtype=dtype)
    assert native_gguf.decode_into(blocks, gd.ggml_type(qtype), out) is out
    assert torch.equal(out, gd.dequantize(blocks, qtype, dtype))


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_of_special_scales_matches_the_reference(qtype, dtype):
    k = 256 if qtype in ("Q4_K", "Q6_K") else 64
    blocks = with_scales(gguf_blocks(14, k, qtype), qtype, SPECIAL_HALVES)
    out = torch.empty(14, k, dtype=dtype)
    assert_same(native_gguf.decode_into(blocks, gd.ggml_type(qtype), out),
                gd.dequantize(blocks, qtype, dtype))


def test_decode_writes_rows_of_a_wider_buffer_and_nothing_else():
    blocks = gguf_blocks(130, 64, "Q8_0")
    wide = torch.zeros(130, 80, dtype=torch.bfloat16)
    native_gguf.decode_into(blocks, gd.GGMLType.Q8_0, wide[:, :64])
    assert torch.equal(wide[:, :64], gd.dequantize(blocks, "Q8_0", torch.bfloat16))
    assert not wide[:, 64:].any()


def test_decode_refuses_what_it_cannot_write():
    blocks = gguf_blocks(4, 64, "Q8_0")
    with pytest.raises(ValueError, match="float32 or bf16"):
        native_gguf.decode_into(blocks, gd.GGMLType.Q8_0, torch.empty(4, 64, dtype=torch.float16))
    with pytest.raises(ValueError, match="contiguous uint8 blocks"):
        native_gguf.decode_into(blocks[:, ::2], gd.GGMLType.Q8_0, torch.empty(4, 32))


@pytest.mark.parametrize("qtype", TYPES)
def test_fast_gguf_gives_the_same_bits_with_and_without_the_kernels(qtype, monkeypatch):
    k = 512 if qtype in ("Q4_K", "Q6_K") else 96
    blocks = gguf_blocks(70, k, qtype)
    compiled = fg.dequantize_into(blocks, qtype, torch.empty(70, k, dtype=torch.bfloat16))
    monkeypatch.setitem(native._state, "lib", None)
    assert not fg._native_decodes(blocks, gd.ggml_type(qtype), compiled)
    assert torch.equal(fg.dequantize_into(blocks, qtype, torch.empty_like(compiled)), compiled)


# -- one-row products of the blocks read in place ------------------------------------------------
# Q8_0's loop takes four blocks a step: 17, 18, 19 blocks leave each tail length; Q4_0 / Q4_1 two
@pytest.mark.parametrize("qtype,blocks", [("Q8_0", 17), ("Q8_0", 18), ("Q8_0", 19), ("Q6_K", 3),
                                          ("Q4_0", 17), ("Q4_0", 18), ("Q4_1", 19), ("Q4_K", 3)])
def test_gemv_is_within_bf16_rounding_and_the_builds_agree(qtype, blocks):
    rows = 1
    k = blocks * (256 if qtype.endswith("_K") else 32)
    blocks = gguf_blocks(130, k, qtype)
    x = torch.randn(rows, k).to(torch.bfloat16)
    y = native_gguf.gemv(blocks, gd.ggml_type(qtype), x)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, 130)
    assert torch.equal(native_gguf.gemv(blocks, gd.ggml_type(qtype), x, portable=True), y)
    w = gd.dequantize(blocks, qtype, torch.bfloat16).float()
    ref = x.float() @ w.t()                                  # the bf16 reference's product
    bound = x.float().abs() @ w.abs().t() * 2.0**-7 + 1e-6
    assert ((y.float() - ref).abs() <= bound).all()


# 65 Q6_K blocks, 520 Q8_0: rows of 16640 values, past the 4096 a thread widens on its stack
@pytest.mark.parametrize("qtype,k", [("Q8_0", 512), ("Q6_K", 512), ("Q8_0", 16640), ("Q6_K", 16640)])
def test_gemv_widens_a_bf16_row_in_c_as_torch_would(qtype, k):
    """A bf16 row is widened per thread in C and the sums rounded to bf16 there: the same bits
    as widening it with torch first and rounding the float32 sums with torch."""
    blocks = gguf_blocks(70, k, qtype)
    x = torch.randn(1, k).to(torch.bfloat16)
    y = native_gguf.gemv(blocks, gd.ggml_type(qtype), x)
    as_float = native_gguf.gemv(blocks, gd.ggml_type(qtype), x.float())   # the float32 entry
    assert y.dtype == torch.bfloat16 and as_float.dtype == torch.float32
    assert torch.equal(y, as_float.to(torch.bfloat16))
    wide = torch.randn(1, 2 * k).to(torch.bfloat16)[:, ::2]          # not contiguous: torch widens
    assert torch.equal(native_gguf.gemv(blocks, gd.ggml_type(qtype), wide),
                       native_gguf.gemv(blocks, gd.ggml_type(qtype), wide.float()).to(torch.bfloat16))


def test_gemv_refuses_other_types_and_row_counts():
    with pytest.raises(ValueError, match=r"native GGUF kernels take \['Q4_0', 'Q4_1', 'Q8_0', "
                                         r"'Q4_K', 'Q6_K'\], got <GGMLType.Q5_0"):
        native_gguf.gemv(gguf_blocks(4, 64, "Q5_0"), gd.GGMLType.Q5_0, torch.randn(1, 64))
    with pytest.raises(ValueError, match="Q4_0/Q4_1/Q8_0/Q4_K/Q6_K blocks and one row"):
        native_gguf.gemv(gguf_blocks(4, 64, "Q8_0"), gd.GGMLType.Q8_0, torch.randn(2, 64))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q6_K", "Q4_0", "Q4_1", "Q4_K"])
def test_one_row_reads_the_blocks_and_nothing_is_copied(qtype, monkeypatch):
    """One row is the C product over the stored blocks; no row count makes a copy of them in
    another layout (the layer holds its blocks and nothing else)."""
    k = 512
    blocks = gguf_blocks(48, k, qtype)
    w = fg.prepare_gguf_weight(blocks, qtype, lazy=True)
    seen = []
    real = native_gguf.gemv
    monkeypatch.setattr(native_gguf, "gemv", lambda b, *a, **kw: seen.append(b) or real(b, *a, **kw))
    for rows in (1, 2, 40, 1):
        fl.linear_weight_only(torch.randn(rows, k).to(torch.bfloat16), w)
    assert len(seen) == 2 and all(b is blocks for b in seen)
    assert w.packed is None and w.make_packed is None


# -- one row of int8 weights with a scale per row (torchao int8, quanto int8) -----------------
@pytest.mark.parametrize("k", [384, 208, 16448])  # the vector loop (K % 64 == 0), the portable
# one (int8pack itself needs K % 16 == 0: it crashes on K = 200), a row past the 4096 values
# a thread widens on its stack
def test_int8_gemv_is_int8packs_product_and_the_builds_agree(k):
    g = torch.Generator().manual_seed(5)
    n = 130
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    s = (torch.rand(n, generator=g) * 1e-2).to(torch.bfloat16)
    x = torch.randn(1, k, generator=g).to(torch.bfloat16)
    y = native_int8w.int8_gemv(q, s, x)
    assert y.dtype == torch.bfloat16 and y.shape == (1, n)
    assert torch.equal(native_int8w.int8_gemv(q, s, x, portable=True), y)
    # _weight_int8pack_mm's numbers: a float32 sum times the scale, rounded once to bf16; the
    # two sums differ in order only, so they agree to a bf16 rounding of the exact product
    ref = torch._weight_int8pack_mm(x, q, s).double()
    exact = (x.double() @ q.double().t()) * s.double()
    bound = (x.double().abs() @ q.double().abs().t()) * s.double() * 2.0**-8
    assert ((y.double() - exact).abs() <= bound).all()
    assert ((y.double() - ref).abs() <= 2 * bound).all()


@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_gemv_folds_the_output_scale_and_bias_as_torchs_two_ops(with_bias):
    """torchao int8's one row in one call: y = bf16(sum), then y.mul_(scale), y.add_(bias) each
    rounded to bf16, bit for bit what the product followed by scale_rows_ gives."""
    g = torch.Generator().manual_seed(11)
    n, k = 130, 384
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    x = torch.randn(1, k, generator=g).to(torch.bfloat16)
    post = (torch.rand(n, generator=g) * 1e-2).to(torch.bfloat16)
    post[:4] = torch.tensor([0.0, -3e38, float("inf"), float("nan")])      # overflow, inf, NaN
    bias = torch.randn(n, generator=g).to(torch.bfloat16) if with_bias else None
    folded = native_int8w.int8_gemv(q, None, x, post=post, bias=bias)
    two_passes = native_int8w.scale_rows_(native_int8w.int8_gemv(q, torch.ones(n, dtype=torch.bfloat16), x),
                                    post, bias)
    assert_same(folded, two_passes)
    assert_same(native_int8w.int8_gemv(q, None, x, portable=True, post=post, bias=bias), folded)


def test_int8_gemv_refuses_what_it_cannot_read():
    q, s = torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, dtype=torch.bfloat16)
    for x, qq, ss in [(torch.zeros(2, 64, dtype=torch.bfloat16), q, s),   # two rows
                      (torch.zeros(1, 64), q, s),                          # float32 x
                      (torch.zeros(1, 64, dtype=torch.bfloat16), q.t(), s),  # strided q
                      (torch.zeros(1, 64, dtype=torch.bfloat16), q, s.float())]:
        with pytest.raises(ValueError, match=r"expected x bf16 \[1, \d+\], contiguous int8"):
            native_int8w.int8_gemv(qq, ss, x)
    with pytest.raises(ValueError, match="bf16 scale / post / bias of 4 values"):
        native_int8w.int8_gemv(q, None, torch.zeros(1, 64, dtype=torch.bfloat16), bias=s[:3])
    assert not native_int8w.int8_gemv_supported(torch.zeros(4, 96, dtype=torch.int8),
                                          torch.zeros(1, 96, dtype=torch.bfloat16))


@pytest.mark.parametrize("case", ["torchao int8wo", "quanto int8"])
def test_int8_layers_take_the_c_product_at_one_row_only(case, monkeypatch):
    layer = LAYER_CASES[case]()
    calls = []
    real = native_int8w.int8_gemv
    monkeypatch.setattr(native_int8w, "int8_gemv", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with torch.no_grad():
        one = layer(torch.randn(1, layer.in_features).to(torch.bfloat16))
        assert calls == [1] and one.shape == (1, layer.out_features)
        layer(torch.randn(3, layer.in_features).to(torch.bfloat16))   # torch's packed kernel
    assert calls == [1]


# -- int8 dynamic quantization ---------------------------------------------------------------
def test_int8_token_scale_matches_torchao_for_every_bf16_amax():
    bits = torch.arange(0, 0x7F80, dtype=torch.int32).to(torch.int16)   # every finite |x| >= 0
    amax = bits.view(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    x = torch.stack([amax, -amax * torch.rand(len(amax), generator=g).to(torch.bfloat16)], 1)
    x = torch.cat([x, x.flip(1).neg()])                                # the max first, negative
    q, s = fi.quantize_rows_int8(x, reuse=True)
    q0, s0 = iq.int8_quantize_per_token(x)
    assert torch.equal(s, s0) and torch.equal(q, q0)


def test_int8_rows_with_inf_or_nan_take_the_torch_ops():
    x = torch.randn(4, 64).to(torch.bfloat16)
    x[1, 3], x[2, 7] = float("inf"), float("nan")
    assert native_int8.quantize_rows_bf16(x, torch.empty(4, 64, dtype=torch.int8)) is None
    q, s = fi.quantize_rows_int8(x, reuse=True)
    q0, s0 = fi.quantize_rows_int8(x, reuse=False)
    assert torch.equal(q, q0)
    assert_same(s, s0)


@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_output_matches_the_reference_roundings(with_bias):
    g = torch.Generator().manual_seed(3)
    acc = torch.randint(-2**31, 2**31 - 1, (130, 40), dtype=torch.int32, generator=g)
    acc[:, :20] //= 2**12                                               # typical and huge sums
    sx = torch.rand(130, 1, generator=g) * 1e-3
    sw = torch.rand(40, generator=g) * 1e-2
    bias = torch.randn(40, generator=g).to(torch.bfloat16) if with_bias else None
    y = (acc.to(torch.float32) * sx).to(torch.bfloat16) * sw             # int8_dynamic_linear
    ref = (y if bias is None else y + bias).to(torch.bfloat16)
    assert torch.equal(native_int8.int8_output_bf16(acc, sx, sw, bias), ref)
    wide = torch.zeros(130, 100, dtype=torch.bfloat16)              # into a block of columns
    out = native_int8.int8_output_bf16(acc, sx, sw, bias, out=wide[:, 30:70])
    assert out.data_ptr() == wide[:, 30:].data_ptr() and torch.equal(wide[:, 30:70], ref)
    assert not wide[:, :30].any() and not wide[:, 70:].any()


def test_int8_output_refuses_a_wrong_out():
    acc, sx, sw = torch.zeros(4, 8, dtype=torch.int32), torch.ones(4), torch.ones(8)
    for out in (torch.empty(4, 8), torch.empty(4, 9, dtype=torch.bfloat16),
                torch.empty(8, 4, dtype=torch.bfloat16).t()):
        with pytest.raises(ValueError, match=r"out must be bf16 \[4, 8\] with contiguous rows"):
            native_int8.int8_output_bf16(acc, sx, sw, None, out=out)


# -- every layer: the same bits with and without the kernels ------------------------------------
NATIVE_LAYERS = ["torchao int8dq", "torchao int4wo", "quanto int8", "quanto int4", "quanto int2",
                 "modelopt INT8", "gguf Q8_0", "gguf Q4_0", "gguf Q4_1", "gguf Q4_K", "gguf Q6_K"]


@pytest.mark.parametrize("case", NATIVE_LAYERS)
def test_layers_give_the_same_bits_with_and_without_the_kernels(case, monkeypatch):
    layer = LAYER_CASES[case]()
    x = torch.randn(100, layer.in_features).to(torch.bfloat16)  # many rows: the decode path
    with torch.no_grad():
        compiled = layer(x)
        monkeypatch.setitem(native._state, "lib", None)
        assert torch.equal(layer(x), compiled)


def test_big_bf16_weights_quantize_to_int8_in_one_c_pass_with_torchaos_numbers(monkeypatch):
    w = (torch.randn(520, 2304) * torch.rand(520, 1) * 4).to(torch.bfloat16)  # > 1M: big path
    calls = []
    real = native_int8.quantize_rows_bf16
    monkeypatch.setattr(native_int8, "quantize_rows_bf16", lambda *a: calls.append(1) or real(*a))
    q, s = cq.int8_quantize_per_channel(w)
    assert calls == [1]
    amax = w.abs().amax(dim=-1, keepdim=True)                      # torchao's one-line rule
    s0 = torch.clamp(amax / 127.5, min=torch.finfo(torch.float32).eps).to(torch.float32)
    q0 = torch.clamp(torch.round(w * (1.0 / s0)), -128, 127).to(torch.int8)
    assert torch.equal(s, s0) and torch.equal(q, q0)



@pytest.mark.parametrize("with_bias", [False, True])
def test_scale_rows_is_torchs_mul_then_add(with_bias):
    g = torch.Generator().manual_seed(5)
    y = (torch.randn(70, 96, generator=g) * 50).to(torch.bfloat16)
    y[0, :7] = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 1e-38, 3e38])
    scale = (torch.rand(96, generator=g) * 1e-2).to(torch.bfloat16)
    bias = torch.randn(96, generator=g).to(torch.bfloat16) if with_bias else None
    ref = y.clone().mul_(scale)
    ref = ref if bias is None else ref.add_(bias)
    out = native_int8w.scale_rows_(y, scale, bias)
    assert out is y
    assert_same(y, ref)


# -- one-row products with the bias in the same C call ------------------------------------------
def _one_row_cases():
    """name -> (n, k, f(x2, bias, portable)) for each one-row kernel that takes a bias"""
    from diffquant.ops.native import int4 as native_int4
    from tests.test_native_int4 import affine4
    q8, q6 = gguf_blocks(70, 256, "Q8_0"), gguf_blocks(70, 512, "Q6_K")
    packed, sz = native_int4.pack_rows(*affine4(70, 256, 64))
    nf4, lut, absmax, _ = lut4_weight(70, 256, 64)
    return {
        "Q8_0": (70, 256, lambda x, b, p: native_gguf.gemv(q8, gd.GGMLType.Q8_0, x, p, bias=b)),
        "Q6_K": (70, 512, lambda x, b, p: native_gguf.gemv(q6, gd.GGMLType.Q6_K, x, p, bias=b)),
        "int4": (70, 256, lambda x, b, p: native_int4.gemv(packed, sz, 64, x, p, bias=b)),
        "nf4": (70, 256, lambda x, b, p: native_bnb4.lut4_gemv(nf4, lut, absmax, 64, (70, 256), x, p,
                                                         bias=b)),
    }


@pytest.mark.parametrize("case", ["Q8_0", "Q6_K", "int4", "nf4"])
def test_one_row_products_add_the_bias_as_torchs_add(case):
    """The bias goes in the product's C call: bit for bit y.add_(bias) after it, for bf16 biases
    with special values (overflow to inf, inf, NaN, -0), for a float32 bias (added by torch,
    as before) and, for the GGUF kernel, a float32 row."""
    n, k, f = _one_row_cases()[case]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, k, generator=g).to(torch.bfloat16)
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    bias[:5] = torch.tensor([3.3e38, float("-inf"), float("nan"), -0.0, 1e-40])
    strided = torch.randn(2 * n, generator=g).to(torch.bfloat16)[::2]  # added by torch
    for b in (bias, bias.float(), strided):
        assert_same(f(x, b, False), f(x, None, False).add_(b))
        assert_same(f(x, b, True), f(x, None, True).add_(b))
    if case in ("Q8_0", "Q6_K", "nf4"):                       # the float32 entry: torch adds it
        assert_same(f(x.float(), bias, False), f(x.float(), None, False).add_(bias))


@pytest.mark.parametrize("fmt,lazy", [("Q6_K", True), ("Q4_0", True), ("Q8_0", False)])
def test_a_prepared_weight_takes_the_bias_into_its_one_row_call(fmt, lazy, monkeypatch):
    """GGUF's one-row product takes the bias: one native call per one-row product, no torch
    add after it."""
    from diffquant.ops.native import int4 as native_int4
    k = 256 if fmt == "Q6_K" else 64
    blocks = gguf_blocks(48, k, fmt)
    w = fg.prepare_gguf_weight(blocks, fmt, lazy=lazy)
    seen = []
    for mod, name in ((native_gguf, "gemv"), (native_int4, "gemv")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, real=real, **kw: seen.append(kw.get("bias"))
                            or real(*a, **kw))
    bias = torch.randn(48).to(torch.bfloat16)
    x = torch.randn(1, k).to(torch.bfloat16)
    with torch.inference_mode():
        y = fl.linear_weight_only(x, w, bias)
        assert len(seen) == 1 and seen[0] is bias
        assert_same(y, fl.linear_weight_only(x, w).add_(bias))


# -- torchao int4's group-wise quantization on load ----------------------------------------------
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_groupwise_quantization_in_c_is_the_torch_ops(group, monkeypatch):
    """bf16 weights are quantized in csrc/quantize.c: the torch form's packed codes, scales
    and zeros bit for bit, with zero and constant groups, tiny ranges (the scale's clamp to the
    smallest normal), huge ones, infinities and NaN (NaN places compared), over threads."""
    g = torch.Generator().manual_seed(group)
    w = torch.randn(70, 512, generator=g) * 0.05
    w[0] = 0.0
    w[1] = 0.3
    w[2, :group] = torch.linspace(0, 1e-38, group)
    w[3, 5], w[4, 9], w[5, 0], w[6, :3] = float("inf"), float("-inf"), float("nan"), 3e38
    w[7, :4] = torch.tensor([-0.0, 1e-40, -1e-40, 0.0])              # signed zeros, subnormals
    w = w.to(torch.bfloat16)
    assert cq._int4_in_c(w, group)
    in_c = cq.int4_quantize_groupwise(w, group)
    monkeypatch.setattr(cq, "_int4_in_c", lambda *a: False)
    ops = cq.int4_quantize_groupwise(w, group)
    for a, b in zip(in_c, ops):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
