"""Loading streams tensors: the checkpoint is never held whole next to the model."""

import json
import subprocess
import sys

import torch
from safetensors.torch import save_file

CHILD = r"""
import json, resource, sys
import torch
from tests.toy import ToyModel
import diffquant.modeling  # imports done before the baseline
torch.ones(1)
def peak_kb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
base = peak_kb()
model = ToyModel.from_pretrained(sys.argv[1])
print(json.dumps({"base_kb": base, "peak_kb": peak_kb(), "bytes": model.get_memory_footprint()}))
"""


def test_load_peak_memory_rise_below_1_3x_model(tmp_path):
    # ~200 MB of float32 weights in 8 linears of 2048x3072
    config = {"width": 2048, "hidden": 3072, "depth": 6}
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "ToyModel", **config}))
    g = torch.Generator().manual_seed(0)
    shapes = {"proj_in.weight": (3072, 2048), "proj_in.bias": (3072,), "norm.weight": (3072,),
              "norm.bias": (3072,), "proj_out.weight": (2048, 3072)}
    for i in range(6):
        shapes[f"blocks.{i}.weight"] = (3072, 3072)
        shapes[f"blocks.{i}.bias"] = (3072,)
    tensors = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    save_file(tensors, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    del tensors
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True,
                         text=True, check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    rise = (stats["peak_kb"] - stats["base_kb"]) * 1024
    assert stats["bytes"] > 200e6
    assert rise < 1.3 * stats["bytes"], stats
