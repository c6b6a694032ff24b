"""Every byte on disk: streaming safetensors reads, shard planning, index files, atomic commits.

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
import math
import os
import pickle
import re
from pathlib import Path

import torch

from .errors import CheckpointError, ConfigError
from .limits import BadJSON, file_identity, is_count, parse_json, unique_keys

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32,
    "U64": torch.uint64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class FileReader:
    """Base of the readers holding a file open between reads (``self._fh``): close() and
    ``with`` support (a reader of several files overrides close)."""

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SafetensorsFile(FileReader):
    """One .safetensors file, header validated, tensors read one at a time on request."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fh = None
        self._open()
        self._identity = file_identity(self._fh)
        try:
            self._read_header()
        except BaseException:
            self._fh.close()
            raise

    def _open(self) -> None:
        try:
            self._fh = open(self.path, "rb")
        except OSError as err:
            raise CheckpointError(f"{self.path}: cannot open safetensors file ({err.strerror})") from err

    def release(self) -> None:
        """Close the file until the next read, which reopens it (a checkpoint of many shards
        never holds them all open: a 256-file limit still loads 352 shards)."""
        self.close()
        self._fh = None

    def _reopen(self) -> None:
        self._open()
        if file_identity(self._fh) != self._identity:
            self._fh.close()
            self._fh = None
            raise CheckpointError(f"{self.path}: the file changed on disk while it was being "
                                  "loaded; load again")

    def _fail(self, what: str):
        raise CheckpointError(f"{self.path}: {what}; the file is truncated or corrupt, "
                              "re-download or re-save it")

    def _read_header(self) -> None:
        size = os.fstat(self._fh.fileno()).st_size
        head = self._fh.read(8)
        if len(head) < 8:
            self._fail(f"only {size} bytes, expected at least an 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > _MAX_HEADER or 8 + n > size:
            self._fail(f"header length {n} does not fit in a file of {size} bytes")
        try:
            header = parse_json(self._fh.read(n), "header", BadJSON, unique_keys,
                                allow_nan=False, max_bytes=_MAX_HEADER)
        except BadJSON as err:
            self._fail(str(err).replace("header: not valid JSON", "header is not valid JSON"))
        if not isinstance(header, dict):
            self._fail("header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict) or not all(
                isinstance(v, str) for v in self.metadata.values()):
            self._fail("__metadata__ is not an object of strings")
        self._data_start = 8 + n
        data_len = size - self._data_start
        self._entries = {}
        for key, info in header.items():
            dtype, shape, begin, end = self._check_entry(key, info, data_len)
            self._entries[key] = (dtype, tuple(shape), begin, end)
        self._check_layout(data_len)

    def _check_layout(self, data_len: int) -> None:
        """As the safetensors library: the tensors tile the data exactly, in offset order, with
        no gap, no overlap and no byte after the last one."""
        end, last = 0, None
        for b, e, key in sorted((b, e, k) for k, (_, _, b, e) in self._entries.items()):
            if b != end:
                what = "overlaps" if b < end else f"leaves bytes {end}-{b} unused after"
                self._fail(f"tensor {key!r} (bytes {b}-{e}) {what} "
                           f"{repr(last) if last else 'the start of the data'}")
            end, last = e, key
        if end != data_len:
            self._fail(f"{data_len - end} bytes follow the last tensor's data")

    def _check_entry(self, key, info, data_len):
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            self._fail(f"entry {key!r} lacks dtype, shape or data_offsets")
        dtype = SAFETENSORS_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dtype is None:
            self._fail(f"entry {key!r} has unknown dtype {info['dtype']!r}; "
                       f"expected one of {sorted(SAFETENSORS_DTYPES)}")
        shape, offsets = info["shape"], info["data_offsets"]
        if not (isinstance(shape, list) and all(is_count(d) for d in shape)):
            self._fail(f"entry {key!r} has invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(is_count(o) for o in offsets)):
            self._fail(f"entry {key!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            self._fail(f"entry {key!r} points at bytes {begin}-{end} but the data is {data_len} bytes")
        expected = math.prod(shape) * _element_size(dtype)
        if end - begin != expected:
            self._fail(f"entry {key!r} holds {end - begin} bytes but {info['dtype']} x {shape} "
                       f"needs {expected}")
        return dtype, shape, begin, end

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple:
        return self._entries[key][1]

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key][0]

    def tensor(self, key: str, scratch: dict | None = None) -> torch.Tensor:
        """Read ``key`` into a new tensor that owns its (aligned) memory.

        With ``scratch`` (a dict the caller keeps across calls), read into one buffer reused by
        every call instead: the result is valid until the next such call. Fresh memory costs a
        page fault per 4 KiB, which makes a read from the page cache ~4x slower.
        """
        if key not in self._entries:
            raise CheckpointError(f"{self.path}: no tensor named {key!r}")
        dtype, shape, begin, end = self._entries[key]
        if scratch is None:
            out = torch.empty(shape, dtype=dtype)
        else:
            buf = scratch.get("buffer")
            if buf is None or buf.numel() < end - begin:
                buf = scratch["buffer"] = torch.empty(end - begin, dtype=torch.uint8)
            out = buf[: end - begin].view(dtype).view(shape)
        if end > begin:
            buf = out.view(-1).view(torch.uint8).numpy()
            if self._fh is None:
                self._reopen()
            self._fh.seek(self._data_start + begin)
            got = self._fh.readinto(memoryview(buf))
            if got != end - begin:
                self._fail(f"tensor {key!r} ends early ({got} of {end - begin} bytes)")
        return out


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
