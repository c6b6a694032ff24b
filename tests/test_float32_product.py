"""The products CPUs without bf16 or int8 matmul kernels take (AVX2 only: AMD Zen 3, older
Intel): weight-only formats multiply in float32 (dispatch.float32_product) and int8 dynamic
multiplies its integers with native's dot kernel or exact float32 matmuls
(dispatch._int_mm_slow). Each is forced here, so every machine runs them."""

import pytest
import torch
import torch.nn.functional as F

from diffquant.ops.cpu import dispatch
from diffquant.ops.cpu import int8 as ci8
from diffquant.ops.cpu import gguf as fg
from diffquant.ops.cpu import int4 as f4
from diffquant.ops.cpu import int8_dynamic as fi
from diffquant.ops.cpu import linear as fl
from diffquant.ops.formats import torchao as iq
from diffquant.ops.native import build as native
from diffquant.ops.native import int8_dynamic as native_int8
from tests import test_fast_paths as fp
from tests.test_fast_linear import assert_bf16_close, gguf_blocks

pytestmark = pytest.mark.usefixtures("native_target")  # every build this machine can execute

BF16 = torch.bfloat16


def _x(m, k, seed=0):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(BF16)


@pytest.fixture
def float32_product(monkeypatch):
    monkeypatch.setattr(dispatch, "_float32_faster", {BF16: True, torch.float16: True})


def test_the_rule_follows_torchs_bf16_kernel(monkeypatch):
    monkeypatch.setattr(dispatch, "_float32_faster", {})
    x = torch.zeros(2, 8, dtype=BF16)
    assert dispatch.float32_product(x) == (not torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert not dispatch.float32_product(x.float())                       # float32 is already float32
    monkeypatch.setattr(dispatch, "_float32_faster", {BF16: True})
    assert dispatch.float32_product(x)
    assert not dispatch.float32_product(x.clone().requires_grad_())      # autograd keeps its own path


def _weights():
    n, k = 40, 512
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(3))
    p, s, z = iq.int4_quantize_groupwise(w.to(BF16), 64)
    yield "int4 g64", f4.prepare_int4_weight(p, s, z)
    for qtype in ("Q8_0", "Q4_0", "Q4_K", "Q6_K"):
        yield qtype, fg.prepare_gguf_weight(gguf_blocks(n, k, qtype), qtype)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("case", [name for name, _ in _weights()])
def test_weight_only_float32_product(case, bias, float32_product):
    w = dict(_weights())[case]
    x, b = _x(80, w.in_features), (_x(1, w.out_features, seed=1).flatten() if bias else None)
    y = fl.linear_weight_only(x, w, b)
    ref_w = w.dequantize(BF16)                                       # the format's own values
    # the same values multiplied in float32 and rounded once
    exact = F.linear(x.float(), ref_w.float(), None if b is None else b.float()).to(BF16)
    assert torch.equal(y, exact)
    assert_bf16_close(y, F.linear(x, ref_w, b), x, ref_w)            # the bf16 reference's level
    assert dispatch.float32_product(x)


def test_int8_float32_product_keeps_the_scale_order(float32_product):
    q, s = iq.int8_quantize_per_channel(torch.randn(48, 256))
    w = ci8.prepare_int8_weight(q, s)
    x, b = _x(40, 256), _x(1, 48, seed=1).flatten()
    y = fl.linear_weight_only(x, w, b)
    # torchao's order: the integer product rounded to bf16, times the bf16 scale, plus the bias
    exact = torch.mm(x.float(), q.float().t()).to(BF16).mul_(s.reshape(-1).to(BF16)).add_(b)
    assert torch.equal(y, exact)
    assert_bf16_close(y, iq.int8_weight_only_linear(x, q, s, b), x, q.float() * s.reshape(-1, 1))


def test_float32_product_reuses_its_buffers(float32_product):
    q, s = iq.int8_quantize_per_channel(torch.randn(32, 64))
    w = ci8.prepare_int8_weight(q, s)
    x = _x(20, 64)
    first = fl.linear_weight_only(x, w)
    again = fl.linear_weight_only(x, w)
    assert torch.equal(first, again) and first.data_ptr() != again.data_ptr()  # fresh outputs


# -- int8 dynamic where torch._int_mm has no VNNI kernel ----------------------------------------
@pytest.fixture
def slow_int_mm(monkeypatch):
    monkeypatch.setattr(dispatch, "_int_mm_slow", lambda: True)


@pytest.mark.parametrize("use_native", [True, False])  # False: exact float32 matmuls
@pytest.mark.parametrize("m", [1, 3, 5, 70])
@pytest.mark.parametrize("n,k", [(33, 2048), (8, 40)])  # 40: not the dot kernel's step of 16
def test_int8_dynamic_without_vnni_is_bit_identical(m, n, k, use_native, slow_int_mm,
                                                    monkeypatch):
    if not use_native:
        monkeypatch.setattr(native, "available", lambda: False)
    q, s = iq.int8_quantize_per_channel(torch.randn(n, k,
        generator=torch.Generator().manual_seed(m)))
    x, b = _x(m, k), _x(1, n, seed=1).flatten()
    y = fi.linear_int8_dynamic(x, fi.prepare_int8_dynamic(q, s), b)
    assert torch.equal(y, iq.int8_dynamic_linear(x, q, s, b))


def test_int8_dynamic_scales_round_as_the_reference_on_a_tie():
    """11.875 x 0.0304276... + 0.3046875 is 0.666015625 in float32, a tie between two bf16
    values: the reference rounds the product and the sum separately (ties to even: 0.6640625);
    a fused multiply-add would round up (the case the unseeded test above met once)."""
    acc = torch.full((64, 16), 95, dtype=torch.int32)
    xs = torch.full((64, 1), 0.125)                                   # 95 x 0.125 = 11.875
    ws = torch.full((16,), 0.030427634716033936)
    b = torch.full((16,), 0.3046875, dtype=BF16)
    y = fi._scale_output(acc, xs, ws, b, BF16)
    want = (((acc.float() * xs).to(BF16)) * ws + b).to(BF16)           # formats.torchao's order
    assert torch.equal(y, want) and want[0, 0].item() == 0.6640625


@pytest.mark.parametrize("m", [1, 2])  # 1: native_int8.int8_dynamic_row
@pytest.mark.parametrize("use_native", [True, False])
def test_int8_dynamic_sums_past_float32s_integers(use_native, m, slow_int_mm, monkeypatch):
    """3072 products of 127 x 127 (and one 127 x 126): an odd sum near 2**25.6, which float32
    cannot hold; the float32 matmuls run over 1024 columns at a time (sums below 2**24)."""
    if not use_native:
        monkeypatch.setattr(native, "available", lambda: False)
    k = 3072
    q = torch.full((4, k), 127, dtype=torch.int8)
    q[:, 7] = 126
    x = torch.ones(m, k, dtype=BF16)                                 # codes 127 (amax / 127.5)
    xq, _ = fi.quantize_rows_int8(x)
    total = (xq.long() @ q.long().t())
    assert total[0, 0] % 2 == 1 and total[0, 0] > 2**25
    acc = torch.empty(m, 4, dtype=torch.int32)
    if use_native:
        native_int8.int8_dot(xq, q, acc)
    else:
        fi._int8_mm_float32(xq, q.t(), acc)
    assert torch.equal(acc.long(), total)
    s = torch.ones(4)
    y = fi.linear_int8_dynamic(x, fi.prepare_int8_dynamic(q, s))
    assert torch.equal(y, iq.int8_dynamic_linear(x, q, s))


@pytest.mark.parametrize("m", [1, 4, 7, 64, 69])  # token blocks of 64, groups of 4, a remainder
@pytest.mark.parametrize("n", [1, 2, 5])          # weight rows in pairs, an odd last one
@pytest.mark.parametrize("k", [16, 48, 40])
def test_native_int8_dot_is_exact(m, n, k):
    g = torch.Generator().manual_seed(m * 100 + n * 10 + k)
    xq = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    out = torch.full((m, n + 3), 7, dtype=torch.int32)              # a block of a wider output
    native_int8.int8_dot(xq, q, out[:, 1:n + 1])
    assert torch.equal(out[:, 1:n + 1].long(), xq.long() @ q.long().t())
    assert (out[:, 0] == 7).all() and (out[:, n + 1:] == 7).all()   # nothing else written


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n,k", [(1, 16), (5, 40), (7, 41), (130, 2048)])  # leftovers of 32, odd K
def test_native_int8_dynamic_row_is_bit_identical(n, k, bias):
    q, s = iq.int8_quantize_per_channel(torch.randn(n, k))
    x, b = _x(1, k), (_x(1, n, seed=1).flatten() if bias else None)
    y = native_int8.int8_dynamic_row(x, q, s.flatten(), b)
    assert torch.equal(y, iq.int8_dynamic_linear(x, q, s, b))


def test_native_int8_dynamic_row_leaves_a_nan_token_to_torch(slow_int_mm):
    q, s = iq.int8_quantize_per_channel(torch.randn(8, 64))
    x = _x(1, 64)
    x[0, 3] = float("nan")
    assert native_int8.int8_dynamic_row(x, q, s.flatten(), None) is None
    y = fi.linear_int8_dynamic(x, fi.prepare_int8_dynamic(q, s))   # the torch ops' numbers
    torch.testing.assert_close(y, iq.int8_dynamic_linear(x, q, s), rtol=0, atol=0, equal_nan=True)


def test_native_int8_dynamic_row_refuses_bad_arguments():
    q, s = torch.zeros(3, 16, dtype=torch.int8), torch.ones(3)
    with pytest.raises(ValueError, match=r"expected contiguous bf16 x \[1, 16\], int8 q \[3, 16\]"):
        native_int8.int8_dynamic_row(_x(2, 16), q, s, None)                # two tokens
    with pytest.raises(ValueError, match=r"float32 channel scales \[3\]"):
        native_int8.int8_dynamic_row(_x(1, 16), q, s.to(BF16), None)
    with pytest.raises(ValueError, match=r"bf16 bias \[3\] or none"):
        native_int8.int8_dynamic_row(_x(1, 16), q, s, torch.ones(4, dtype=BF16))


def test_native_int8_dot_refuses_bad_arguments():
    xq, q = torch.zeros(2, 16, dtype=torch.int8), torch.zeros(3, 16, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"int32 out \[2, 3\]"):
        native_int8.int8_dot(xq, q, torch.empty(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"contiguous int8 q \[N, 16\]"):
        native_int8.int8_dot(xq, torch.zeros(16, 3, dtype=torch.int8).t(), torch.empty(2, 3, dtype=torch.int32))


# -- every quantized layer under the float32 product ------------------------------------------
@pytest.mark.parametrize("case", sorted(fp.LAYER_CASES))
def test_layers_under_the_float32_product(case, float32_product):
    layer = fp.LAYER_CASES[case]()
    x = fp._x(100).reshape(1, 100, fp.K)                         # past every packed kernel's rows
    with torch.no_grad():
        y, ref = layer(x), fp._reference(layer, x)               # the reference: its own bf16 path
    w = layer.dequantized_weight().float()
    bound = x.float().abs() @ w.abs().t() * 2.0**-7 + 2.0**-7 * (layer.bias.float().abs() + 1e-3)
    assert ((y.float() - ref.float()).abs() <= bound).all()
    assert layer._fast is not None


def test_bitsandbytes_4bit_under_the_float32_product(tmp_path, float32_product):
    pytest.importorskip("bitsandbytes")
    from diffquant import BitsAndBytesConfig
    from tests.toy import ToyModel, save_toy, toy_input

    save_toy(tmp_path / "bf16")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_compute_dtype=BF16)     # bf16: the C decode's path
    model = ToyModel.from_pretrained(tmp_path / "bf16", torch_dtype=BF16, quantization_config=config)
    layer = model.proj_in
    x = toy_input(rows=80)
    with torch.no_grad():
        y = layer(x)
        w = layer.dequantized_weight().to(BF16)
    exact = F.linear(x.float(), w.float(), layer.bias.float()).to(BF16)
    assert torch.equal(y, exact) and layer._fast is not None


def test_cpu_products_names_the_paths_taken(monkeypatch):
    from diffquant.ops.native import int8_amx as native_amx
    monkeypatch.setattr(native_amx, "amx_available", lambda: False)
    monkeypatch.setattr(dispatch, "_int_mm_slow", lambda: False)
    assert dispatch.cpu_products() == "many-row products: weight-only in bf16, int8 dynamic on torch._int_mm"
    monkeypatch.setattr(dispatch, "_float32_faster", {BF16: True})
    monkeypatch.setattr(dispatch, "_int_mm_slow", lambda: True)
    monkeypatch.setattr(native, "available", lambda: True)
    assert dispatch.cpu_products() == ("many-row products: weight-only in float32 (torch has no bf16 "
                                 "matmul kernel here), int8 dynamic on the AVX2 int8 dot kernel")
    monkeypatch.setattr(native, "available", lambda: False)
    assert dispatch.cpu_products().endswith("int8 dynamic on exact float32 matmuls")
    monkeypatch.setattr(native_amx, "amx_available", lambda: True)
    assert dispatch.cpu_products().endswith("int8 dynamic on AMX tiles")
