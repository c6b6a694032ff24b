"""A model's weights on disk: a folder's files (one file, shards with an index, .bin), shard
planning and writing. One .safetensors file's validated reader is safetensors_file.py.

Reading never holds a whole checkpoint: ``Checkpoint.tensor(key)`` reads one tensor into a
fresh, aligned buffer (quanto's CPU kernels crash on unaligned memory, and a fresh buffer
means no mapping of the file outlives the load). The safetensors header is validated before
any byte of data is trusted: offsets in bounds, sizes matching dtype x shape, no overlaps.

Example:
    >>> ckpt = Checkpoint.open("model_dir")                     # doctest: +SKIP
    >>> w = ckpt.tensor("proj_out.weight")                      # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import torch

from .errors import CheckpointError, ConfigError

# the one-file reader, re-exported: the tests and users import it from here
from .safetensors_file import SAFETENSORS_DTYPES, FileReader, SafetensorsFile  # noqa: F401


def _check_inside(directory: Path, name: str, source: Path) -> Path:
    """A file name taken from an index must stay inside ``directory``."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in Path(name).parts:
        raise CheckpointError(f"{source}: names {name!r}, which is outside {directory}; "
                              "index files may only name files beside them")
    return directory / name


def read_index(index_path: Path) -> dict[str, Path]:
    """Parse a ``*.index.json``: key -> shard path, each shard checked to exist."""
    from .configuration import read_json

    index = read_json(index_path, what="weights index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: key 'weight_map' should be a non-empty object "
                              "mapping tensor names to shard files")
    result = {}
    for key, name in weight_map.items():
        path = _check_inside(index_path.parent, name, index_path)
        if not path.is_file():
            raise CheckpointError(f"{index_path}: shard {name!r} (holding {key!r}) is missing")
        result[key] = path
    return result


class Checkpoint(FileReader):
    """The tensors of one model directory (single file, shards + index, or a .bin)."""

    def __init__(self, files: dict[str, "SafetensorsFile | _BinFile"], key_to_file: dict[str, str]):
        self._files = files
        self._key_to_file = key_to_file
        self._last = None  # the shard read last; the one left open when there are many

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Checkpoint":
        """Open a weights file or an index file."""
        path = Path(path)
        if re.search(r"\.index(\.[^.]+)?\.json$", path.name):  # x.index.json, x.index.fp16.json
            mapping = read_index(path)
            names = sorted({str(p) for p in mapping.values()})
        else:
            mapping, names = None, [str(path)]
        files = {}
        try:
            for name in names:
                files[name] = _BinFile(Path(name)) if name.endswith(".bin") else SafetensorsFile(name)
                if len(names) > 1 and isinstance(files[name], SafetensorsFile):
                    files[name].release()  # reopened by tensor(), one shard at a time
        except BaseException:
            for f in files.values():
                f.close()
            raise
        key_to_file = {}
        if mapping is None:
            key_to_file = {k: names[0] for k in files[names[0]].keys()}
        else:
            for key, shard in mapping.items():
                if key not in files[str(shard)].keys():
                    raise CheckpointError(f"{path}: says {key!r} is in {shard.name}, which lacks it")
                key_to_file[key] = str(shard)
        return cls(files, key_to_file)

    def keys(self) -> list[str]:
        return list(self._key_to_file)

    def file_of(self, key: str) -> Path:
        return self._files[self._key_to_file[key]].path

    def shape(self, key: str) -> tuple:
        return self._files[self._key_to_file[key]].shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self._files[self._key_to_file[key]].dtype(key)

    def tensor(self, key: str, scratch: dict | None = None) -> torch.Tensor:
        """``key``'s tensor; see ``SafetensorsFile.tensor`` for ``scratch``."""
        file = self._files[self._key_to_file[key]]
        if len(self._files) > 1 and self._last is not None and self._last is not file \
                and isinstance(self._last, SafetensorsFile):
            self._last.release()
        self._last = file
        return file.tensor(key, scratch) if scratch is not None else file.tensor(key)

    @property
    def metadata(self) -> dict:
        first = next(iter(self._files.values()))
        return getattr(first, "metadata", {})

    def close(self) -> None:
        for f in self._files.values():
            f.close()


class _BinFile:
    """A pickled PyTorch state dict, read with weights_only=True: never runs checkpoint code."""

    def __init__(self, path: Path):
        self.path = path
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as err:
            raise CheckpointError(f"{path}: refused to unpickle ({str(err).splitlines()[0]}); "
                                  "only plain tensors are loaded from .bin files") from err
        except (RuntimeError, EOFError, OSError, ValueError) as err:
            raise CheckpointError(f"{path}: not a readable PyTorch weights file ({err})") from err
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"{path}: expected a dict of tensors")
        self._sd = sd

    def keys(self):
        return list(self._sd)

    def shape(self, key):
        return tuple(self._sd[key].shape)

    def dtype(self, key):
        return self._sd[key].dtype

    def tensor(self, key):
        return self._sd[key].clone()

    def close(self):
        self._sd = {}


# -- locating weight files --------------------------------------------------------------------
def add_variant(name: str, variant: str | None) -> str:
    """diffusers' naming: the variant goes before the last extension (x.safetensors.index.fp16.json)."""
    if not variant:
        return name
    head, ext = name.rsplit(".", 1)
    return f"{head}.{variant}.{ext}"


def find_weights(directory: Path, base: str = "diffusion_pytorch_model", variant: str | None = None,
                 use_safetensors: bool | None = None) -> Path:
    """The file to open for ``directory``: index > single safetensors > .bin (if allowed)."""
    candidates = [add_variant(f"{base}.safetensors.index.json", variant),
                  add_variant(f"{base}.safetensors", variant)]
    if use_safetensors is not True:
        candidates += [add_variant(f"{base}.bin.index.json", variant), add_variant(f"{base}.bin", variant)]
    for name in candidates:
        if (directory / name).is_file():
            return directory / name
    raise CheckpointError(f"{directory}: no weights found; expected one of {candidates}")


# -- shard planning and writing ---------------------------------------------------------------
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """``"10GB"`` -> 10_000_000_000; ints pass through."""
    if isinstance(size, int) and not isinstance(size, bool) and size >= 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", str(size).upper())
    if not m:
        raise ConfigError(f"max_shard_size={size!r}: expected an int or a string like '5GB' or "
                          "'500MB'")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


def plan_shards(groups: list[list[str]], nbytes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Pack groups of keys into shards of at most ``max_bytes`` (a group never splits).

    A group larger than ``max_bytes`` gets a shard of its own, as in diffusers.
    """
    shards, current, size = [], [], 0
    for group in groups:
        g = sum(nbytes[k] for k in group)
        if current and size + g > max_bytes:
            shards.append(current)
            current, size = [], 0
        current += group
        size += g
    if current:
        shards.append(current)
    return shards


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    plain = {k: v.detach().contiguous() for k, v in tensors.items()}
    try:
        save_file(plain, str(path), metadata={"format": "pt", **(metadata or {})})
    except Exception as err:  # SafetensorError, not an OSError: "... (os error 28)"
        from .atomic import as_os_error

        os_error = as_os_error(err)
        if os_error is None:
            raise
        raise OSError(os_error.errno, os_error.strerror, str(path)) from err
    with open(path, "rb") as fh:  # data must reach the disk before the directory is renamed
        os.fsync(fh.fileno())


def write_sharded(tensors: dict[str, torch.Tensor], groups: list[list[str]], directory: Path,
                  base: str = "diffusion_pytorch_model", variant: str | None = None,
                  max_shard_size: int | str = "10GB", metadata: dict | None = None) -> list[Path]:
    """Write ``tensors`` as one safetensors file, or as shards plus an index when too big.

    ``metadata`` (str -> str) goes into every file's header and the index's ``metadata``, as
    diffusers writes a quantizer's (torchao's per-tensor descriptions)."""
    nbytes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    shards = plan_shards(groups, nbytes, parse_size(max_shard_size))
    if len(shards) <= 1:
        path = directory / add_variant(f"{base}.safetensors", variant)
        write_safetensors(tensors, path, metadata)
        return [path]
    written, weight_map = [], {}
    for i, keys in enumerate(shards, 1):
        name = add_variant(f"{base}.safetensors", variant).replace(  # x.fp16-00001-of-00002.safetensors
            ".safetensors", f"-{i:05d}-of-{len(shards):05d}.safetensors")
        write_safetensors({k: tensors[k] for k in keys}, directory / name, metadata)
        written.append(directory / name)
        weight_map.update({k: name for k in keys})
    index = {"metadata": {"total_size": sum(nbytes.values()), **(metadata or {})},
             "weight_map": weight_map}
    index_path = directory / add_variant(f"{base}.safetensors.index.json", variant)
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return written + [index_path]
