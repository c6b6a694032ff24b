"""Q4_K / Q6_K quantizers (diffquant.ops.formats.gguf_kquant): valid ggml blocks,
quantize-on-load, export.

gguf-py cannot write K-quants, so the blocks are judged by what reads them: gguf-py's numpy
dequantization (bit for bit equal to diffquant's), the error against the float weights, and
diffusers' GGUF loader reading an exported file.
"""

import json

import diffusers
import gguf
import numpy as np
import pytest
import torch

from diffquant import FluxTransformer2DModel, GGUFQuantizationConfig
from diffquant.errors import QuantizationError
from diffquant.ops.formats import gguf_kquant
from diffquant.ops.formats.gguf import dequantize, quantize
from diffquant.ops.formats.gguf_kquant import quantize_q4_k, quantize_q5_k, quantize_q6_k
from diffquant.quantizers.gguf import GGUFLinear
from diffquant.single_file import export_gguf
from tests.toy import ToyModel, flux_inputs, gguf_reference, save_toy, toy_input

KQUANTS = {"Q4_K": (quantize_q4_k, 144), "Q5_K": (quantize_q5_k, 176), "Q6_K": (quantize_q6_k, 210)}
# relative RMS error on Gaussian weights: measured 0.0711 (Q4_K), 0.0358 (Q5_K) and 0.0177
# (Q6_K), as ggml's C reference gives; the plain min-max / absmax variants give 0.0787 (Q4_K)
# and 0.0221 (Q6_K), so these bounds also pin the scale searches.
RMS_BOUND = {"Q4_K": 0.0725, "Q5_K": 0.037, "Q6_K": 0.019}


def _rel_rms(got, want):
    return ((got - want).norm() / want.norm()).item()


def _weights():
    """Gaussian rows plus super-blocks ggml treats specially (rows 32..35)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(36, 1024, generator=g)
    w[32, :256] = 0                   # all-zero super-block: scale 0 (Q6_K: all bytes 0)
    w[33, :256] = 1.5                 # constant positive super-block: min clamps to 0
    w[34, :256] = w[34, :256].abs()   # all positive
    w[35, 7] = -w[35, :256].abs().max() - 1  # largest magnitude negative: signed Q6_K scales
    return w


@pytest.mark.parametrize("qtype", sorted(KQUANTS))
def test_blocks_decode_in_gguf_py_as_in_diffquant(qtype):
    fn, size = KQUANTS[qtype]
    w = _weights()
    blocks = fn(w)
    assert blocks.dtype == torch.uint8 and tuple(blocks.shape) == (36, 1024 // 256 * size)
    assert torch.equal(quantize(w, qtype), blocks)      # the path every loader and export takes
    ours = dequantize(blocks, qtype)
    theirs = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType[qtype])
    np.testing.assert_array_equal(ours.numpy(), theirs)
    assert _rel_rms(ours[:32], w[:32]) < RMS_BOUND[qtype]
    assert torch.equal(ours[32, :256], torch.zeros(256))
    assert (ours[33, :256] - 1.5).abs().max() < 2e-3 and _rel_rms(ours[34:], w[34:]) < RMS_BOUND[qtype]
    if qtype == "Q6_K":
        assert not blocks[32, :size].any()  # ggml memsets an all-zero super-block


@pytest.mark.parametrize("qtype", sorted(KQUANTS))
def test_chunking_and_input_dtype_do_not_change_the_bytes(qtype, monkeypatch):
    fn, _ = KQUANTS[qtype]
    w = torch.randn(6, 512).to(torch.bfloat16)
    whole = fn(w)
    monkeypatch.setattr(gguf_kquant, "_CHUNK", 5)  # 12 super-blocks in passes of 5, 5, 2
    assert torch.equal(fn(w), whole) and torch.equal(fn(w.float()), whole)
    assert tuple(fn(torch.randn(2, 3, 256)).shape) == (2, 3, KQUANTS[qtype][1])


def test_rows_not_a_multiple_of_256_are_refused():
    with pytest.raises(QuantizationError, match=r"GGUF Q4_K: weight of shape \[3, 100\] cannot be "
                                                 r"quantized: the row length \(last dim\) must be a "
                                                 r"multiple of 256"):
        quantize_q4_k(torch.zeros(3, 100))
    with pytest.raises(QuantizationError, match=r"GGUF Q6_K: weight of shape \[2, 288\]"):
        quantize_q6_k(torch.zeros(2, 288))
    with pytest.raises(QuantizationError, match=r"GGUF Q6_K: row length 288 is not a multiple of "
                                                 r"the block size 256"):
        quantize(torch.zeros(2, 288), "Q6_K")


# -- quantize on load, save, reload ------------------------------------------------------------
@pytest.mark.parametrize("qtype,compute", [("Q4_K", torch.bfloat16), ("Q6_K", torch.float32)])
def test_quantize_on_load_save_reload(tmp_path, qtype, compute):
    ref = save_toy(tmp_path / "bf16")        # proj_in rows of 128: kept in bf16, as for Q8_0 & co
    config = GGUFQuantizationConfig(compute, quant_type=qtype)
    assert config.bits == int(qtype[1]) and GGUFQuantizationConfig.from_dict(config.to_dict()) == config
    model = ToyModel.from_pretrained(tmp_path / "bf16", quantization_config=config,
                                     torch_dtype=torch.bfloat16)
    assert model.proj_in.qtype.name == "BF16"
    for layer in (model.blocks[0], model.blocks[1], model.proj_out):
        assert isinstance(layer, GGUFLinear) and layer.qtype.name == qtype
    assert tuple(model.proj_out.weight.shape) == (128, KQUANTS[qtype][1])
    x = toy_input(rows=80)  # above the packed kernels' row limits: the reference math exactly
    with torch.no_grad():
        out = model(x)
    assert torch.equal(out, gguf_reference(ref, x, qtype, compute))

    model.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["quant_type"] == qtype
    again = ToyModel.from_pretrained(tmp_path / "q")
    assert again.hf_quantizer.quantization_config == config
    assert torch.equal(again.blocks[0].weight, model.blocks[0].weight)
    with torch.no_grad():
        assert torch.equal(again(x), out)
        assert torch.equal(again(x[:3]), model(x[:3]))  # the few-row (fast) path agrees too


# -- export_gguf -> gguf-py and diffusers -------------------------------------------------------
WIDE = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=64,
            num_attention_heads=4, joint_attention_dim=256, pooled_projection_dim=256,
            axes_dims_rope=(8, 28, 28), guidance_embeds=True)   # rows of 256 almost everywhere


@pytest.fixture(scope="module")
def wide_flux(tmp_path_factory):
    root = tmp_path_factory.mktemp("wide")
    ref = diffusers.FluxTransformer2DModel(**WIDE).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    ref.save_pretrained(root / "config")
    return root / "config"


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])  # Q5_K: tests/test_gguf_export.py (Q4_K_M)
def test_export_gguf_reads_back_in_gguf_py_and_diffusers(wide_flux, tmp_path, qtype):
    plain = FluxTransformer2DModel.from_pretrained(wide_flux)
    path = export_gguf(plain, tmp_path / "out.gguf", qtype, layout="diffusers")
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    types = {name: t.tensor_type.name for name, t in tensors.items()}
    assert set(types) == set(plain.state_dict())
    assert types["transformer_blocks.0.attn.to_q.weight"] == qtype
    assert types["single_transformer_blocks.0.proj_out.weight"] == qtype  # rows of 1280
    assert types["x_embedder.weight"] == "BF16"  # an embedder: kept in the float type
    assert types["transformer_blocks.0.attn.to_q.bias"] == "F32"
    # gguf-py reads the raw blocks; its dequantization is the float reference model's weights
    reference = diffusers.FluxTransformer2DModel.from_pretrained(wide_flux).eval()
    state = {}
    for key, value in plain.state_dict().items():
        data = np.array(tensors[key].data)
        w = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[types[key]])
        state[key] = torch.from_numpy(np.array(w, np.float32)).reshape(value.shape)
    reference.load_state_dict(state)
    with torch.no_grad():
        expected = reference(**flux_inputs(64, 256)).sample
        ours_model = FluxTransformer2DModel.from_single_file(
            path, quantization_config=GGUFQuantizationConfig(), config=wide_flux)
        ours = ours_model(**flux_inputs(64, 256)).sample
        theirs_model = diffusers.FluxTransformer2DModel.from_single_file(
            str(path), quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=torch.float32),
            config=str(wide_flux), torch_dtype=torch.float32)
        theirs = theirs_model(**flux_inputs(64, 256)).sample
    layer = ours_model.transformer_blocks[0].attn.to_q
    assert layer.qtype.name == qtype
    assert torch.equal(layer.weight, quantize(plain.transformer_blocks[0].attn.to_q.weight, qtype))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    # diffusers dequantizes K-quants in float16 (the scales' dtype): its weights are ours up to
    # half-precision rounding, and so are its outputs
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    for name, module in ours_model.named_modules():
        if isinstance(module, GGUFLinear) and module.qtype.name == qtype:
            theirs_w = dequantize_gguf_tensor(theirs_model.get_submodule(name).weight).float()
            torch.testing.assert_close(theirs_w, module.dequantized_weight(), atol=2e-4, rtol=2e-3)
    torch.testing.assert_close(theirs, ours, atol=0.01, rtol=0)  # measured 0.0055 (Q4_K), outputs ~3
