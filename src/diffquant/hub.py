"""Resolve a local path or a Hugging Face hub id to files on disk.

Local directories are used as they are. Anything else goes through huggingface_hub, so its
cache, ``HF_HUB_OFFLINE`` and tokens behave exactly as in diffusers.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import CheckpointError

HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")


def split_hub_kwargs(kwargs: dict) -> dict:
    """Pop the hub-related keyword arguments out of ``kwargs``."""
    return {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def resolve_dir(name_or_path: str | os.PathLike, subfolder: str | None = None,
                allow_patterns: list[str] | None = None, **hub_kwargs) -> Path:
    """A local directory holding ``name_or_path`` (downloaded into the hub cache if needed)."""
    path = Path(os.fspath(name_or_path)).expanduser()
    if path.is_dir():
        return path / subfolder if subfolder else path
    if path.exists():
        raise CheckpointError(f"{path}: is a file; expected a model directory or a hub id")
    if not _looks_like_hub_id(str(name_or_path)):
        raise CheckpointError(f"{path}: no such directory (and not a hub id like 'org/name')")
    from huggingface_hub import snapshot_download

    if subfolder and allow_patterns is None:
        allow_patterns = [f"{subfolder}/*"]
    try:
        root = Path(snapshot_download(str(name_or_path), allow_patterns=allow_patterns, **hub_kwargs))
    except Exception as err:  # huggingface_hub raises many types; keep the cause
        raise CheckpointError(f"{name_or_path}: could not fetch from the hub or its cache "
                              f"({type(err).__name__}: {err}); check the id, the network or "
                              "HF_HUB_OFFLINE") from err
    return root / subfolder if subfolder else root


def resolve_file(name_or_path: str | os.PathLike, filename: str, subfolder: str | None = None,
                 **hub_kwargs) -> Path:
    """A local file ``[subfolder/]filename`` of a directory or hub repository."""
    path = Path(os.fspath(name_or_path)).expanduser()
    if path.is_dir():
        return (path / subfolder if subfolder else path) / filename
    if path.is_file():
        return path
    rel = f"{subfolder}/{filename}" if subfolder else filename
    return resolve_dir(name_or_path, allow_patterns=[rel], **hub_kwargs) / rel


# diffusers' single-file links: https://huggingface.co/<org>/<repo>/blob|resolve/<revision>/<file>
_FILE_URL = re.compile(r"^https://huggingface\.co/(?P<repo>[^/]+/[^/]+)/(?:blob|resolve)/"
                       r"(?P<revision>[^/]+)/(?P<file>.+)$")


def resolve_single_file(link: str | os.PathLike, **hub_kwargs) -> Path:
    """A local file for ``from_single_file``: a path as it is, or a hub file link (as in
    diffusers' GGUF examples) fetched into huggingface_hub's cache."""
    match = _FILE_URL.match(str(link))
    if match is None or Path(os.fspath(link)).is_file():
        return Path(os.fspath(link)).expanduser()
    hub_kwargs.setdefault("revision", match["revision"])
    path = resolve_dir(match["repo"], allow_patterns=[match["file"]], **hub_kwargs) / match["file"]
    if not path.is_file():  # the snapshot came, without that file
        raise CheckpointError(f"{link}: {match['file']!r} is not in {match['repo']} at "
                              f"{hub_kwargs['revision']} (or not in the hub cache, offline); "
                              "check the file name and revision")
    return path


PUSH_KWARGS = ("repo_id", "commit_message", "private", "create_pr", "token")


def push_folder(folder: str | os.PathLike, kwargs: dict) -> str | None:
    """``save_pretrained(..., push_to_hub=True)``: upload the folder just written, as diffusers
    does (repo ``repo_id``, default the folder's name; created if missing). Pops diffusers'
    push arguments out of ``kwargs``; returns the commit URL, or None without push_to_hub."""
    push = kwargs.pop("push_to_hub", False)
    args = {k: kwargs.pop(k) for k in PUSH_KWARGS if k in kwargs}
    if not push:
        return None
    from huggingface_hub import HfApi

    api = HfApi(token=args.get("token"))
    repo_id = args.get("repo_id") or Path(os.fspath(folder)).name
    repo_id = api.create_repo(repo_id, private=args.get("private"), exist_ok=True).repo_id
    info = api.upload_folder(repo_id=repo_id, folder_path=folder,
                             commit_message=args.get("commit_message") or "Upload with diffquant",
                             create_pr=bool(args.get("create_pr")))
    return str(getattr(info, "commit_url", info))
