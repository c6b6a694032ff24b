"""One .safetensors file read safely: the header validated before any byte of data is trusted
(offsets in bounds, sizes matching dtype x shape, no overlaps), then one tensor at a time into a
fresh, aligned buffer. FileReader is the base of every reader that holds a file open
(gguf_file.GGUFFile too); checkpoint.py builds folders, shards and indexes on top.

Example:
    >>> with SafetensorsFile("model.safetensors") as f:         # doctest: +SKIP
    ...     w = f.tensor("proj_out.weight")
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .errors import CheckpointError
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
