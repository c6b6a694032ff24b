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


class _FakeApi:
    """huggingface_hub.HfApi without a network: records what a push asks of it."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok, self.token))
        return type("RepoUrl", (), {"repo_id": f"me/{repo_id}" if "/" not in repo_id else repo_id})

    def upload_folder(self, repo_id, folder_path, commit_message, create_pr):
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*")
                       if p.is_file())
        self.calls.append(("upload_folder", repo_id, commit_message, create_pr, files))
        return type("CommitInfo", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})


def test_push_to_hub_uploads_what_was_saved(tmp_path, monkeypatch):
    """save_pretrained(push_to_hub=True) writes the folder, then uploads it as diffusers does:
    repo_id (default: the folder's name) created if missing, then the whole folder."""
    import huggingface_hub

    from diffquant import DiffusionPipeline
    from tests.tiny_pipeline import build_tiny_flux_pipeline_dir

    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    _FakeApi.calls = []
    torch.manual_seed(0)
    model = ToyModel(width=16, hidden=48, depth=1)
    model.save_pretrained(tmp_path / "toy-out", push_to_hub=True, private=True, token="t")
    assert _FakeApi.calls == [
        ("create_repo", "toy-out", True, True, "t"),
        ("upload_folder", "me/toy-out", "Upload with diffquant", False,
         ["config.json", "diffusion_pytorch_model.safetensors"])]
    model.save_pretrained(tmp_path / "again")                    # no push without the flag
    assert len(_FakeApi.calls) == 2

    pipe = DiffusionPipeline.from_pretrained(build_tiny_flux_pipeline_dir(tmp_path / "tiny"))
    _FakeApi.calls = []
    pipe.save_pretrained(tmp_path / "pipe-out", push_to_hub=True, repo_id="org/flux-tiny",
                         commit_message="tiny", create_pr=True)
    (create, repo, *_), (upload, repo_id, message, pr, files) = _FakeApi.calls
    assert (create, repo, upload, repo_id, message, pr) == (
        "create_repo", "org/flux-tiny", "upload_folder", "org/flux-tiny", "tiny", True)
    assert "model_index.json" in files and "transformer/config.json" in files


def test_a_hub_pipeline_fetches_only_the_folders_it_loads(tmp_path, monkeypatch):
    """FluxPipeline.from_pretrained("org/flux", transformer=...) reads model_index.json first,
    then fetches the folders of the components it loads: not the transformer it was given, not
    the single-file checkpoints a Flux repository keeps at its root, not other frameworks'
    weights (a whole snapshot of FLUX.1-dev is ~24 GB more)."""
    import huggingface_hub

    from diffquant import DiffusionPipeline
    from tests.tiny_pipeline import build_tiny_flux_pipeline_dir

    local = build_tiny_flux_pipeline_dir(tmp_path / "snapshot")
    calls = []

    def snapshot_download(repo_id, allow_patterns=None, ignore_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns, ignore_patterns, kwargs))
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    given = DiffusionPipeline.from_pretrained(local).transformer
    pipe = DiffusionPipeline.from_pretrained("org/flux", transformer=given, revision="r1")
    assert pipe.transformer is given
    assert calls[0] == ("org/flux", ["model_index.json"], None, {"revision": "r1"})
    repo, allow, ignore, kwargs = calls[1]
    assert (repo, kwargs) == ("org/flux", {"revision": "r1"})
    assert allow == ["model_index.json", "scheduler/*", "text_encoder/*", "text_encoder_2/*",
                     "tokenizer/*", "tokenizer_2/*", "vae/*"]
    assert "*.msgpack" in ignore and "*.onnx" in ignore
