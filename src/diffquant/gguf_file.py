"""GGUF files: a validating, streaming reader and a writer built on gguf-py's ``GGUFWriter``.

The reader parses the header itself (a few dozen lines of ``struct``) so every failure can name
the file and the tensor: a wrong magic, a truncated header, an unknown type id, tensor data out
of the file's bounds. Tensors are read one at a time (seek + read), never the whole file.

Layout (GGUF v2/v3, little-endian): magic ``GGUF``, version u32, tensor count u64, metadata
count u64, metadata key/values, tensor infos (name, dims innermost first, type u32, offset
u64), padding to ``general.alignment`` (default 32), then the tensor data.

Example:
    >>> from diffquant.gguf_file import GGUFFile
    >>> with GGUFFile("flux1-dev-Q4_0.gguf") as f:                           # doctest: +SKIP
    ...     info = f.tensors["double_blocks.0.img_attn.qkv.weight"]
    ...     blocks = f.read(info.name)              # uint8 (9216, 3072 // 32 * 18)
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import FileReader
from .errors import CheckpointError, QuantizationError
from .ops.formats.gguf import GGMLType, byte_shape, dequantize

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# GGUF metadata value types -> struct format (8 = string, 9 = array are handled apart)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    qtype: GGMLType
    shape: tuple[int, ...]   # logical, torch order (outermost first)
    offset: int              # absolute byte offset of the data in the file
    nbytes: int

    @property
    def byte_shape(self) -> tuple[int, ...]:
        return byte_shape(self.shape, self.qtype) if self.shape else (self.nbytes,)


class _Cursor:
    """Reads the header with bounds checks, so a truncated file fails with a clear message."""

    def __init__(self, fh, path: Path, size: int):
        self.fh, self.path, self.size, self.pos = fh, path, size, 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > self.size:
            raise CheckpointError(f"{self.path}: truncated GGUF file: reading {what} needs bytes "
                                  f"[{self.pos}, {self.pos + n}) but the file has {self.size} bytes; "
                                  "download or convert it again")
        data = self.fh.read(n)
        self.pos += n
        return data

    def unpack(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise CheckpointError(f"{self.path}: {what} at byte {self.pos - n} is not UTF-8 ({err})") from err

    def value(self, vtype: int, what: str):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype], what)
        if vtype == 8:
            return self.string(what)
        if vtype == 9:
            itype, count = self.unpack("<I", what), self.unpack("<Q", what)
            return [self.value(itype, what) for _ in range(count)]
        raise CheckpointError(f"{self.path}: {what} has unknown GGUF value type {vtype}; "
                              "the file is corrupt or from a newer GGUF version")


class GGUFFile(FileReader):
    """An open GGUF file: ``metadata`` (dict), ``tensors`` (name -> GGUFTensorInfo), ``read``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: GGUF file not found")
        self.size = self.path.stat().st_size
        self._fh = open(self.path, "rb")
        try:
            self._parse()
        except BaseException:
            self._fh.close()
            raise

    def _parse(self) -> None:
        cur = _Cursor(self._fh, self.path, self.size)
        magic = self._fh.read(4)
        if magic != GGUF_MAGIC:
            raise CheckpointError(f"{self.path}: not a GGUF file: expected magic {GGUF_MAGIC!r} at "
                                  f"byte 0, got {magic!r}")
        cur.pos = 4
        version = cur.unpack("<I", "the version")
        if version not in (2, 3):
            raise CheckpointError(f"{self.path}: GGUF version {version} is not supported (expected 2 "
                                  "or 3, little-endian); convert it again with a current gguf-py")
        n_tensors, n_kv = cur.unpack("<Q", "the tensor count"), cur.unpack("<Q", "the metadata count")
        self.metadata = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            self.metadata[key] = cur.value(cur.unpack("<I", f"metadata {key!r}"), f"metadata {key!r}")
        raw = [self._tensor_header(cur, i) for i in range(n_tensors)]
        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise CheckpointError(f"{self.path}: general.alignment={align!r}; expected a power of two")
        data_start = -(-cur.pos // align) * align
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, dims, type_id, rel in raw:
            self.tensors[name] = self._tensor_info(name, dims, type_id, data_start + rel, rel, align)

    def _tensor_header(self, cur: _Cursor, i: int):
        name = cur.string(f"the name of tensor #{i}")
        what = f"the info of tensor {name!r}"
        n_dims = cur.unpack("<I", what)
        if n_dims > 8:
            raise CheckpointError(f"{self.path}: tensor {name!r} claims {n_dims} dimensions; the file "
                                  "is corrupt")
        dims = [cur.unpack("<Q", what) for _ in range(n_dims)]
        return name, dims, cur.unpack("<I", what), cur.unpack("<Q", what)

    def _tensor_info(self, name, dims, type_id, offset, rel, align) -> GGUFTensorInfo:
        if name in self.tensors:
            raise CheckpointError(f"{self.path}: tensor {name!r} appears twice")
        try:
            qtype = GGMLType(type_id)
        except ValueError:
            raise CheckpointError(f"{self.path}: tensor {name!r} has GGML type id {type_id}, which "
                                  f"diffquant cannot read; supported: "
                                  f"{', '.join(f'{t.name}={t.value}' for t in GGMLType)}") from None
        shape = tuple(reversed(dims))  # GGUF lists the innermost dimension first
        try:
            nbytes = _prod(byte_shape(shape, qtype)) if shape else 0
        except QuantizationError as err:
            raise CheckpointError(f"{self.path}: tensor {name!r} of shape {list(shape)}: {err}") from None
        if rel % align:
            raise CheckpointError(f"{self.path}: tensor {name!r} data offset {rel} is not aligned to "
                                  f"{align} bytes; the file is corrupt")
        if offset + nbytes > self.size:
            raise CheckpointError(f"{self.path}: tensor {name!r} data [{offset}, {offset + nbytes}) lies "
                                  f"beyond the end of the file ({self.size} bytes); the file is "
                                  "truncated or corrupt")
        return GGUFTensorInfo(name, qtype, shape, offset, nbytes)

    def read(self, name: str) -> torch.Tensor:
        """The raw bytes of tensor ``name`` as uint8 of its ``byte_shape``, in a fresh buffer."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        self._fh.seek(info.offset)
        buf = bytearray(info.nbytes)
        if self._fh.readinto(buf) != info.nbytes:
            raise CheckpointError(f"{self.path}: tensor {name!r} is truncated")
        if not buf:
            return torch.empty(info.byte_shape, dtype=torch.uint8)
        return torch.frombuffer(buf, dtype=torch.uint8).reshape(info.byte_shape)

    def read_dequantized(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Tensor ``name`` decoded to ``dtype`` in its logical shape."""
        return dequantize(self.read(name), self.tensors[name].qtype, dtype)


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def write_gguf(path: str | os.PathLike, tensors, arch: str = "flux", metadata: dict | None = None) -> Path:
    """Write ``tensors`` (name -> (uint8 blocks, GGMLType)) to ``path`` with gguf-py's GGUFWriter.

    The file is written beside ``path`` and renamed into place, so a crash never leaves half a
    file under the final name.

    Example:
        >>> blocks = quantize(torch.randn(64, 64), GGMLType.Q8_0)             # doctest: +SKIP
        >>> write_gguf("w.gguf", {"proj.weight": (blocks, GGMLType.Q8_0)})    # doctest: +SKIP
    """
    from .quantizers.base import require

    gguf = require("gguf", "gguf")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        for key, value in (metadata or {}).items():
            writer.add_string(key, str(value))
        for name, (blocks, qtype) in tensors.items():
            data = blocks.detach().to("cpu").contiguous().numpy()
            writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType(int(qtype)))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
