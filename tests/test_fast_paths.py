"""Every backend layer wired to ops/fast_*: its forward against the layer's own reference
(dequantized_weight(), then the matmul) at 1 row (packed kernels where the format has one) and
at many rows (dequantize into a reused buffer), within bf16 rounding of the product:
|fast - ref| <= 2**-7 * (|x| @ |W|.T). Also: the packed form is built lazily and never reaches
the state dict, and it follows in-place changes of the stored tensors.
"""

import pytest
import torch
from torch import nn

from diffquant.ops.cpu import linear as fl
from diffquant.quantizers.base import QuantizedLinear
from diffquant.quantizers.gguf import GGUFLinear
from diffquant.quantizers.modelopt import ModelOptLinear, resolve_quantizer
from diffquant.quantizers.quanto import QuantoLinear
from diffquant.quantizers.torchao import LAYERS
from diffquant.quantizers.modelopt import NVIDIAModelOptConfig

BF16 = torch.bfloat16
N, K = 48, 256


def _weight(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, K, generator=g) * 0.1).to(BF16)


def _x(rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, K, generator=g).to(BF16)


def _torchao(kind, **params):
    layer = LAYERS[kind](K, N, True, **params)
    layer.load_piece("weight", _weight(), pre_quantized=False, dtype=BF16, device=None)
    layer.bias = nn.Parameter(_weight(2)[0, :N].clone(), requires_grad=False)
    return layer


def _quanto(wd):
    with torch.device("meta"):
        layer = QuantoLinear(K, N, True, weights_dtype=wd)
    layer.load_piece("weight", _weight(), pre_quantized=False, dtype=BF16, device=None)
    layer.bias = nn.Parameter(_weight(2)[0, :N].clone(), requires_grad=False)
    return layer


def _gguf(qtype, compute=BF16):
    with torch.device("meta"):
        layer = GGUFLinear(K, N, True, compute_dtype=compute, quant_type=qtype)
    layer.load_piece("weight", _weight(), pre_quantized=False, dtype=BF16, device=None)
    layer.bias = nn.Parameter(_weight(2)[0, :N].clone(), requires_grad=False)
    return layer


def _modelopt(config):
    quant_cfg = config.modelopt_config["quant_cfg"]
    lin = nn.Linear(K, N)
    attrs = resolve_quantizer(quant_cfg, "layer.weight_quantizer", lin)
    from diffquant.quantizers.modelopt import scheme_of

    layer = ModelOptLinear(K, N, True, scheme_of(attrs, "layer"), attrs)
    layer.load_piece("weight", _weight(), pre_quantized=False, dtype=BF16, device=None)
    layer.compute_dtype = BF16
    layer.bias = nn.Parameter(_weight(2)[0, :N].clone(), requires_grad=False)
    return layer


def _reference(layer, x):
    """The layer's format math: dequantize the whole weight, then one matmul, then the bias."""
    path = QuantizedLinear.__dict__["use_fast_path"]
    QuantizedLinear.use_fast_path = staticmethod(lambda t: False)
    try:
        return layer(x)
    finally:
        QuantizedLinear.use_fast_path = path


LAYER_CASES = {
    "torchao int8wo": lambda: _torchao("int8wo"),
    "torchao int8dq": lambda: _torchao("int8dq"),
    "torchao int4wo": lambda: _torchao("int4wo", group_size=64),
    "torchao float8wo": lambda: _torchao("float8wo", weight_dtype=torch.float8_e4m3fn),
    "quanto int8": lambda: _quanto("int8"),
    "quanto float8": lambda: _quanto("float8"),
    "quanto int4": lambda: _quanto("int4"),
    "quanto int2": lambda: _quanto("int2"),
    **{f"gguf {q}": (lambda q=q: _gguf(q)) for q in ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K",
                                                      "Q5_0", "Q5_1")},
    "gguf Q8_0 float32 compute": lambda: _gguf("Q8_0", torch.float32),
    "modelopt INT8": lambda: _modelopt(NVIDIAModelOptConfig("INT8", channel_quantize=0)),
    "modelopt FP8": lambda: _modelopt(NVIDIAModelOptConfig("FP8")),
}


@pytest.fixture(autouse=True)
def _fresh_scratch():
    fl.clear_scratch()
    yield
    fl.clear_scratch()


@pytest.mark.parametrize("rows", [1, 3, 100])
@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_layer_fast_path_matches_reference(case, rows):
    layer = LAYER_CASES[case]()
    x = _x(rows).reshape(1, rows, K)
    with torch.no_grad():
        y, ref = layer(x), _reference(layer, x)
    assert y.dtype == ref.dtype and y.shape == ref.shape == (1, rows, N)
    w = layer.dequantized_weight().float()
    bound = x.float().abs() @ w.abs().t() * 2.0**-7 + 2.0**-7 * (layer.bias.float().abs() + 1e-3)
    # int8 dynamic and the dequantize path repeat the reference's ops (quanto's own int8
    # reference is its packed kernel at every row count)
    if case == "torchao int8dq" or (rows > 64 and case != "quanto int8"):
        assert torch.equal(y, ref)
    assert ((y.float() - ref.float()).abs() <= bound).all()
    assert layer._fast is not None  # the fast path ran


@pytest.mark.parametrize("case", ["gguf Q8_0", "torchao int4wo"])
def test_layers_hold_their_stored_pieces_and_nothing_else(case):
    layer = _gguf("Q8_0") if case.startswith("gguf") else _torchao("int4wo", group_size=64)
    before = layer.state_dict()
    held = layer.get_memory_footprint() if hasattr(layer, "get_memory_footprint") else None
    with torch.no_grad():
        for rows in (100, 1, 4):
            layer(_x(rows))
    prepared = layer._fast[2]
    assert prepared.packed is None and prepared.make_packed is None
    assert held is None or layer.get_memory_footprint() == held
    after = layer.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)



def test_in_place_change_of_a_stored_tensor_rebuilds_the_fast_form():
    layer = _torchao("int4wo", group_size=64)
    x = _x(1)
    with torch.no_grad():
        y0 = layer(x)
        layer.weight_scale.mul_(2)           # e.g. load_state_dict copies into the buffers
        y1 = layer(x)
        ref = _reference(layer, x)
    assert not torch.equal(y0, y1)
    w = layer.dequantized_weight().float()
    assert ((y1.float() - ref.float()).abs() <= x.float().abs() @ w.abs().t() * 2.0**-7 + 1e-2).all()


def test_move_or_cast_drops_the_fast_form_and_autograd_takes_the_reference():
    layer = _gguf("Q4_0")
    with torch.no_grad():
        layer(_x(2))
    assert layer._fast is not None
    layer.to("cpu")
    assert layer._fast is None
    x = _x(2).requires_grad_()
    y = layer(x)                             # the reference path: differentiable
    y.sum().backward()
    assert x.grad is not None and layer._fast is None


def test_quantize_on_load_reads_into_a_reused_buffer_but_keeps_no_view_of_it(tmp_path):
    """modeling._assign_from reads weights quantized on load into one reused buffer; a backend
    that keeps a view of it (GGUF keeps rows that do not fit its blocks as BF16 bytes) gets a
    copy, so later reads do not overwrite the layer."""
    from diffquant.quantizers.gguf import GGUFQuantizationConfig
    from tests.toy import ToyModel, save_toy

    ref = save_toy(tmp_path, width=48, hidden=64)   # proj_in: rows of 48, not blocks of 32
    model = ToyModel.from_pretrained(tmp_path, quantization_config=GGUFQuantizationConfig(
        BF16, quant_type="Q4_0"), torch_dtype=BF16)
    assert model.proj_in.qtype.name == "BF16" and model.blocks[0].qtype.name == "Q4_0"
    assert torch.equal(model.proj_in.dequantized_weight().to(BF16), ref.proj_in.weight.detach())
    ptrs = [m.weight.untyped_storage().data_ptr() for m in model.modules() if isinstance(m, GGUFLinear)]
    assert len(set(ptrs)) == len(ptrs)


@pytest.mark.parametrize("rows", [1, 3, 64])
def test_quanto_int4_few_rows_are_within_bf16_rounding_of_quantos_own_layer(rows):
    # quanto's own int4 layer (bf16 scales, groups of 128) runs torch's int4pack kernel on a
    # CPU, on a copy in that kernel's layout; diffquant keeps only the stored pieces and decodes
    # them (quanto's bf16 weights, bit for bit), then one matmul: within bf16 rounding.
    from optimum.quanto import freeze, qint4, quantize

    torch.manual_seed(0)
    theirs = nn.Sequential(nn.Linear(K, N).to(BF16))
    w, b = theirs[0].weight.detach().clone(), theirs[0].bias.detach().clone()
    quantize(theirs, weights=qint4)
    freeze(theirs)
    assert type(theirs[0].weight).__name__ == "TinyGemmWeightQBitsTensor"
    ours = _quanto("int4")
    ours.load_piece("weight", w, pre_quantized=False, dtype=BF16, device=None)
    ours.bias = nn.Parameter(b, requires_grad=False)
    x = _x(rows)
    with torch.no_grad():  # quanto's int4 layer fails under inference_mode
        y, ref = ours(x), theirs(x)
    w_ref = ours.dequantized_weight().float()
    # each side: its product and its + bias rounded to bf16 once
    bound = (x.float().abs() @ w_ref.abs().t() + b.float().abs()) * 2.0**-7 + 1e-6
    assert ((y.float() - ref.float()).abs() <= bound).all()
    assert ours._fast[2].packed is None
