"""A harsh file system: full, read-only, full of links, long names, few file descriptors.

A full disk is a real small tmpfs where the tests run as root, and a simulated ENOSPC (the
writer raises what the OS raises) everywhere; a read-only tree is a tmpfs remounted read-only
(root) or folders without write permission.
"""

import errno
import json
import os
import resource

import pytest
import torch

from diffquant.errors import CheckpointError
from diffquant.single_file import export_gguf
from tests import faults
from tests.faults import Child, fingerprint, siblings, tiny_pipeline
from tests.toy import ToyModel

ROOT_ONLY = pytest.mark.skipif(not faults.can_mount(), reason="mounting a tmpfs needs root")


def _toy(seed=0, **config):
    torch.manual_seed(seed)
    return ToyModel(**{"width": 16, "hidden": 32, "depth": 1, **config})


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[-1]))


# -- a full disk ---------------------------------------------------------------------------------
@pytest.fixture(params=["tmpfs", "simulated"])
def full_disk(request, tmp_path, monkeypatch):
    """(a folder whose file system fills up during a large save, the kind of fault)."""
    if request.param == "tmpfs":
        if not faults.can_mount():
            pytest.skip("mounting a tmpfs needs root; the simulated case covers the code path")
        with faults.tmpfs(tmp_path / "fs", "1m") as path:
            yield path, "tmpfs"
        return
    import diffquant.checkpoint as C

    real = C.write_safetensors  # small saves pass; the big one finds the disk full

    def write(tensors, path, metadata=None):
        if sum(t.numel() * t.element_size() for t in tensors.values()) > 1_000_000:
            path.write_bytes(b"\0" * 4096)  # part of it made it to the disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(tensors, path, metadata)

    monkeypatch.setattr(C, "write_safetensors", write)
    yield tmp_path, "simulated"


def test_model_save_on_a_full_disk_names_the_cause_and_keeps_the_old(full_disk):
    folder, _ = full_disk
    target = folder / "model"
    small = _toy()
    small.save_pretrained(target)
    with pytest.raises(CheckpointError, match=rf"{target}: could not save the checkpoint \(No space "
                                              r"left on device, writing diffusion_pytorch_model"):
        _toy(width=256, hidden=512).save_pretrained(target)
    assert fingerprint(ToyModel.from_pretrained(target)) == fingerprint(small)
    assert siblings(target) == ["model"]


def test_pipeline_save_on_a_full_disk_names_the_cause_and_keeps_the_old(full_disk):
    from diffquant import FluxPipeline
    from diffquant.models.transformer_flux import FluxTransformer2DModel
    from tests.tiny_pipeline import TRANSFORMER_CONFIG

    folder, _ = full_disk
    target = folder / "pipe"
    pipe = tiny_pipeline(0)
    pipe.save_pretrained(target)
    before = fingerprint(pipe.transformer)
    pipe.transformer = FluxTransformer2DModel(**{**TRANSFORMER_CONFIG, "attention_head_dim": 64,
                                                 "axes_dims_rope": (16, 24, 24)})
    with pytest.raises(CheckpointError, match=rf"{target}: could not save the checkpoint \(No space"):
        pipe.save_pretrained(target)
    assert fingerprint(FluxPipeline.from_pretrained(target).transformer) == before
    assert siblings(target) == ["pipe"]


@pytest.mark.parametrize("how", ["tmpfs", "simulated"])
def test_export_gguf_on_a_full_disk_names_the_cause_and_keeps_the_old(how, tmp_path, monkeypatch):
    if how == "tmpfs" and not faults.can_mount():
        pytest.skip("mounting a tmpfs needs root; the simulated case covers the code path")
    with (faults.tmpfs(tmp_path / "fs", "256k") if how == "tmpfs" else
          __import__("contextlib").nullcontext(tmp_path)) as folder:
        path = folder / "model.gguf"
        (folder / f".model.gguf.tmp-{_dead_pid()}-0123abcd").write_bytes(b"partial")  # a killed export's
        export_gguf(_toy(), path, "Q8_0")
        before = path.read_bytes()
        if how == "simulated":  # numpy's tofile says only "N requested and 0 written"
            import gguf
            import shutil

            def fail(self, *args, **kwargs):
                raise OSError("4352 requested and 0 written")
            monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
            monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 0))
        with pytest.raises(CheckpointError, match=rf"{path}: could not write the GGUF file \(No space "
                                                  r"left on device\); the partial file was removed"):
            export_gguf(_toy(width=256, hidden=512), path, "Q8_0")
        assert path.read_bytes() == before
        assert sorted(p.name for p in folder.iterdir()) == ["model.gguf"]


# -- a read-only tree ----------------------------------------------------------------------------
@ROOT_ONLY
def test_read_only_tree_loads_and_refuses_a_save_by_name(tmp_path):
    with faults.tmpfs(tmp_path / "fs", "2m") as folder:
        target = folder / "model"
        model = _toy()
        model.save_pretrained(target)
        faults.make_read_only(folder)
        assert fingerprint(ToyModel.from_pretrained(target)) == fingerprint(model)
        with pytest.raises(CheckpointError, match=rf"{target}: could not save the checkpoint "
                                                  r"\(Read-only file system"):
            _toy(1).save_pretrained(target)
        assert fingerprint(ToyModel.from_pretrained(target)) == fingerprint(model)


# -- links ---------------------------------------------------------------------------------------
def test_save_over_links_never_reads_outside_the_model(tmp_path):
    outside = tmp_path / "outside"
    (outside / "folder").mkdir(parents=True)
    (outside / "secret.txt").write_text("SECRET")
    (outside / "folder" / "big.bin").write_bytes(b"SECRET" * 1000)
    target = tmp_path / "model"
    _toy().save_pretrained(target)
    (target / "README.md").write_text("mine")
    (target / "docs").mkdir()
    os.symlink(outside / "secret.txt", target / "notes.txt")   # a file outside
    os.symlink(outside / "folder", target / "data")            # a folder outside
    os.symlink("README.md", target / "readme-link.md")         # a link inside: kept as a link
    os.symlink("../README.md", target / "docs" / "index.md")
    os.mkfifo(target / "pipe")                                 # reading it would block for ever
    _toy(1).save_pretrained(target)
    assert not os.path.lexists(target / "notes.txt") and not os.path.lexists(target / "data")
    assert not os.path.lexists(target / "pipe")
    assert os.readlink(target / "readme-link.md") == "README.md"
    assert (target / "docs" / "index.md").read_text() == "mine"
    for folder, _, files in os.walk(target):
        for name in files:
            assert b"SECRET" not in (target / folder / name).read_bytes()
    assert siblings(target) == ["model", "outside"]


def test_save_through_a_linked_target_saves_where_it_points(tmp_path):
    real = tmp_path / "store" / "model"
    _toy().save_pretrained(real)
    link = tmp_path / "current"
    os.symlink(real, link)
    model = _toy(1)
    model.save_pretrained(link)
    assert os.readlink(link) == str(real)  # still a link, now to the new checkpoint
    assert fingerprint(ToyModel.from_pretrained(link)) == fingerprint(model)
    assert siblings(link) == ["current", "store"] and siblings(real) == ["model"]
    os.symlink(tmp_path / "later" / "model", tmp_path / "dangling")
    model.save_pretrained(tmp_path / "dangling")  # created where it points
    assert fingerprint(ToyModel.from_pretrained(tmp_path / "later" / "model")) == fingerprint(model)
    stale = tmp_path / "store" / f".model.tmp-{_dead_pid()}-0123abcd"  # an older version's leftover
    os.symlink(real, stale)
    model.save_pretrained(link)
    assert not os.path.lexists(stale) and siblings(real) == ["model"]  # the link went, not its target
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    with pytest.raises(CheckpointError, match=r"loop: is a symbolic link that never reaches a dir"):
        model.save_pretrained(tmp_path / "loop")


def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid += 1


# -- long names ----------------------------------------------------------------------------------
def test_a_240_character_name_saves_and_loads(tmp_path):
    target = tmp_path / ("m" * 240)
    model = _toy()
    model.save_pretrained(target)
    model.save_pretrained(target)  # over an existing one: the swap's names fit too
    assert fingerprint(ToyModel.from_pretrained(target)) == fingerprint(model)
    tiny_pipeline(0).save_pretrained(tmp_path / ("p" * 240))
    path = tmp_path / ("g" * 240 + ".gguf")
    export_gguf(model, path, "Q8_0")
    export_gguf(model, path, "Q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["g" * 240 + ".gguf", "m" * 240,
                                                                 "p" * 240])


# -- few file descriptors ------------------------------------------------------------------------
def load_fingerprint(path):
    return fingerprint(ToyModel.from_pretrained(path))


def test_352_shards_load_under_a_256_file_limit(tmp_path):
    model = _toy(width=8, hidden=8, depth=349)  # every layer in a shard of its own
    model.save_pretrained(tmp_path, max_shard_size=1)
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 352
    child = Child(load_fingerprint, tmp_path, limits={resource.RLIMIT_NOFILE: 256})
    assert child.result() == fingerprint(model)
