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

import contextlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .safetensors_file import FileReader
from .errors import CheckpointError, QuantizationError
from .ops.formats.gguf import GGMLType, byte_shape, dequantize

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
GGML_MAX_DIMS = 4   # what ggml reads, and so what diffquant writes
# what it reads: gguf-py writes and reads more (a Wan file's 5-D patch embedding, as diffusers
# loads it), and nothing is unsafe about it; more than this is a corrupt count
READ_MAX_DIMS = 8
MAX_METADATA_VALUES = 1 << 24     # array elements over a file's metadata (an LLM vocabulary: ~1e5)
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
        self.budget = MAX_METADATA_VALUES  # array elements left to read, over the whole file

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
            self._check_array(itype, count, what)
            return [self.value(itype, what) for _ in range(count)]
        raise CheckpointError(f"{self.path}: {what} has unknown GGUF value type {vtype}; "
                              "the file is corrupt or from a newer GGUF version")


    def _check_array(self, itype: int, count: int, what: str) -> None:
        """As ggml: no arrays of arrays, at most 2**30 elements, and no more than the bytes
        left can hold; and at most MAX_METADATA_VALUES in all (Python values are ~50 bytes)."""
        least = struct.calcsize(_SCALARS[itype]) if itype in _SCALARS else 8
        if itype not in _SCALARS and itype != 8:
            raise CheckpointError(f"{self.path}: {what} is an array of GGUF type {itype}; ggml "
                                  "reads arrays of numbers, booleans or strings only")
        if count > min(1 << 30, self.budget) or count * least > self.size - self.pos:
            raise CheckpointError(f"{self.path}: {what} claims an array of {count:,} values at byte "
                                  f"{self.pos}, but the file has {self.size - self.pos:,} bytes left "
                                  f"(and diffquant reads at most {MAX_METADATA_VALUES:,} values); the "
                                  "file is corrupt")
        self.budget -= count


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
        n_tensors, n_kv = cur.unpack("<q", "the tensor count"), cur.unpack("<q", "the metadata count")
        if n_tensors < 0 or n_kv < 0:
            raise CheckpointError(f"{self.path}: negative tensor ({n_tensors}) or metadata ({n_kv}) "
                                  "count; the file is corrupt")
        self.metadata, types = {}, {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            if not key or key in self.metadata:
                raise CheckpointError(f"{self.path}: metadata key #{i} {key!r} is "
                                      f"{'empty' if not key else 'a duplicate'}; the file is corrupt")
            types[key] = cur.unpack("<I", f"metadata {key!r}")
            self.metadata[key] = cur.value(types[key], f"metadata {key!r}")
        raw = [self._tensor_header(cur, i) for i in range(n_tensors)]
        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if types.get("general.alignment", 4) != 4 or align <= 0 or align & (align - 1):
            raise CheckpointError(f"{self.path}: general.alignment={align!r}; expected a power of two "
                                  "stored as uint32")
        data_start = -(-cur.pos // align) * align
        self.tensors: dict[str, GGUFTensorInfo] = {}
        expected = 0  # as ggml: each tensor starts where the previous one ends, padded to align
        for name, dims, type_id, rel in raw:
            if rel != expected:
                raise CheckpointError(f"{self.path}: tensor {name!r} starts at data offset {rel}, but "
                                      f"the tensors before it end at {expected}; ggml requires "
                                      "tensors to follow each other (no gap, no overlap)")
            info = self._tensor_info(name, dims, type_id, data_start + rel, rel, align)
            self.tensors[name] = info
            expected = rel + -(-info.nbytes // align) * align

    def _tensor_header(self, cur: _Cursor, i: int):
        name = cur.string(f"the name of tensor #{i}")
        what = f"the info of tensor {name!r}"
        n_dims = cur.unpack("<I", what)
        if n_dims > READ_MAX_DIMS:
            raise CheckpointError(f"{self.path}: tensor {name!r} claims {n_dims} dimensions; "
                                  f"expected at most {READ_MAX_DIMS} (ggml itself reads "
                                  f"{GGML_MAX_DIMS}); the file is corrupt")
        dims = [cur.unpack("<q", what) for _ in range(n_dims)]
        if any(d < 0 for d in dims) or _prod(dims) >= 2**63:
            raise CheckpointError(f"{self.path}: tensor {name!r} has dimensions {dims}; each must be "
                                  "non-negative and their product below 2**63")
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


GGML_MAX_NAME = 64  # ggml's reader refuses tensor names of 64 bytes or more


def write_gguf(path: str | os.PathLike, tensors, arch: str = "flux", metadata: dict | None = None,
               *, progress: bool = False) -> Path:
    """Write ``tensors`` (name -> (uint8 blocks, GGMLType)) to ``path`` with gguf-py's GGUFWriter.

    ``metadata`` values are written with their own GGUF types: int as uint32 (uint64 when
    larger), float as float32, bool, str, and lists of those as arrays. ``general.alignment``
    (32) is always written, as ggml's reader checks it. Names must stay under ggml's 64 bytes and
    tensors within its 4 dimensions. The file is written beside ``path`` and renamed into place,
    so a crash never leaves half a file under the final name.

    Example:
        >>> blocks = quantize(torch.randn(64, 64), GGMLType.Q8_0)             # doctest: +SKIP
        >>> write_gguf("w.gguf", {"proj.weight": (blocks, GGMLType.Q8_0)},     # doctest: +SKIP
        ...            metadata={"general.quantization_version": 2})
    """
    from .quantizers.base import require

    gguf = require("gguf", "gguf")
    path, tmp = _temp_beside(path)
    for name, (blocks, _) in tensors.items():
        if len(name.encode()) >= GGML_MAX_NAME or blocks.dim() > GGML_MAX_DIMS:
            raise CheckpointError(f"{path}: tensor {name!r} of {blocks.dim()} dimensions cannot be "
                                  f"written: ggml reads names under {GGML_MAX_NAME} bytes and at "
                                  f"most {GGML_MAX_DIMS} dimensions")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        writer.add_custom_alignment(DEFAULT_ALIGNMENT)
        for key, value in (metadata or {}).items():
            _add_value(writer, gguf, key, value)
        for name, (blocks, qtype) in tensors.items():
            data = blocks.detach().to("cpu").contiguous().numpy()
            writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType(int(qtype)))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
        with open(tmp, "rb+") as fh:  # on disk before the rename makes it the file
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise _write_error(path, tmp, err) from err
    finally:
        for fh in writer.fout or ():  # after a failed write: close (a flush may fail again)
            with contextlib.suppress(OSError, ValueError):
                fh.close()
        if tmp.exists():
            tmp.unlink()
    return path


def _temp_beside(path) -> tuple[Path, Path]:
    """(the file to replace, a temporary name beside it): a link at ``path`` is followed, as a
    save into a linked folder is, and the temporary name fits NAME_MAX."""
    import uuid

    from .atomic import clean_leftovers, temp_stem

    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory; export_gguf writes one .gguf file")
    clean_leftovers(path)  # partial files of killed exports
    return path, path.with_name(f".{temp_stem(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _write_error(path: Path, tmp: Path, err: OSError) -> CheckpointError:
    """numpy's ``tofile`` reports a full disk as "N requested and 0 written", with no errno."""
    import errno
    import shutil

    cause = err.strerror
    if not err.errno:
        with contextlib.suppress(OSError):
            if shutil.disk_usage(tmp.parent).free < (1 << 20):
                cause = os.strerror(errno.ENOSPC)
    out = CheckpointError(f"{path}: could not write the GGUF file ({cause or err}); the partial "
                          "file was removed and what was at that path before is unchanged")
    out.errno = err.errno or (errno.ENOSPC if cause == os.strerror(errno.ENOSPC) else None)
    return out


def _add_value(writer, gguf, key: str, value) -> None:
    kind = gguf.GGUFValueType
    if isinstance(value, bool):
        writer.add_key_value(key, value, kind.BOOL)
    elif isinstance(value, int):
        writer.add_key_value(key, value, kind.UINT32 if 0 <= value < 2 ** 32 else kind.INT64)
    elif isinstance(value, float):
        writer.add_key_value(key, value, kind.FLOAT32)
    elif isinstance(value, (list, tuple)):
        writer.add_key_value(key, list(value), kind.ARRAY)
    else:
        writer.add_key_value(key, str(value), kind.STRING)
