"""diffusers' LoRA API on diffquant's Flux pipeline and transformer: outputs equal diffusers'
(which loads through PEFT) on the same tiny pipeline and adapters; set_adapters, the call-time
scale, disable/enable, delete, unload and unfuse give the expected outputs exactly; saved LoRA
files load back (and in diffusers)."""

from __future__ import annotations

import logging

import pytest
import torch

from tests import lora_files as lf
from tests.tiny_pipeline import TINY_PROMPT, build_tiny_flux_pipeline_dir

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_flux_pipeline_dir(tmp_path_factory.mktemp("lora") / "pipe")


def _transformer(tiny):
    from diffquant import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(tiny / "transformer")


def _inputs(seed=0, tokens=8):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, tokens, 16, generator=g),
                encoder_hidden_states=torch.randn(1, 6, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.7]),
                img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(6, 3),
                guidance=torch.tensor([3.5]), return_dict=False)


def _run(model, **kwargs):
    with torch.no_grad():
        return model(**_inputs(), **kwargs)[0]


def _adapter(model, seed, alpha=None, std=0.1):
    return lf.diffusers_format(model, seed=seed, alpha=alpha, std=std)


def _call(pipe, **kwargs):
    return pipe(TINY_PROMPT, num_inference_steps=2, max_sequence_length=16, output_type="latent",
                height=32, width=32, generator=torch.Generator().manual_seed(0), **kwargs).images


def test_pipeline_outputs_equal_diffusers(tiny):
    """A kohya file (with CLIP keys) and an XLabs file as two adapters: each alone, together at
    set_adapters weights with a call-time scale, then fused: diffusers' outputs each time."""
    import diffusers

    import diffquant

    ref = diffusers.FluxPipeline.from_pretrained(tiny)
    mine = diffquant.FluxPipeline.from_pretrained(tiny)
    for pipe in (ref, mine):  # a fresh dict each: diffusers scales CLIP's factors in place
        pipe.load_lora_weights(lf.kohya(seed=1, alpha=2.0, modules=lf.NO_LINEAR1,
                                        dtype=torch.float32), adapter_name="kohya")
        pipe.load_lora_weights(lf.xlabs(seed=2), adapter_name="xlabs")
    assert mine.get_list_adapters() == ref.get_list_adapters() == \
        {"transformer": ["kohya", "xlabs"], "text_encoder": ["kohya"]}
    # the transformer runs xlabs, CLIP still kohya (the XLabs file has no CLIP keys); diffusers
    # answers with the last component that has adapters
    assert mine.transformer.active_adapters() == ["xlabs"]
    assert mine.get_active_adapters() == ref.get_active_adapters() == ["kohya"]
    base = _call(diffquant.FluxPipeline.from_pretrained(tiny))
    steps = [lambda p: None,
             lambda p: p.set_adapters(["kohya", "xlabs"], adapter_weights=[0.75, 1.5]),
             lambda p: p.fuse_lora()]
    for i, step in enumerate(steps):
        for pipe in (ref, mine):
            step(pipe)
        scale = {"joint_attention_kwargs": {"scale": 0.5}} if i == 1 else {}
        got, want = _call(mine, **scale), _call(ref, **scale)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
        assert (got - base).abs().max() > 1e-2  # the adapters did something


def test_set_adapters_and_scale_are_exact(tiny):
    """Weights w on adapters of alpha a run exactly as adapters of alpha w * a at weight 1 (the
    weights are powers of two, so the products are exact); the call-time scale multiplies
    every weight; a zero-weight or inactive adapter contributes nothing at all."""
    m, ref = _transformer(tiny), _transformer(tiny)
    a, b = _adapter(m, 1, alpha=2.0), _adapter(m, 2, alpha=8.0)
    m.load_lora_adapter(a, adapter_name="a")
    m.load_lora_adapter(b, adapter_name="b")
    m.set_adapters(["a", "b"], [0.5, 2.0])
    ref.load_lora_adapter({k: torch.tensor(1.0) if k.endswith("alpha") else v for k, v in a.items()},
                          adapter_name="a")
    ref.load_lora_adapter({k: torch.tensor(16.0) if k.endswith("alpha") else v for k, v in b.items()},
                          adapter_name="b")
    ref.set_adapters(["a", "b"])
    assert torch.equal(_run(m), _run(ref))
    m.set_adapters(["a", "b"], [0.25, 1.0])
    assert torch.equal(_run(ref, joint_attention_kwargs={"scale": 0.5}), _run(m))
    only_a = _transformer(tiny)
    only_a.load_lora_adapter(a, adapter_name="a")
    m.set_adapters("a")
    assert m.active_adapters() == ["a"] and torch.equal(_run(m), _run(only_a))
    m.set_adapters(["a", "b"], [1.0, 0.0])
    assert torch.equal(_run(m), _run(only_a))


def test_disable_enable_fuse_unfuse_delete_unload_are_exact(tiny):
    m = _transformer(tiny)
    base, keys, size = _run(m), list(m.state_dict()), m.get_memory_footprint()
    lora = _adapter(m, 3)
    m.load_lora_adapter(lora, adapter_name="a")
    with_lora = _run(m)
    adapter_bytes = sum(v.numel() * v.element_size() for v in lora.values())
    assert m.get_memory_footprint() == size + adapter_bytes  # the adapters are the model's memory
    assert list(m.state_dict()) == keys                      # ...but not its checkpoint
    m.disable_lora()
    assert torch.equal(_run(m), base)
    m.enable_lora()
    assert torch.equal(_run(m), with_lora)
    m.fuse_lora()
    torch.testing.assert_close(_run(m), with_lora, rtol=1e-5, atol=1e-5)
    m.unfuse_lora()
    assert torch.equal(_run(m), with_lora)
    m.fuse_lora()
    m.disable_lora()  # unfuses first, as PEFT's forward does
    assert torch.equal(_run(m), base)
    m.enable_lora()
    m.load_lora_adapter(_adapter(m, 4), adapter_name="b")
    m.delete_adapters("b")
    assert m.list_adapters() == ["a"] and m.active_adapters() == []
    m.set_adapters("a")
    assert torch.equal(_run(m), with_lora)
    m.unload_lora()
    assert torch.equal(_run(m), base) and m.get_memory_footprint() == size
    assert not any(mod._forward_hooks for mod in m.modules())


def test_fuse_then_unload_keeps_the_fused_weights_and_saves_them(tiny, tmp_path):
    """diffusers' recipe to bake a LoRA in: fuse_lora, unload_lora_weights, save_pretrained."""
    from diffquant import FluxTransformer2DModel

    m = _transformer(tiny)
    m.load_lora_adapter(_adapter(m, 5), adapter_name="a")
    m.fuse_lora(lora_scale=0.5)
    fused = _run(m)
    m.set_adapters("a", 0.5)
    m.unfuse_lora()
    torch.testing.assert_close(_run(m), fused, rtol=1e-5, atol=1e-5)  # fused at half strength
    m.fuse_lora()
    fused = _run(m)
    m.unload_lora()
    assert torch.equal(_run(m), fused)
    m.save_pretrained(tmp_path / "baked")
    assert torch.equal(_run(FluxTransformer2DModel.from_pretrained(tmp_path / "baked")), fused)


def test_save_lora_weights_round_trip(tiny, tmp_path):
    """save_lora_weights then load_lora_weights gives the same outputs bit for bit (alphas are
    written as diffusers' '.alpha' keys); diffusers reads the file to the same tensors."""
    import diffusers

    import diffquant

    pipe = diffquant.FluxPipeline.from_pretrained(tiny)
    sd = {**lf.diffusers_format(pipe.transformer, seed=6, alpha=2.0),
          **lf.diffusers_format(pipe.text_encoder, seed=7, component="text_encoder",
                                where=lambda n: "layers" in n)}
    pipe.load_lora_weights(sd, adapter_name="a")
    path = pipe.save_lora_weights(tmp_path / "lora", adapter_name="a")
    assert path.name == "pytorch_lora_weights.safetensors"
    again = diffquant.FluxPipeline.from_pretrained(tiny)
    again.load_lora_weights(tmp_path / "lora")
    assert again.get_list_adapters() == {"transformer": ["default_0"], "text_encoder": ["default_0"]}
    assert torch.equal(_call(pipe), _call(again))
    theirs, alphas = diffusers.FluxPipeline.lora_state_dict(tmp_path / "lora", return_alphas=True)
    mine, my_alphas = diffquant.FluxPipeline.lora_state_dict(tmp_path / "lora", return_alphas=True)
    assert sorted(theirs) == sorted(mine) and all(torch.equal(theirs[k], mine[k]) for k in mine)
    assert {k: float(v) for k, v in alphas.items()} == my_alphas
    m = _transformer(tiny)
    m.load_lora_adapter(sd, adapter_name="x")
    m.save_lora_adapter(tmp_path / "t", weight_name="t.safetensors")
    m2 = _transformer(tiny)
    m2.load_lora_adapter(tmp_path / "t", weight_name="t.safetensors")
    assert torch.equal(_run(m), _run(m2))


def test_bad_adapters_name_the_file_key_and_layer(tiny, tmp_path, caplog):
    from safetensors.torch import save_file

    from diffquant import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny)
    path = tmp_path / "bad.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_qq.lora_A.weight": torch.ones(2, 32),
               "transformer.transformer_blocks.0.attn.to_qq.lora_B.weight": torch.ones(32, 2)}, path)
    with pytest.raises(ValueError, match=r"bad\.safetensors: LoRA key 'transformer\.transformer_blocks"
                                         r"\.0\.attn\.to_qq\.lora_A\.weight' targets layer 'transformer_"
                                         r"blocks\.0\.attn\.to_qq', but FluxTransformer2DModel has no "
                                         r"such layer"):
        pipe.load_lora_weights(path)
    save_file({"transformer.proj_out.lora_A.weight": torch.ones(2, 3072),
               "transformer.proj_out.lora_B.weight": torch.ones(64, 2)}, path)
    with pytest.raises(ValueError, match=r"bad\.safetensors: LoRA key 'transformer\.proj_out\.lora_A"
                                         r"\.weight' does not fit layer 'proj_out' of FluxTransformer2D"
                                         r"Model \(\[16, 32\]\): down \[2, 3072\], up \[64, 2\]"):
        pipe.load_lora_weights(path)  # a FLUX.1-sized LoRA on another model
    assert pipe.get_list_adapters() == {}
    kohya = lf.kohya(seed=8, modules={"double_blocks.0.img_mod.lin": (192, 32)}, clip=False)
    kohya["lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"] = torch.ones(2, 32)
    kohya["lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight"] = torch.ones(32, 2)
    with caplog.at_level(logging.WARNING, logger="diffquant.lora.pipeline"):
        pipe.load_lora_weights(kohya, adapter_name="k")
    assert "LoRA state dict: 2 LoRA keys ignored" in caplog.text and "lora_te2_encoder" in caplog.text
    clip_key = "lora_te1_text_model_encoder_layers_99_self_attn_q_proj"
    wrong = {**kohya, f"{clip_key}.lora_down.weight": torch.ones(2, 32),
             f"{clip_key}.lora_up.weight": torch.ones(32, 2)}
    with pytest.raises(ValueError, match=rf"LoRA state dict: LoRA key '{clip_key}\.lora_down\.weight'"
                                         r" targets layer 'encoder\.layers\.99\.self_attn\.q_proj', "
                                         r"but CLIPTextModel has no such layer"):
        pipe.load_lora_weights(wrong, adapter_name="w")
    assert pipe.get_list_adapters() == {"transformer": ["k"]}
    with pytest.raises(ValueError, match="adapter name 'k' is already in use"):
        pipe.load_lora_weights(kohya, adapter_name="k")
    with pytest.raises(ValueError, match=r"set_adapters: \['x'\] not loaded"):
        pipe.set_adapters(["x"])


def test_chroma_and_kontext_take_loras():
    """ChromaTransformer2DModel has the API; a call-time scale of 0 is its base output."""
    from tests.tiny_flux_siblings import CHROMA_CONFIG

    from diffquant import ChromaTransformer2DModel, FluxKontextPipeline

    torch.manual_seed(0)
    m = ChromaTransformer2DModel(**CHROMA_CONFIG)
    g = torch.Generator().manual_seed(0)
    x = dict(hidden_states=torch.randn(1, 4, 16, generator=g),
             encoder_hidden_states=torch.randn(1, 3, CHROMA_CONFIG["joint_attention_dim"], generator=g),
             timestep=torch.tensor([0.5]), img_ids=torch.zeros(4, 3), txt_ids=torch.zeros(3, 3),
             return_dict=False)
    with torch.no_grad():
        base = m(**x)[0]
        m.load_lora_adapter(lf.diffusers_format(m, seed=9, std=0.3), adapter_name="c")
        assert (m(**x)[0] - base).abs().max() > 1e-3
        assert torch.equal(m(**x, joint_attention_kwargs={"scale": 0.0})[0], base)
    assert hasattr(FluxKontextPipeline, "load_lora_weights")


@pytest.mark.parametrize("wide", [False, True], ids=["bf16-kernel", "float32-route"])
def test_branch_sums_once_in_its_dtype(monkeypatch, wide):
    """bf16 activations: where the CPU has no bf16 matmul kernel (ops/cpu/dispatch.py's rule) the
    adapters' products are added to the output in float32, rounded once, else
    they accumulate onto it in bf16; either way close to the exact sum."""
    import torch.nn.functional as F

    from diffquant.lora.layer import LoraFactors, add_products
    from diffquant.ops.cpu import dispatch

    monkeypatch.setattr(dispatch, "_float32_faster", {torch.bfloat16: wide})
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(2, 5, 32, generator=g).bfloat16(), torch.randn(2, 5, 48, generator=g).bfloat16()
    a = LoraFactors(torch.randn(4, 32, generator=g).bfloat16(), torch.randn(48, 4, generator=g).bfloat16(), 8.0)
    b = LoraFactors(torch.randn(2, 16, generator=g).bfloat16(), torch.randn(48, 2, generator=g).bfloat16(), None)
    got = add_products(out, x, [(a, 0.5), (b, 1.0)])
    dtype = torch.float32 if wide else torch.bfloat16
    h_a = F.linear(x.to(dtype), a.down.to(dtype)).reshape(10, 4) * 0.5
    h_b = F.linear(x[..., :16].to(dtype), b.down.to(dtype)).reshape(10, 2)
    if wide:  # the products added to out in float32, then one rounding
        want = torch.addmm(torch.addmm(out.reshape(10, 48).float(), h_a, a.up.float().t()), h_b,
                           b.up.float().t()).bfloat16()
    else:     # accumulated onto out in bf16
        want = torch.addmm(torch.addmm(out.reshape(10, 48), h_a, a.up.t()), h_b, b.up.t())
    assert got.dtype == torch.bfloat16 and torch.equal(got, want.view(2, 5, 48))
    exact = out.double() + 0.5 * x.double() @ a.down.double().T @ a.up.double().T \
        + x[..., :16].double() @ b.down.double().T @ b.up.double().T
    torch.testing.assert_close(got.double(), exact, rtol=2e-2, atol=0.1)
    # adapters of one input width are stacked into one pair of products: the same sum
    c = LoraFactors(torch.randn(3, 32, generator=g).bfloat16(), torch.randn(48, 3, generator=g).bfloat16(), None)
    both = add_products(out, x, [(a, 0.5), (c, 2.0)]).double()
    torch.testing.assert_close(both, out.double() + 0.5 * x.double() @ a.down.double().T @ a.up.double().T
                               + 2.0 * x.double() @ c.down.double().T @ c.up.double().T, rtol=2e-2, atol=0.1)


def test_cli_lora_flag(tiny, tmp_path):
    """generate --lora FILE[:SCALE]: a strength of 0 gives the image without it, 1 another one;
    compare passes the flags to each variant's process; a missing file is a usage error."""
    import argparse

    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    from diffquant.cli.commands import _child_command
    from tests.test_cli import main_in_process

    from diffquant import FluxTransformer2DModel

    path = tmp_path / "style.safetensors"
    save_file(lf.diffusers_format(FluxTransformer2DModel.from_pretrained(tiny / "transformer"),
                                  seed=10, std=0.3), path)
    run = ["generate", "--model", tiny, "--prompt", TINY_PROMPT, "--steps", 1, "--height", 32,
           "--width", 32, "--max-sequence-length", 16, "-q"]
    images = []
    for i, extra in enumerate([[], ["--lora", f"{path}:0"], ["--lora", str(path)]]):
        assert main_in_process(*run, "--out", tmp_path / f"{i}.png", *extra) == 0
        images.append(np.asarray(Image.open(tmp_path / f"{i}.png")))
    assert np.array_equal(images[0], images[1]) and not np.array_equal(images[0], images[2])
    assert main_in_process(*run, "--out", tmp_path / "x.png", "--lora", tmp_path / "no.safetensors") == 2
    args = argparse.Namespace(prompt="p", steps=1, seed=0, dtype="auto", device="cpu", fps=16,
                              height=None, width=None, max_sequence_length=None, num_frames=None,
                              image=None, quiet=True, debug=False, lora=["a.safetensors:0.5", "b"])
    cmd = _child_command(args, "m", ["gguf:q8_0"], tmp_path / "i.png", tmp_path / "s.json")
    assert cmd[cmd.index("--lora"):cmd.index("--lora") + 4] == ["--lora", "a.safetensors:0.5",
                                                                  "--lora", "b"]
