"""SIGKILL at random moments during save_pretrained never leaves a broken or mixed checkpoint."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.toy import ToyModel, toy_input

ROOT = Path(__file__).parents[1]
CHILD = r"""
import sys, torch
from tests.toy import ToyModel
target = sys.argv[1]
models = []
for seed in (1, 2):
    torch.manual_seed(seed)
    models.append(ToyModel(width=64, hidden=512, depth=4))
print("ready", flush=True)
i = 0
while True:  # alternate between two different checkpoints until killed
    models[i % 2].save_pretrained(target, max_shard_size="600KB")
    i += 1
"""


def _outputs(seed):
    torch.manual_seed(seed)
    return ToyModel(width=64, hidden=512, depth=4)(toy_input(64, dtype=torch.float32))


def test_sigkill_during_save_leaves_old_or_new(tmp_path):
    target = tmp_path / "model"
    torch.manual_seed(1)
    ToyModel(width=64, hidden=512, depth=4).save_pretrained(target, max_shard_size="600KB")
    expected = [_outputs(1), _outputs(2)]
    x = toy_input(64, dtype=torch.float32)
    rng = random.Random(0)
    for _ in range(20):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(target)], cwd=ROOT,
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        out = ToyModel.from_pretrained(target)(x)
        assert any(torch.equal(out, e) for e in expected), "checkpoint mixes two saves"
    # leftovers of killed saves are removed by the next save
    ToyModel(width=64, hidden=512, depth=4).save_pretrained(target)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
