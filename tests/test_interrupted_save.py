"""SIGKILL at random moments during save_pretrained never leaves a broken or mixed checkpoint.

A forked child saves two different checkpoints in turn into one path, over and over, until the
test kills it at a random moment; the path must then load and give one of the two outputs.
Forking (instead of starting an interpreter) keeps each of the 20+20 kills cheap.
"""

import os
import random
import shutil
import signal
import threading
import time

import pytest
import torch
from tqdm import tqdm

from tests.toy import ToyModel, toy_input

KILLS = 20


def _private_tqdm_lock():
    """Give every tqdm class a lock of this process alone. ``tqdm.set_lock`` sets it on the base
    class only, and a subclass (tqdm.auto's, which the save's libraries use) that made its own
    lock in the parent still shares the semaphore: a kill there hung the parent's next bar."""
    lock, classes = threading.RLock(), [tqdm]
    while classes:
        cls = classes.pop()
        classes.extend(cls.__subclasses__())
        cls.set_lock(lock)


def _kill_while_saving(objects, target, rng, max_wait):
    """Fork a child that saves ``objects`` alternately into ``target``; SIGKILL it mid-way."""
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        # tqdm's write lock is a process-shared semaphore: a child killed while holding it would
        # deadlock the parent's next progress bar, so the child gets a private lock.
        _private_tqdm_lock()
        try:
            i = 0
            while True:
                objects[i % 2].save_pretrained(target)
                i += 1
        finally:
            os._exit(1)
    time.sleep(rng.uniform(0.0, max_wait))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _toy(seed):
    torch.manual_seed(seed)
    return ToyModel(width=64, hidden=512, depth=4)


@pytest.fixture(autouse=True)
def _quiet_tokenizers(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def test_sigkill_during_model_save_leaves_old_or_new(tmp_path):
    target = tmp_path / "model"
    models = [_toy(1), _toy(2)]
    models[0].save_pretrained(target)
    x = toy_input(64, dtype=torch.float32)
    with torch.no_grad():
        expected = [m(x) for m in models]
    rng = random.Random(0)
    for _ in range(KILLS):
        _kill_while_saving(models, target, rng, 0.3)
        with torch.no_grad():
            out = ToyModel.from_pretrained(target)(x)
        assert any(torch.equal(out, e) for e in expected), "checkpoint mixes two saves"
    models[1].save_pretrained(target)  # leftovers of killed saves are removed by the next save
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def _image(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle", num_inference_steps=1, height=32, width=32, max_sequence_length=16,
                output_type="np", generator=torch.Generator().manual_seed(0)).images


def test_sigkill_during_pipeline_save_leaves_old_or_new(tmp_path):
    from diffquant import FluxPipeline
    from tests.tiny_pipeline import build_tiny_flux_pipeline_dir

    dirs = [build_tiny_flux_pipeline_dir(tmp_path / "a", seed=0),
            build_tiny_flux_pipeline_dir(tmp_path / "b", seed=1)]
    pipes = [FluxPipeline.from_pretrained(d) for d in dirs]
    expected = [_image(p) for p in pipes]
    target = tmp_path / "out" / "pipe"
    shutil.copytree(dirs[0], target)
    rng = random.Random(1)
    for _ in range(KILLS):
        _kill_while_saving(pipes, target, rng, 0.6)
        image = _image(FluxPipeline.from_pretrained(target))
        assert any((image == e).all() for e in expected), "pipeline directory mixes two saves"
    pipes[0].save_pretrained(target)
    assert [p.name for p in target.parent.iterdir()] == ["pipe"]
