"""Two processes load one checkpoint while a third saves another beside it: all succeed."""

import subprocess
import sys
from pathlib import Path

import torch

from tests.toy import ToyModel

ROOT = Path(__file__).parents[1]
LOAD = r"""
import sys, torch
from tests.toy import ToyModel, toy_input
for _ in range(15):
    m = ToyModel.from_pretrained(sys.argv[1])
print(float(m(toy_input(64, dtype=torch.float32)).sum()))
"""
SAVE = r"""
import sys, torch
from tests.toy import ToyModel
m = ToyModel(width=64, hidden=256, depth=2)
for _ in range(15):
    m.save_pretrained(sys.argv[1], max_shard_size="100KB")
print("saved")
"""


def test_two_loaders_and_a_saver_in_one_parent(tmp_path):
    torch.manual_seed(0)
    ToyModel(width=64, hidden=256, depth=2).save_pretrained(tmp_path / "a")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / name)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for code, name in ((LOAD, "a"), (LOAD, "a"), (SAVE, "b"))]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1][-500:] for o in outs]
    assert outs[0][0] == outs[1][0]
    assert ToyModel.from_pretrained(tmp_path / "b").config.hidden == 256
