"""LoRA on a quantized transformer, for every backend and scheme the CLI lists.

The adapter is a branch beside the quantized product, so: the quantized model with a LoRA
differs from the unquantized one with the same LoRA by no more than the quantization error
alone; each quantized layer's output grows by exactly the adapter's product; fuse_lora
re-quantizes into the same format (one more rounding of the summed weight) and unfuse_lora
gives the stored tensors, so the outputs, back bit for bit."""

from __future__ import annotations

import logging

import pytest
import torch

from diffquant.spec import available_backends, backend_schemes, diffquant_config, parse_spec
from tests import lora_files as lf
from tests.tiny_pipeline import build_tiny_flux_pipeline_dir

pytestmark = pytest.mark.usefixtures("one_thread")
SCHEMES = [f"{b}:{s}" for b in available_backends() for s in backend_schemes(b)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(transformer dir, LoRA, inputs, unquantized output, unquantized output with the LoRA)."""
    from diffquant import FluxTransformer2DModel

    tiny = build_tiny_flux_pipeline_dir(tmp_path_factory.mktemp("lora-q") / "pipe")
    model = FluxTransformer2DModel.from_pretrained(tiny / "transformer")
    lora = lf.diffusers_format(model, seed=1, std=0.08)  # an effect ~10% of the output
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 16, generator=g),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                  pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                  img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]),
                  return_dict=False)
    base = _run(model, inputs)
    model.load_lora_adapter(lora, adapter_name="a")
    return tiny / "transformer", lora, inputs, base, _run(model, inputs)


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def _norm(t):
    return t.norm().item()


@pytest.mark.parametrize("text", SCHEMES)
def test_lora_on_every_scheme(reference, text, caplog):
    from diffquant import FluxTransformer2DModel
    from diffquant.quantizers.base import QuantizedLinear

    path, lora, inputs, base, with_lora = reference
    caplog.set_level(logging.ERROR)
    q = FluxTransformer2DModel.from_pretrained(path, quantization_config=diffquant_config(
        parse_spec(text)), torch_dtype=torch.float32)
    q_base = _run(q, inputs)
    stored = {k: v.clone() for k, v in q.state_dict().items()}
    q.load_lora_adapter(lora, adapter_name="a")
    q_lora = _run(q, inputs)
    quant_error = _norm(q_base - base)
    # the quantized model with the LoRA is about as far from the unquantized one with it as the
    # quantization alone makes it (the LoRA moves the activations the quantized layers see, and
    # back: within 1.25x where few layers are quantized, K-quants on the tiny model's rows; 1.1x
    # elsewhere), and the adapter acts as it does unquantized
    assert _norm(q_lora - with_lora) <= 1.5 * quant_error + 1e-5, text
    assert _norm((q_lora - q_base) - (with_lora - base)) <= 0.5 * _norm(with_lora - base), text

    # one quantized layer: its output grows by exactly the adapter's product
    name, layer = next((n, m) for n, m in q.named_modules() if isinstance(m, QuantizedLinear))
    factors = q.lora_layers.target(name).adapters["a"]
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = layer(x)
        q.disable_lora()
        plain = layer(x)
        q.enable_lora()
    torch.testing.assert_close(got - plain, (x @ factors.down.T) @ factors.up.T * factors.scale,
                               rtol=1e-4, atol=1e-5)

    q.fuse_lora()  # dequantize + delta, quantized again in the same format
    fused = _run(q, inputs)
    assert type(layer) is type(q.get_submodule(name))
    layout = lambda sd: {k: (v.dtype, "quant_state" in k or v.shape) for k, v in sd.items()}  # noqa: E731
    assert layout(q.state_dict()) == layout(stored)  # bitsandbytes' JSON blob may change length
    assert _norm(fused - with_lora) <= 3.0 * quant_error + 1e-5, text  # fusing rounds again
    q.unfuse_lora()
    assert torch.equal(_run(q, inputs), q_lora), text
    assert all(torch.equal(v, stored[k]) for k, v in q.state_dict().items()), text
    q.disable_lora()
    assert torch.equal(_run(q, inputs), q_base), text
    q.enable_lora()  # dequantize() makes new nn.Linears: the adapters follow them
    q.dequantize()
    dq_lora = _run(q, inputs)
    q.disable_lora()
    effect = dq_lora - _run(q, inputs)
    assert _norm(effect - (q_lora - q_base)) <= 0.5 * _norm(with_lora - base), text


@pytest.mark.parametrize("text", SCHEMES)
def test_few_row_calls_keep_their_kernels(text):
    """The branch is added after the layer's own forward: at one row (modulation, embedders)
    and a few rows, the quantized layer runs the same C kernels and torch ops with an adapter
    as without (the probe's record), the adapter's products only after them."""
    from diffquant import cpu_paths
    from diffquant.lora.layer import LoraFactors, LoraState, LoraTarget

    model = cpu_paths._layer(text, 256, 512)
    g = torch.Generator().manual_seed(0)
    target = LoraTarget(LoraState(active=["a"], weights={"a": 1.0}))
    target.adapters["a"] = LoraFactors(torch.randn(8, 512, generator=g).bfloat16(),
                                       torch.randn(256, 8, generator=g).bfloat16(), None)
    for rows in (1, 4):
        cpu_paths._paths(model, rows, 512)  # first calls prepare (pack, decode scales) once
        base = cpu_paths._paths(model, rows, 512)
        target.attach(model[0])
        with_lora = cpu_paths._paths(model, rows, 512)
        target.detach()
        assert with_lora.startswith(base) and with_lora != base, (text, rows, base, with_lora)
