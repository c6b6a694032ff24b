"""Hub ids resolve through huggingface_hub's cache; HF_HUB_OFFLINE is honoured (no network)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from tests.toy import ToyModel

ROOT = Path(__file__).parents[1]
CHILD = r"""
import sys
from diffquant.errors import CheckpointError
from tests.toy import ToyModel
m = ToyModel.from_pretrained("someorg/toy", subfolder="transformer")
print("loaded", m.config.hidden)
try:
    ToyModel.from_pretrained("someorg/absent")
except CheckpointError as err:
    print("error", err)
"""


def test_hub_id_loads_from_cache_offline(tmp_path):
    # huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/<commit>/...}
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someorg--toy"
    snapshot = repo / "snapshots" / commit / "transformer"
    torch.manual_seed(0)
    ToyModel(width=16, hidden=48, depth=1).save_pretrained(tmp_path / "src")
    shutil.copytree(tmp_path / "src", snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "loaded 48" in out.stdout
    assert "error someorg/absent: could not fetch from the hub or its cache" in out.stdout
    assert "HF_HUB_OFFLINE" in out.stdout
