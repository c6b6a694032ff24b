"""ops/cpu/ (linear.py, int8.py, int4.py, gguf.py) against each format's reference math.

The dequantize paths must give the reference's numbers bit for bit (same values, same matmul);
the packed CPU kernels (few rows) accumulate in float32 with scales in the activation dtype, so
they are held to bf16 rounding: |fast - ref| <= 2**-7 * (|x| @ |W|.T).
"""

import threading

import pytest
import torch
import torch.nn.functional as F

from diffquant.ops.cpu import int8 as ci8
from diffquant.errors import QuantizationError
from diffquant.ops.cpu import gguf as fg
from diffquant.ops.cpu import int4 as f4
from diffquant.ops.cpu import int8_dynamic as fi
from diffquant.ops.cpu import linear as fl
from diffquant.ops.formats import gguf as gd
from diffquant.ops.formats import torchao as iq

BF16 = torch.bfloat16
ROWS = (1, 5, 17, 40, 80)  # packed kernels up to the weight's small_rows (16..64), then dequantize


@pytest.fixture(autouse=True)
def _fresh_scratch():
    fl.clear_scratch()
    yield
    fl.clear_scratch()


def _x(m, k, dtype=BF16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).to(dtype)


def assert_bf16_close(y, ref, x, w):
    """Within bf16 rounding of the product: 2**-7 of |x| @ |W|.T, elementwise."""
    bound = x.float().abs() @ w.float().abs().t() * 2.0**-7 + 1e-6
    err = (y.float() - ref.float()).abs()
    assert (err <= bound).all(), f"max err/bound {(err / bound).max().item():.3f}"


def random_kquant_blocks(n, k, qtype, seed=0):
    """Valid K-quant blocks: random bytes, with small positive half-float super-block scales."""
    block, size = gd.BLOCK_LAYOUT[gd.ggml_type(qtype)]
    g = torch.Generator().manual_seed(seed)
    b = torch.randint(0, 256, (n, k // block, size), dtype=torch.uint8, generator=g)
    for off in {"Q4_K": (0, 2), "Q6_K": (208,)}[qtype]:
        d = torch.rand(n, k // block, 1, generator=g) * 0.01 + 0.001
        b[..., off:off + 2] = d.half().view(torch.uint8)
    return b.reshape(n, -1)


def gguf_blocks(n, k, qtype, seed=0):
    if qtype in ("Q4_K", "Q6_K"):
        return random_kquant_blocks(n, k, qtype, seed)
    return gd.quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)), qtype)


# -- int8 dynamic --------------------------------------------------------------------------------
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("n,k", [(48, 64), (33, 20), (40, 96)])
@pytest.mark.parametrize("dtype", [BF16, torch.float32])
@pytest.mark.parametrize("columns", [None, 16])  # 16: _int_mm by blocks of columns, a short last
def test_int8_dynamic_is_bit_identical(m, n, k, dtype, columns, monkeypatch):
    if columns:
        monkeypatch.setattr(fi, "_INT_MM_COLUMNS", columns)
    w = _x(n, k, dtype, seed=1)
    q, s = iq.int8_quantize_per_channel(w)
    bias = _x(1, n, dtype, seed=2).flatten()
    x = _x(m, k, dtype) * 3
    prepared = fi.prepare_int8_dynamic(q, s)
    for b in (None, bias):
        assert torch.equal(fi.linear_int8_dynamic(x, prepared, b), iq.int8_dynamic_linear(x, q, s, b))


def test_int8_dynamic_keeps_leading_dims_and_zero_rows():
    q, s = iq.int8_quantize_per_channel(_x(16, 32, seed=1))
    x = _x(6, 32).reshape(2, 3, 32)
    x[0, 1] = 0  # an all-zero token: scale clamps to eps, output is exactly the bias
    y = fi.linear_int8_dynamic(x, fi.prepare_int8_dynamic(q, s))
    assert y.shape == (2, 3, 16) and torch.equal(y, iq.int8_dynamic_linear(x, q, s))
    assert not y[0, 1].any()


def test_quantize_rows_matches_torchao_rule():
    x = _x(7, 50) * 10
    q, s = fi.quantize_rows_int8(x)
    q0, s0 = iq.int8_quantize_per_token(x)
    assert torch.equal(q, q0) and torch.equal(s, s0)


# -- int8 weight-only ----------------------------------------------------------------------------
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("n,k", [(48, 64), (40, 96), (33, 40)])  # K=40: no packed kernel
def test_int8_weight_only(m, n, k):
    w = _x(n, k, seed=1)
    q, s = iq.int8_quantize_per_channel(w)
    bias = _x(1, n, seed=2).flatten()
    x = _x(m, k)
    prepared = ci8.prepare_int8_weight(q, s)
    for b in (None, bias):
        ref = iq.int8_weight_only_linear(x, q, s, b)
        y = fl.linear_weight_only(x, prepared, b)
        if m > prepared.small_rows or k % 16:
            assert torch.equal(y, ref)  # the dequantize path is the reference, op for op
        else:
            assert_bf16_close(y, ref, x, iq.int8_dequantize(q, s, torch.float32))
    assert (prepared.packed is None) == (k % 16 != 0)

def test_int8_weight_only_float32_scales_round_as_torchao():
    # a scale quantized from float32 weights is not a bf16 value; torchao multiplies by it cast
    # to the activations' dtype, and so must the dequantize path
    q, s = iq.int8_quantize_per_channel(_x(48, 64, seed=1).float() * 1.37)
    assert not torch.equal(s.to(BF16).float(), s)
    x = _x(100, 64)
    assert torch.equal(fl.linear_weight_only(x, ci8.prepare_int8_weight(q, s)),
                       iq.int8_weight_only_linear(x, q, s))


def test_int8_bitsandbytes_scale_convention():
    """bitsandbytes stores SCB = row absmax: the same kernel with scale = SCB / 127."""
    w = _x(32, 64, torch.float32, seed=1)
    scb = w.abs().amax(-1)
    q = torch.round(w * (127 / scb[:, None])).to(torch.int8)
    x = _x(20, 64)
    y = fl.linear_weight_only(x, ci8.prepare_int8_weight(q, scb / 127))
    ref = x.float() @ (q.float() * (scb[:, None] / 127)).t()
    assert_bf16_close(y, ref, x, w)


# -- int4 group-wise (torchao tinygemm numbers) -------------------------------------------------
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("n,k,group", [(48, 128, 64), (40, 96, 32), (16, 256, 256)])
def test_int4_weight_only(m, n, k, group):
    packed, scale, zero = iq.int4_quantize_groupwise(_x(n, k, seed=1), group)
    w = iq.int4_dequantize(packed, scale, zero, BF16)
    bias = _x(1, n, seed=2).flatten()
    x = _x(m, k)
    prepared = f4.prepare_int4_weight(packed, scale, zero)
    assert torch.equal(prepared.dequantize(BF16), w)  # the reference's bf16 math, bit for bit
    ref = torch.matmul(x, w.t()) + bias  # Int4WeightOnlyLinear.forward
    assert_bf16_close(fl.linear_weight_only(x, prepared, bias), ref, x, w)


def test_int4_float32_activations_dequantize_in_scale_dtype():
    packed, scale, zero = iq.int4_quantize_groupwise(_x(32, 64, seed=1), 32)
    x = _x(3, 64, torch.float32)
    y = fl.linear_weight_only(x, f4.prepare_int4_weight(packed, scale, zero))
    ref = x @ iq.int4_dequantize(packed, scale, zero, BF16).float().t()
    assert y.dtype == torch.float32 and torch.equal(y, ref)


# -- GGUF ----------------------------------------------------------------------------------------
GGUF_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")


@pytest.mark.parametrize("qtype", GGUF_TYPES + ("Q5_0", "Q5_1"))
@pytest.mark.parametrize("dtype", [BF16, torch.float32, torch.float16])
def test_gguf_dequantize_into_is_bit_identical(qtype, dtype):
    k = 512 if qtype in ("Q4_K", "Q6_K") else 96
    blocks = gguf_blocks(24, k, qtype)
    out = torch.full((24, k), float("nan"), dtype=dtype)
    assert torch.equal(fg.dequantize_into(blocks, qtype, out), gd.dequantize(blocks, qtype, dtype))


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("qtype", GGUF_TYPES)
@pytest.mark.parametrize("n", [32, 40])  # 40: the int4pack kernel wants N % 16, padded here
def test_gguf_linear(m, qtype, n):
    k = 512 if qtype in ("Q4_K", "Q6_K") else 96  # 96 = 3 blocks of 32: no larger group fits
    blocks = gguf_blocks(n, k, qtype)
    w = gd.dequantize(blocks, qtype, BF16)
    bias = _x(1, n, seed=2).flatten()
    x = _x(m, k)
    prepared = fg.prepare_gguf_weight(blocks, qtype)
    ref = F.linear(x, w, bias)  # GGUFLinear.forward
    y = fl.linear_weight_only(x, prepared, bias)
    if m == 1:                  # the C product over the blocks in place: float32 sums
        assert_bf16_close(y, ref, x, w)
    else:                       # decoded into the shared buffer: the reference's bits
        assert torch.equal(y, ref)
    assert prepared.packed is None and prepared.make_packed is None  # nothing but the blocks


def test_gguf_prepare_rejects_bad_blocks():
    with pytest.raises(QuantizationError, match="not a multiple of the block size 34 bytes"):
        fg.prepare_gguf_weight(torch.zeros(4, 35, dtype=torch.uint8), "Q8_0")


# -- the shared buffer ---------------------------------------------------------------------------
def test_buffer_reuse_does_not_leak_between_calls_or_layers():
    a = ci8.prepare_int8_weight(*iq.int8_quantize_per_channel(_x(32, 64, seed=1)))
    b = fg.prepare_gguf_weight(gguf_blocks(32, 64, "Q4_0", seed=3), "Q4_0")
    x1, x2 = _x(40, 64, seed=4), _x(40, 64, seed=5)
    first = fl.linear_weight_only(x1, a)
    kept = first.clone()
    others = [fl.linear_weight_only(x2, a), fl.linear_weight_only(x1, b), fl.linear_weight_only(x2, b)]
    assert torch.equal(first, kept)  # outputs are fresh tensors, not views of the buffer
    assert torch.equal(fl.linear_weight_only(x1, a), kept)
    assert not torch.equal(others[0], kept) and not torch.equal(others[1], kept)
    assert torch.equal(fl.linear_weight_only(x2, b), others[2])
    # one buffer per (shape, dtype, device), shared by both layers
    buf = fl.scratch_buffer((32, 64), BF16, torch.device("cpu"))
    assert fl.scratch_buffer((64, 32), BF16, torch.device("cpu")).data_ptr() == buf.data_ptr()


def test_buffers_made_under_inference_mode_serve_later_no_grad_calls():
    # the pool outlives the mode it was first filled in; an inference tensor there would make
    # every later call outside inference_mode fail ("Inplace update to inference tensor")
    fl.clear_scratch()
    w = fg.prepare_gguf_weight(gguf_blocks(32, 64, "Q4_0", seed=3), "Q4_0")
    x = _x(w.small_rows + 16, 64, seed=4)                                  # the buffer path
    with torch.inference_mode():
        first = fl.linear_weight_only(x, w)
    with torch.no_grad():
        assert torch.equal(fl.linear_weight_only(x, w), first)
    assert torch.equal(fl.linear_weight_only(x, w), first)


def test_threads_get_their_own_buffers():
    weights = [fg.prepare_gguf_weight(gguf_blocks(32, 64, "Q8_0", seed=s), "Q8_0") for s in (1, 2)]
    x = _x(40, 64)
    expected = [fl.linear_weight_only(x, w) for w in weights]
    results, errors = {}, []

    def work(i):
        try:
            results[i] = all(torch.equal(fl.linear_weight_only(x, weights[i % 2]), expected[i % 2])
                             for _ in range(20))
        except Exception as err:  # noqa: BLE001 - reported by the assert below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(results.values()) and len(results) == 4


def test_gradients_flow_to_the_input_without_the_shared_buffer():
    q, s = iq.int8_quantize_per_channel(_x(16, 32, torch.float32, seed=1))
    prepared = ci8.prepare_int8_weight(q, s)
    x = _x(20, 32, torch.float32).requires_grad_()
    fl.linear_weight_only(x, prepared).sum().backward()
    fl.linear_weight_only(_x(20, 32, torch.float32, seed=9), prepared)  # would overwrite a shared one
    expected = (q.float() * s).sum(0).expand(20, 32)
    torch.testing.assert_close(x.grad, expected)


def test_wrong_input_width_is_refused():
    prepared = ci8.prepare_int8_weight(*iq.int8_quantize_per_channel(_x(16, 32, seed=1)))
    with pytest.raises(QuantizationError, match=r"input has 31 features, the weight expects 32"):
        fl.linear_weight_only(_x(2, 31), prepared)


def test_small_rows_threshold_selects_the_path():
    q, scale = iq.int8_quantize_per_channel(_x(32, 64, seed=2).float())
    prepared = ci8.prepare_int8_weight(q, scale)
    runs, packed = [], prepared.packed
    prepared.packed = lambda x2: runs.append(x2.shape[0]) or packed(x2)
    w = prepared.dequantize(BF16)
    x = _x(3, 64)
    dequant = fl.linear_weight_only(x, prepared, small_rows=0)
    assert runs == []
    assert_bf16_close(dequant, F.linear(x, w), x, w)
    few = fl.linear_weight_only(x, prepared, small_rows=16)
    assert runs == [3]                       # the packed kernel took the 3 rows
    assert_bf16_close(few, dequant, x, w)


@pytest.mark.parametrize("qtype", ("Q8_0", "Q4_1"))
def test_float16_activations_take_the_dequantize_path(qtype):
    """torch's packed kernels run 10-100x slower in float16 than in bf16 on CPUs without FP16
    arithmetic, so float16 activations dequantize whatever their row count."""
    blocks = gguf_blocks(32, 64, qtype)
    w = gd.dequantize(blocks, qtype, torch.float16)
    x = _x(3, 64, torch.float16)
    y = fl.linear_weight_only(x, fg.prepare_gguf_weight(blocks, qtype))
    assert y.dtype == torch.float16 and torch.equal(y, F.linear(x, w))
