"""bench.budget's full-scale helpers on toy transformers: the reference's memory-mapped load
and the reuse of bench.scale's transformer checkpoint."""

from __future__ import annotations

import json
import os

import pytest
import torch

from bench import budget_model
from bench.budget import mmap_model
from bench.model import WEIGHTS, write_streaming_safetensors
from diffquant import FluxTransformer2DModel

TOY = dict(patch_size=1, in_channels=16, out_channels=None, num_layers=1, num_single_layers=1,
           attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32,
           pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=[8, 12, 12])


def _inputs(dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 16, 16, generator=g).to(dtype),
                encoder_hidden_states=torch.randn(1, 8, 32, generator=g).to(dtype),
                pooled_projections=torch.randn(1, 16, generator=g).to(dtype),
                timestep=torch.tensor([0.5], dtype=dtype), img_ids=torch.zeros(16, 3),
                txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5], dtype=dtype))


def test_mmap_model_equals_the_loaded_model_and_maps_the_file(tmp_path):
    torch.manual_seed(0)
    FluxTransformer2DModel(**TOY).to(torch.bfloat16).save_pretrained(tmp_path / "t")
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path / "t", torch_dtype=torch.bfloat16)
    mapped = mmap_model(FluxTransformer2DModel, tmp_path / "t")
    assert all(p.dtype == torch.bfloat16 for p in mapped.parameters())
    with torch.no_grad():
        want, got = loaded(**_inputs()).sample, mapped(**_inputs()).sample
    assert torch.equal(want, got)
    # every weight is a view of the file: the mapping's pages, not a copy in the heap
    maps = open("/proc/self/maps").read() if os.path.exists("/proc/self/maps") else None
    if maps is not None:
        assert str(next((tmp_path / "t").glob("*.safetensors"))) in maps
    # a cast (another dtype than the file's) copies, and still computes the same model
    as_f32 = mmap_model(FluxTransformer2DModel, tmp_path / "t", torch.float32)
    with torch.no_grad():
        assert torch.equal(loaded.float()(**_inputs(torch.float32)).sample,
                           as_f32(**_inputs(torch.float32)).sample)


def _scale_checkpoint(folder, config):
    """A bench.model-style checkpoint (guidance_embeds False) of ``config``'s shape."""
    folder.mkdir(parents=True)
    with torch.device("meta"):
        model = FluxTransformer2DModel(**{**config, "guidance_embeds": False})
    write_streaming_safetensors(folder / WEIGHTS, budget_model._zeros_as_negative(
        budget_model._tensor_plan(model)))
    (folder / "config.json").write_text(json.dumps(
        {"_class_name": "FluxTransformer2DModel", **config, "guidance_embeds": False}))


def test_the_scale_transformer_is_reused_by_hard_link(tmp_path, monkeypatch):
    """FLUX.1-dev's shape from bench.scale's checkpoint: its file linked (not copied), the
    guidance embedder it lacks drawn beside it; the folder loads as a guidance model."""
    monkeypatch.setattr(budget_model, "FLUX_DEV", TOY)
    _scale_checkpoint(tmp_path / "scale", TOY)
    out = tmp_path / "pipe" / "transformer"
    out.parent.mkdir()
    assert budget_model.reuse_scale_transformer(out, log=lambda *_: None,
                                                source=tmp_path / "scale")
    first = out / "diffusion_pytorch_model-00001-of-00002.safetensors"
    assert first.stat().st_ino == (tmp_path / "scale" / WEIGHTS).stat().st_ino
    model = FluxTransformer2DModel.from_pretrained(out, torch_dtype=torch.bfloat16)
    plain = FluxTransformer2DModel.from_pretrained(tmp_path / "scale", torch_dtype=torch.bfloat16)
    assert model.config.guidance_embeds
    theirs = plain.state_dict()
    mine = model.state_dict()
    assert set(mine) - set(theirs) == {f"time_text_embed.guidance_embedder.linear_{i}.{p}"
                                       for i in (1, 2) for p in ("weight", "bias")}
    assert all(torch.equal(mine[k], v) for k, v in theirs.items())
    with torch.no_grad():
        assert torch.isfinite(model(**_inputs()).sample).all()


def test_a_scale_transformer_of_another_shape_is_not_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(budget_model, "FLUX_DEV", TOY)
    _scale_checkpoint(tmp_path / "scale", {**TOY, "num_single_layers": 2})
    out = tmp_path / "transformer"
    assert not budget_model.reuse_scale_transformer(out, log=lambda *_: None,
                                                    source=tmp_path / "scale")
    assert not out.exists() and not out.with_name("transformer.tmp").exists()


def test_the_table_labels_the_mapped_reference_and_a_failed_budget():
    from types import SimpleNamespace

    from bench.budget import table

    phases = {p: {"seconds": 1.0, "peak": 1} for p in ("encode", "denoise", "decode")}
    ref = {"phases": phases, "peak": 21e9, "anonymous_peak": 10e9}
    plan = {"peak": 7.5e9, "choices": [{"component": "transformer", "scheme": "torchao:int4wo",
                                        "group": "all"}]}
    rows = [("unquantized", None, ref, float("inf")),
            ("8GB", plan, {"phases": phases, "peak": 7.6e9, "anonymous_peak": 7.6e9}, 30.0),
            ("4GB", None, {"error": "no plan fits"}, float("nan"))]
    lines = table(rows, SimpleNamespace(scale="full", size=512, steps=2)).splitlines()
    assert "21.00 with the mapped file's pages, 10.00 without" in lines[2]
    assert "| 8GB | transformer torchao:int4wo | 7.50 | 7.60 |" in lines[3]
    assert lines[4] == "| 4GB | failed: no plan fits | | | | | | |"


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
