"""Parity of diffquant's Flux models with diffusers 0.42.1, the oracle, in both directions.

Tiny random models are built with one library, saved, loaded with the other, and run on the
same inputs; float32 outputs must agree within 1e-5.
"""

import json

import pytest
import torch

import diffusers
from diffquant import AutoencoderKL, FluxTransformer2DModel
from diffquant.errors import ConfigError

ATOL = 1e-5

TINY_FLUX = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                 pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))


def _flux_inputs(guidance: bool, batch: int = 2, height: int = 3, width: int = 4, text: int = 5):
    g = torch.Generator().manual_seed(1)
    img_ids = torch.zeros(height, width, 3)
    img_ids[..., 1] = torch.arange(height)[:, None]
    img_ids[..., 2] = torch.arange(width)[None, :]
    return dict(
        hidden_states=torch.randn(batch, height * width, 16, generator=g),
        encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
        pooled_projections=torch.randn(batch, 32, generator=g),
        timestep=torch.tensor([0.25, 0.8])[:batch],
        img_ids=img_ids.reshape(-1, 3),
        txt_ids=torch.zeros(text, 3),
        guidance=torch.tensor([3.5, 1.0])[:batch] if guidance else None,
    )


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every tensor random values (diffusers zero-inits nothing here, but norms are ones)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


# -- transformer ---------------------------------------------------------------------------
@pytest.mark.parametrize("guidance", [True, False])
def test_flux_transformer_loads_diffusers_checkpoint(tmp_path, guidance):
    ref = diffusers.FluxTransformer2DModel(**TINY_FLUX, guidance_embeds=guidance).eval()
    _randomize(ref)
    ref.save_pretrained(tmp_path)
    ours = FluxTransformer2DModel.from_pretrained(tmp_path)
    assert set(ours.state_dict()) == set(ref.state_dict())
    inputs = _flux_inputs(guidance)
    with torch.no_grad():
        expected = ref(**inputs).sample
        got = ours(**inputs).sample
        got_tuple = ours(**inputs, return_dict=False)
    _assert_close(got, expected)
    assert isinstance(got_tuple, tuple) and torch.equal(got_tuple[0], got)


@pytest.mark.parametrize("guidance", [True, False])
def test_flux_transformer_saves_for_diffusers(tmp_path, guidance):
    torch.manual_seed(0)
    ours = FluxTransformer2DModel(**TINY_FLUX, guidance_embeds=guidance).eval()
    _randomize(ours, seed=3)
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "FluxTransformer2DModel"
    ref = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path).eval()
    inputs = _flux_inputs(guidance)
    with torch.no_grad():
        _assert_close(ours(**inputs).sample, ref(**inputs).sample)


def test_flux_transformer_batched_ids_and_out_channels(tmp_path):
    """3-d ids (deprecated in diffusers) and out_channels != in_channels, patch_size 2."""
    cfg = dict(TINY_FLUX, patch_size=2, out_channels=4)
    ref = diffusers.FluxTransformer2DModel(**cfg, guidance_embeds=False).eval()
    _randomize(ref, seed=5)
    ref.save_pretrained(tmp_path)
    ours = FluxTransformer2DModel.from_pretrained(tmp_path)
    inputs = _flux_inputs(False, batch=1)
    inputs["img_ids"], inputs["txt_ids"] = inputs["img_ids"][None], inputs["txt_ids"][None]
    with torch.no_grad():
        got = ours(**inputs).sample
        _assert_close(got, ref(**inputs).sample)
    assert got.shape == (1, 12, 16)


def test_flux_transformer_bf16_loading(tmp_path):
    ref = diffusers.FluxTransformer2DModel(**TINY_FLUX, guidance_embeds=True).eval()
    _randomize(ref)
    ref.save_pretrained(tmp_path)
    ours = FluxTransformer2DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    ref_bf16 = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    inputs = {k: (v.bfloat16() if k in ("hidden_states", "encoder_hidden_states", "pooled_projections")
                  else v) for k, v in _flux_inputs(True).items()}
    with torch.no_grad():
        got, expected = ours(**inputs).sample, ref_bf16(**inputs).sample
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=0)


def test_flux_transformer_guidance_mismatch_is_loud():
    m = FluxTransformer2DModel(**TINY_FLUX, guidance_embeds=True)
    inputs = _flux_inputs(True)
    inputs["guidance"] = None
    with pytest.raises(ValueError, match="guidance_embeds=True, so forward\\(\\) needs `guidance`"):
        m(**inputs)


def test_flux_transformer_bad_rope_axes_names_file(tmp_path):
    FluxTransformer2DModel(**TINY_FLUX).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["axes_dims_rope"] = [4, 4, 4]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"config.json: cannot build FluxTransformer2DModel.*"
                                          r"axes_dims_rope=\[4, 4, 4\] sums to 12"):
        FluxTransformer2DModel.from_pretrained(tmp_path)


# -- VAE -----------------------------------------------------------------------------------
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                layers_per_block=1, norm_num_groups=4, scaling_factor=0.3611, shift_factor=0.1159)


def _vae_outputs(vae, image: torch.Tensor) -> dict:
    with torch.no_grad():
        posterior = vae.encode(image).latent_dist
        sample = posterior.sample(generator=torch.Generator().manual_seed(7))
        return dict(mean=posterior.mean, std=posterior.std, mode=posterior.mode(), sample=sample,
                    decoded=vae.decode(sample).sample,
                    forward=vae(image, sample_posterior=True,
                                generator=torch.Generator().manual_seed(7)).sample)


@pytest.mark.parametrize("variant", [
    dict(use_quant_conv=False, use_post_quant_conv=False),                          # Flux
    dict(use_quant_conv=True, use_post_quant_conv=True, layers_per_block=2),
    dict(use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False),
])
def test_vae_loads_diffusers_checkpoint(tmp_path, variant):
    ref = diffusers.AutoencoderKL(**{**TINY_VAE, **variant}).eval()
    _randomize(ref, seed=11)
    ref.save_pretrained(tmp_path)
    ours = AutoencoderKL.from_pretrained(tmp_path)
    assert set(ours.state_dict()) == set(ref.state_dict())
    image = torch.randn(2, 3, 16, 12, generator=torch.Generator().manual_seed(2))
    expected, got = _vae_outputs(ref, image), _vae_outputs(ours, image)
    for name in expected:
        _assert_close(got[name], expected[name])
    assert got["decoded"].shape == (2, 3, 16, 12)
    with torch.no_grad():
        (posterior,) = ours.encode(image, return_dict=False)
        (decoded,) = ours.decode(got["sample"], return_dict=False)
    assert torch.equal(posterior.mean, got["mean"]) and torch.equal(decoded, got["decoded"])


def test_vae_saves_for_diffusers(tmp_path):
    torch.manual_seed(0)
    ours = AutoencoderKL(**TINY_VAE, use_quant_conv=False, use_post_quant_conv=False).eval()
    _randomize(ours, seed=13)
    ours.save_pretrained(tmp_path)
    ref = diffusers.AutoencoderKL.from_pretrained(tmp_path).eval()
    assert ref.config.shift_factor == 0.1159 and ref.config.use_quant_conv is False
    image = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    expected, got = _vae_outputs(ref, image), _vae_outputs(ours, image)
    for name in expected:
        _assert_close(got[name], expected[name])


def test_vae_bf16_loading(tmp_path):
    diffusers.AutoencoderKL(**TINY_VAE).save_pretrained(tmp_path)
    ours = AutoencoderKL.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        z = ours.encode(torch.randn(1, 3, 8, 8, dtype=torch.bfloat16)).latent_dist.sample()
    assert z.dtype == torch.bfloat16 and z.shape == (1, 4, 4, 4)


def test_vae_unsupported_block_type_names_file(tmp_path):
    diffusers.AutoencoderKL(**TINY_VAE).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["down_block_types"] = ["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"config.json: cannot build AutoencoderKL.*down_block_types="
                                          r"\['AttnDownEncoderBlock2D', 'DownEncoderBlock2D'\]"):
        AutoencoderKL.from_pretrained(tmp_path)


# -- deep copies (diffusers' models deep-copy: EMA weights, a pipeline's components) -----------
def test_every_model_class_deep_copies_into_an_independent_twin(tmp_path):
    """Each of diffquant's model classes, plain and with its Linear layers quantized: the copy
    gives the same outputs, and zeroing the copy's tensors leaves the original's untouched."""
    import copy

    from diffquant import TorchAoConfig

    flux = diffusers.FluxTransformer2DModel(**TINY_FLUX, guidance_embeds=True).eval()
    _randomize(flux)
    flux.save_pretrained(tmp_path / "flux")
    vae = diffusers.AutoencoderKL(**TINY_VAE).eval()
    _randomize(vae, seed=11)
    vae.save_pretrained(tmp_path / "vae")
    image = torch.randn(1, 3, 16, 12, generator=torch.Generator().manual_seed(2))
    bf16 = {k: v.to(torch.bfloat16) if v is not None and v.is_floating_point() else v
            for k, v in _flux_inputs(True).items()}
    models = [  # (model, its forward on fixed inputs)
        (FluxTransformer2DModel.from_pretrained(tmp_path / "flux"),
         lambda m: m(**_flux_inputs(True)).sample),
        (FluxTransformer2DModel.from_pretrained(tmp_path / "flux", torch_dtype=torch.bfloat16,
                                                quantization_config=TorchAoConfig("int8wo")),
         lambda m: m(**bf16).sample),
        (AutoencoderKL.from_pretrained(tmp_path / "vae"), lambda m: m(image).sample),
    ]
    for model, run in models:
        with torch.no_grad():
            before = run(model)
            twin = copy.deepcopy(model)
            assert type(twin) is type(model) and twin.config == model.config
            assert torch.equal(run(twin), before)
            for t in twin.state_dict().values():
                if t.dtype.is_floating_point:
                    t.zero_()
            assert torch.equal(run(model), before) and not torch.equal(run(twin), before)


# -- tiling and slicing: diffusers' tiles, overlaps and blends --------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiled_and_sliced_passes_equal_diffusers(tmp_path, dtype):
    """Tiles of 16 pixels (2 latent) over a 40 x 28 image: uneven edge tiles, blends above and
    to the left; the batch sliced; both directions, both switched off again."""
    ref = diffusers.AutoencoderKL(**TINY_VAE, sample_size=16).eval()
    _randomize(ref, seed=5)
    ref.save_pretrained(tmp_path)
    ours = AutoencoderKL.from_pretrained(tmp_path, torch_dtype=dtype)
    ref = ref.to(dtype)
    assert (ours.tile_sample_min_size, ours.tile_latent_min_size) == (16, 8)
    image = torch.randn(3, 3, 40, 28, generator=torch.Generator().manual_seed(3)).to(dtype)
    z = torch.randn(3, 4, 20, 14, generator=torch.Generator().manual_seed(4)).to(dtype)
    with torch.no_grad():
        plain = ours.decode(z).sample
        for vae in (ref, ours):
            vae.enable_tiling()
            vae.enable_slicing()
        for a, b in ((ours.decode(z).sample, ref.decode(z).sample),
                     (ours.encode(image).latent_dist.mean, ref.encode(image).latent_dist.mean)):
            assert torch.equal(a, b)
        assert not torch.equal(ours.decode(z).sample, plain)  # the tiles were used
        ours.disable_tiling()
        ours.disable_slicing()
        assert torch.equal(ours.decode(z).sample, plain)
