"""Memory budgets: plans that fit, runs that stay under them, exact reloads, refusals.

The pipeline is the shipped one with a wider random transformer (36M parameters, 69 MB in
bf16), so its weights dominate what a budget decides; budgets are set relative to the
baseline a child process measures, as `diffquant plan` measures it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffquant import FluxPipeline, default_pipeline_path
from diffquant.budget import memory
from diffquant.budget.apply import PLAN_FILE, upgrade_layers  # noqa: F401
from diffquant.budget.planner import Plan, plan_pipeline
from diffquant.budget.residency import Residency
from diffquant.errors import ConfigError

RUN = ["--height", "256", "--max-sequence-length", "64", "--dtype", "float32"]
CALL = dict(height=256, width=256, max_sequence_length=64, num_inference_steps=2,
            output_type="np")


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    from diffquant.models.transformer_flux import FluxTransformer2DModel

    root = tmp_path_factory.mktemp("budget") / "pipe"
    shutil.copytree(default_pipeline_path(), root)
    shutil.rmtree(root / "transformer")
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=128,
        num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64,
        guidance_embeds=False, axes_dims_rope=(16, 56, 56)).to(torch.bfloat16)
    model.save_pretrained(root / "transformer")
    return root


def cli(*args) -> str:
    env = {**os.environ, "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                          os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "diffquant", *map(str, args)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_plan_fits_and_the_run_stays_under_it(src, tmp_path):
    """plan -> quantize --plan -> generate under the budget: a per-layer mix is chosen, the
    run's measured peak is under the budget and within 10% of the predicted one."""
    cli("plan", src, "--max-memory", "10GB", "--json", tmp_path / "big.json", *RUN)
    big = Plan.from_json((tmp_path / "big.json").read_text())
    transformer = sum(c.nbytes for c in big.choices if c.component == "transformer")
    budget = big.baseline + big.phases["denoise"] - transformer // 3
    dst = tmp_path / "planned"
    table = cli("quantize", src, dst, "--plan", budget, *RUN)
    assert "most sensitive layers" in table and "predicted peak" in table
    plan = Plan.from_json((dst / PLAN_FILE).read_text())
    assert plan.budget == budget and plan.peak <= budget
    kinds = {c.scheme for c in plan.choices if c.component == "transformer"}
    assert len(kinds) == 2  # the budget falls between two rungs: a mix
    cli("generate", "--model", dst, "--prompt", "a cat", "--steps", "2", "--out",
        tmp_path / "a.png", "--stats-json", tmp_path / "stats.json", *RUN)
    peak = json.loads((tmp_path / "stats.json").read_text())["peak_rss"]
    print(f"budget {budget}, predicted peak {plan.peak}, measured peak {peak}")
    assert peak <= budget, (peak, budget)
    assert abs(peak - plan.peak) <= 0.10 * peak, (peak, plan.peak)


def test_written_plan_holds_each_layer_in_its_type(src, tmp_path):
    """The mix is written as planned: the moved-up layers in their type, the rest in the base
    type (Q8_0: quick to quantize), and it reloads so."""
    plan = plan_pipeline(src, "0.5GB", dtype=torch.float32, height=256, width=256,
                         max_sequence_length=64, baseline=350_000_000)
    base, ups = plan.schemes()["transformer"]
    assert base == "gguf:q8_0" and set(ups.values()) == {"F32"}
    from diffquant.budget.apply import write_plan

    write_plan(src, tmp_path / "out", plan, torch.float32)
    for name in ("text_encoder", "text_encoder_2"):  # float as stored: linked, not rewritten
        assert plan.schemes()[name] == ["float", {}]
        for f in (src / name).glob("*.safetensors"):
            assert (tmp_path / "out" / name / f.name).stat().st_ino == f.stat().st_ino
    model = FluxPipeline.from_pretrained(tmp_path / "out").transformer
    kinds = {n: m.qtype.name for n, m in model.named_modules() if getattr(m, "qtype", None)}
    assert kinds == {n: ups.get(n, "Q8_0") for n in kinds}


def test_reloads_are_exact(tmp_path):
    """Under a budget every call reloads the text encoders and the transformer: the images are
    bit-identical to an always-resident pipeline's."""
    path = default_pipeline_path()
    call = dict(height=64, width=64, max_sequence_length=16, num_inference_steps=2,
                output_type="np")
    resident = FluxPipeline.from_pretrained(path, torch_dtype=torch.float32)
    budgeted = FluxPipeline.from_pretrained(path, torch_dtype=torch.float32, max_memory="64GB")
    assert "transformer" not in budgeted.__dict__  # nothing of a phase loaded before it runs
    for _ in range(2):
        want = resident("a cat", generator=torch.Generator().manual_seed(0), **call).images
        got = budgeted("a cat", generator=torch.Generator().manual_seed(0), **call).images
        assert (want == got).all()
    assert budgeted._residency.loads == {"text_encoder": 2, "text_encoder_2": 2, "transformer": 2}
    assert budgeted._residency.resident() == []  # the decode dropped the transformer


def test_a_lora_on_a_budgeted_pipeline_is_refused():
    """The transformer is reloaded from its folder for each phase, which would drop an
    adapter: refused before anything loads."""
    pipe = FluxPipeline.from_pretrained(default_pipeline_path(), max_memory="64GB")
    with pytest.raises(ConfigError, match=r"load_lora_weights on a pipeline loaded with "
                                          r"max_memory.*would drop the adapter"):
        pipe.load_lora_weights({"transformer.x.lora_A.weight": torch.zeros(1, 1)})
    assert pipe._residency.resident() == []


def test_without_a_budget_nothing_changes():
    pipe = FluxPipeline.from_pretrained(default_pipeline_path())
    assert "_residency" not in pipe.__dict__ and pipe.__dict__["transformer"] is not None


def test_too_small_a_budget_names_the_smallest_that_works(src):
    # given errors (as `diffquant sensitivity --json` writes them): nothing to measure here
    layers = [k[:-7] for k, (_, shape) in memory.tensor_table(src / "transformer").items()
              if k.endswith(".weight") and len(shape) == 2]
    errors = {n: {"gguf:q8_0": 1e-4, "gguf:q6_k": 2e-4, "gguf:q5_k": 4e-4, "gguf:q4_k": 8e-4}
              for n in layers}
    kw = dict(dtype=torch.float32, height=256, width=256, max_sequence_length=64,
              baseline=400_000_000, sensitivity={"transformer": errors})
    with pytest.raises(ConfigError, match=r"smallest budget that would work is [\d.]+ GB") as err:
        plan_pipeline(src, "0.41GB", **kw)
    smallest = float(re.search(r"would work is ([\d.]+) GB", str(err.value)).group(1))
    plan = plan_pipeline(src, f"{smallest}GB", **kw)
    assert plan.peak <= plan.budget
    with pytest.raises(ConfigError, match="smallest budget"):
        plan_pipeline(src, f"{smallest - 0.02:.2f}GB", **kw)


def test_a_component_over_the_budget_is_refused_before_loading(src):
    with pytest.raises(ConfigError, match=r"component 'transformer' alone takes 0\.14 GB"):
        FluxPipeline.from_pretrained(src, torch_dtype=torch.float32,
                                     max_memory=memory.resident_bytes() + 50_000_000)


def test_decode_is_tiled_when_the_whole_image_does_not_fit(monkeypatch):
    pipe = FluxPipeline.from_pretrained(default_pipeline_path(), torch_dtype=torch.float32,
                                        max_memory="64GB")
    vae_dir = default_pipeline_path() / "vae"
    whole = memory.decode_activations(vae_dir, 1024, 1024, 1, 4)
    tiled = memory.decode_activations(vae_dir, 1024, 1024, 1, 4, 512)
    residency: Residency = pipe._residency
    monkeypatch.setattr(memory, "resident_bytes", lambda: residency.budget - (whole + tiled) // 2)
    residency._choose_tiles(pipe.vae, vae_dir, 1, 1024, 1024, 4)
    assert pipe.vae.use_tiling and pipe.vae.tile_sample_min_size == 512
    assert pipe.vae.tile_latent_min_size == 64


def test_parse_memory_refuses_nonsense():
    assert memory.parse_memory("16GB") == 16 * 10**9
    with pytest.raises(ConfigError, match=r"max_memory='lots': expected a positive int"):
        memory.parse_memory("lots")


def test_below_q4_k_the_transformer_goes_int4_whole_and_is_written_as_sized(src, tmp_path):
    """A budget between the transformer's Q4_K and int4 sizes (bf16: int4's scale and zero
    per 128 weights are 2 bytes, so 4.25 bits a weight against 4.5): torchao int4wo for every
    layer (no mix: a mix is GGUF's), sized as the written folder holds it."""
    from diffquant.budget.apply import write_plan
    from diffquant.budget.planner import layer_bytes

    kw = dict(dtype=torch.bfloat16, height=256, width=256, max_sequence_length=64,
              baseline=350_000_000)
    big = plan_pipeline(src, "10GB", **kw)
    shapes = [s for k, (_, s) in memory.tensor_table(src / "transformer").items()
              if k.endswith(".weight") and len(s) == 2]
    size = {q: sum(layer_bytes(s, q, 2) for s in shapes) for q in ("float", "gguf:q4_k",
                                                                   "torchao:int4wo")}
    assert size["torchao:int4wo"] < size["gguf:q4_k"]
    args = (src / "transformer", 256, 64, 1, 2)  # 256x256: 256 image tokens
    scratch = memory.denoise_activations(*args, quantized=True) \
        - memory.denoise_activations(*args, quantized=False)  # quantized layers' decode buffer
    between = big.baseline + big.phases["denoise"] - size["float"] + scratch \
        + (size["gguf:q4_k"] + size["torchao:int4wo"]) // 2
    plan = plan_pipeline(src, int(between / 0.95), **kw)
    choices = [c for c in plan.choices if c.component == "transformer"]
    assert [c.scheme for c in choices] == ["torchao:int4wo"] and choices[0].error > 0
    write_plan(src, tmp_path / "out", plan, torch.bfloat16)
    held = memory.loaded_bytes(tmp_path / "out" / "transformer", torch.bfloat16)[0]
    assert abs(held - choices[0].nbytes) <= 0.01 * held, (held, choices[0].nbytes)
    pipe = FluxPipeline.from_pretrained(tmp_path / "out", torch_dtype=torch.bfloat16)
    assert pipe.transformer.config.quantization_config.quant_type == "int4wo"
