"""The batch, ``compare`` and the per-layer sensitivity on a Ray cluster: one local cluster for
the module (2 CPUs, no dashboard, loopback only), started here and shut down after. The batch
on Ray makes the same pixels as the in-process run of tests/test_batch.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import ray
import torch

from diffquant.batch import run_batch
from diffquant.sensitivity import layer_sensitivity
from tests.test_batch import RUN, local_run, pixels  # noqa: F401 - the in-process run, shared
from tests.test_cli import main_in_process

pytestmark = pytest.mark.usefixtures("one_thread")  # as Ray's 1-CPU workers run


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def test_batch_on_ray_makes_the_in_process_images(cluster, local_run, tmp_path):
    out = tmp_path / "out"
    records = run_batch(local_run.prompts, out, ray="", ray_actors=2, progress=False, **RUN)
    timing = ("seconds", "psnr", "worker", "finished")  # when and where; no reference here

    def strip(r):
        return {k: v for k, v in r.items() if k not in timing}

    assert [strip(r) for r in records] == [strip(r) for r in local_run.records]
    for r in records[:4]:  # the same bytes (so the same pixels) as the in-process run
        assert (out / r["path"]).read_bytes() == (local_run.out / r["path"]).read_bytes()
    # quantized once, here, into OUT/.pipeline: the actors loaded it pre-quantized
    config = json.loads((out / ".pipeline" / "transformer" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"
    # a second run finds everything done (no actor starts) and keeps the records
    again = run_batch(local_run.prompts, out, ray="", ray_actors=2, progress=False, **RUN)
    assert again == records


def test_compare_runs_its_variants_as_ray_tasks(cluster, tmp_path, capsys):
    code = main_in_process("compare", "--prompt", "a red circle", "--steps", 1, "--height", 32,
                           "--width", 32, "--quantize", "torchao:int8wo", "--out",
                           tmp_path / "grid.png", "--ray", "-q")
    stdout = capsys.readouterr().out
    assert code == 0
    assert "running 2 variants as Ray tasks" in stdout
    assert any(line.startswith("torchao:int8wo") for line in stdout.splitlines())
    assert (tmp_path / "grid.png").is_file()
    images = [pixels(tmp_path / f"grid-{i}-{name}.png") for i, name in
              enumerate(("unquantized", "torchao-int8wo"))]
    assert images[0].shape == images[1].shape == (32, 32, 3)
    assert not np.array_equal(images[0], images[1])


def test_sensitivity_on_ray_equals_in_process(cluster):
    from diffquant import FluxTransformer2DModel, default_pipeline_path

    model = FluxTransformer2DModel.from_pretrained(default_pipeline_path(), subfolder="transformer",
                                                   torch_dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 64, generator=g).bfloat16(),
                  encoder_hidden_states=torch.randn(1, 8, 64, generator=g).bfloat16(),
                  pooled_projections=torch.randn(1, 64, generator=g).bfloat16(),
                  timestep=torch.tensor([0.5]).bfloat16(), img_ids=torch.zeros(16, 3),
                  txt_ids=torch.zeros(8, 3))
    layers, formats = ["single_transformer_blocks.0.*"], ["gguf:q8_0", "gguf:q4_0"]
    here = layer_sensitivity(model, inputs, formats, layers=layers, progress=False)
    there = layer_sensitivity(model, inputs, formats, layers=layers, ray="", progress=False)
    block = "single_transformer_blocks.0."
    assert list(there) == [block + n for n in ("norm.linear", "proj_mlp", "proj_out", "attn.to_q",
                                               "attn.to_k", "attn.to_v")]
    assert there == here  # the same forwards, run as Ray tasks
    for errors in here.values():
        assert 0 < errors["gguf:q8_0"] < errors["gguf:q4_0"]
