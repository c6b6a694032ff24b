"""Racing processes, in a fixed interleaving: a child stops at a chosen line, the test runs the
other process to the end, then lets the child go on. No sleeps, no luck.

- a load that a save overtakes between two files still returns the whole old checkpoint (a
  pipeline's components, a model's config and shards), and the save leaves the tree the load
  reads in place until a later save finds it free;
- two saves that both found a path empty end with one complete checkpoint, the later one's,
  and no raw OS error.
"""

import os

import torch

from tests import faults
from tests.faults import Child, fingerprint, siblings, tiny_pipeline
from tests.toy import ToyModel


# -- children (module-level: they run in forked processes) ------------------------------------
def load_pipeline_pausing(path):
    """Load the pipeline at ``path``, stopping after its second component (the scheduler, the
    VAE; the transformer comes after the pause); fingerprints of its model components."""
    import diffquant.pipeline as P
    from diffquant import FluxPipeline

    real, calls = P.load_component, []

    def load_component(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(args[2])
        if len(calls) == 2:
            faults.pause(",".join(calls))
        return out

    P.load_component = load_component
    pipe = FluxPipeline.from_pretrained(path)
    return {n: fingerprint(c) for n, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


def load_model_pausing(path, where):
    """Load the ToyModel at ``path``, stopping after config.json ("config") or after the first
    tensor of the first shard ("shard"); its fingerprint."""
    import diffquant.modeling as M
    from diffquant.checkpoint import Checkpoint

    real_find, real_tensor, seen = M.find_weights, Checkpoint.tensor, []

    def find_weights(*args, **kwargs):
        if where == "config":
            faults.pause("config")
        return real_find(*args, **kwargs)

    def tensor(self, key, *args):
        if where == "shard" and not seen:
            seen.append(key)
            faults.pause("shard")
        return real_tensor(self, key, *args)

    M.find_weights, Checkpoint.tensor = find_weights, tensor
    return fingerprint(ToyModel.from_pretrained(path))


def save_pausing(target, seed, role):
    """Save ToyModel(seed) to ``target``. "first" stops before its commit; "second" stops in
    its commit, after it found the target absent, just before renaming into it."""
    import diffquant.atomic as A

    real_commit, real_rename = A._commit, os.rename

    def commit(*args):
        faults.pause("commit")
        return real_commit(*args)

    def rename(src, dst, *args, **kwargs):
        if str(dst) == str(target):
            faults.pause("rename")
        return real_rename(src, dst, *args, **kwargs)

    if role == "first":
        A._commit = commit
    else:
        os.rename = rename
    torch.manual_seed(seed)
    ToyModel(width=16, hidden=32, depth=1).save_pretrained(target)


# -- tests ----------------------------------------------------------------------------------------
def test_load_overtaken_by_a_pipeline_save_returns_the_old_pipeline(tmp_path):
    target = tmp_path / "pipe"
    old, new = tiny_pipeline(0), tiny_pipeline(1)
    old.save_pretrained(target)
    child = Child(load_pipeline_pausing, target)
    child.wait_paused("scheduler,vae")
    new.save_pretrained(target)  # swaps the whole folder while the load is half-way
    held = [n for n in siblings(target) if ".held-" in n]
    assert len(held) == 1, siblings(target)  # the tree the load reads is kept for it
    child.resume()
    assert child.result() == {"vae": fingerprint(old.vae), "transformer": fingerprint(old.transformer)}
    new.save_pretrained(target)  # the load is over: the next save removes the kept tree
    assert siblings(target) == ["pipe"]


def _race_model_load(tmp_path, where):
    target = tmp_path / "model"
    torch.manual_seed(0)
    old = ToyModel(width=16, hidden=32, depth=3)
    old.save_pretrained(target, max_shard_size="2KB")
    torch.manual_seed(1)
    new = ToyModel(width=16, hidden=48, depth=3)  # another config: a mix cannot even load
    child = Child(load_model_pausing, target, where)
    child.wait_paused(where)
    new.save_pretrained(target, max_shard_size="2KB")
    child.resume()
    assert child.result() == fingerprint(old)
    new.save_pretrained(target)
    assert siblings(target) == ["model"]


def test_load_overtaken_after_config_json_reads_the_old_weights(tmp_path):
    _race_model_load(tmp_path, "config")


def test_load_overtaken_between_shards_reads_the_old_shards(tmp_path):
    # shards are opened one at a time (a 256-file limit loads 352 shards), through the handle
    # of the folder the load began in
    _race_model_load(tmp_path, "shard")


def test_two_saves_to_one_new_path_end_with_one_whole_checkpoint(tmp_path):
    target = tmp_path / "new"
    first, second = Child(save_pausing, target, 1, "first"), Child(save_pausing, target, 2, "second")
    first.wait_paused("commit")
    second.wait_paused("rename")  # it found no target: it will rename into an empty path
    first.resume()
    first.result()  # the first save created the path meanwhile
    second.resume()
    second.result()  # no "[Errno 39] Directory not empty": it swapped its checkpoint in
    torch.manual_seed(2)
    expected = ToyModel(width=16, hidden=32, depth=1)
    assert fingerprint(ToyModel.from_pretrained(target)) == fingerprint(expected)
    assert siblings(target) == ["new"]
