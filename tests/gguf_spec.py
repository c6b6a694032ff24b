"""Check a .gguf file against the GGUF specification and ggml's reader, parsing it here with
``struct`` (not with gguf-py or diffquant, whose readers are under test).

The rules are ggml's ``gguf_init_from_file`` (ggml/src/gguf.cpp), which llama.cpp and
stable-diffusion.cpp load every file through, plus the specification's required keys:

- magic ``GGUF``, version 3, little-endian counts;
- ``general.architecture`` a string; ``general.quantization_version`` a uint32 when any
  tensor is quantized; ``general.alignment``, if present, a uint32 power of two;
- tensor names unique and under 64 bytes, at most 4 dimensions, the innermost (first)
  dimension a multiple of the type's block size;
- the data section starts at the first multiple of the alignment after the header; each
  tensor's offset is exactly where the previous one ends, padded to the alignment (offsets in
  order, no gaps, no overlap); the file holds every tensor's padded bytes.
"""

from __future__ import annotations

import struct
from pathlib import Path

# ggml type id -> (block size, bytes per block), from gguf-py's GGML_QUANT_SIZES
import gguf

BLOCKS = {int(t): v for t, v in gguf.GGML_QUANT_SIZES.items()}
QUANTIZED = {int(t) for t in gguf.GGML_QUANT_SIZES} - {0, 1, 30}  # all but F32, F16, BF16
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
           11: "<q", 12: "<d"}


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, fmt: str):
        value = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("<Q")
        self.pos += n
        return self.data[self.pos - n:self.pos].decode("utf-8")

    def value(self, vtype: int):
        if vtype == 8:
            return self.string()
        if vtype == 9:
            itype, count = self.take("<I"), self.take("<Q")
            return [self.value(itype) for _ in range(count)]
        return self.take(_SCALAR[vtype])


def check_gguf_file(path) -> dict:
    """Assert the rules above; returns {"metadata": {key: (type, value)}, "tensors": [...]}."""
    data = Path(path).read_bytes()
    r = _Reader(data)
    assert data[:4] == b"GGUF", "magic"
    r.pos = 4
    assert r.take("<I") == 3, "GGUF version 3"
    n_tensors, n_kv = r.take("<Q"), r.take("<Q")
    metadata = {}
    for _ in range(n_kv):
        key = r.string()
        vtype = r.take("<I")
        assert key not in metadata, f"duplicate key {key}"
        metadata[key] = (vtype, r.value(vtype))
    tensors = []
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.take("<I")
        dims = [r.take("<Q") for _ in range(n_dims)]
        tensors.append((name, dims, r.take("<I"), r.take("<Q")))
    assert metadata.get("general.architecture", (None,))[0] == 8, "general.architecture: string"
    align = 32
    if "general.alignment" in metadata:
        vtype, align = metadata["general.alignment"]
        assert vtype == 4 and align > 0 and align & (align - 1) == 0, "general.alignment: u32 2^k"
    if any(t[2] in QUANTIZED for t in tensors):
        assert metadata.get("general.quantization_version", (None,))[0] == 4, \
            "general.quantization_version: u32, required with quantized tensors"
    start = -(-r.pos // align) * align
    expected = 0
    names = set()
    for name, dims, qtype, offset in tensors:
        assert name not in names and len(name.encode()) < 64, f"name {name!r}"
        names.add(name)
        assert 1 <= len(dims) <= 4, f"{name}: {len(dims)} dims"
        block, size = BLOCKS[qtype]
        assert dims[0] % block == 0, f"{name}: ne[0]={dims[0]} not a multiple of {block}"
        assert offset == expected, f"{name}: offset {offset}, expected {expected}"
        nbytes = dims[0] // block * size
        for d in dims[1:]:
            nbytes *= d
        expected += -(-nbytes // align) * align
    assert len(data) >= start + expected, "file shorter than its tensors' padded bytes"
    return {"metadata": metadata, "tensors": tensors}
