"""bitsandbytes' stored 4-bit QuantState, checked before it is trusted (bitsandbytes.py's
BnB4BitLinear uses these): the JSON blob of its non-tensor fields, and the sizes of the
statistics against the layer's weight (bitsandbytes itself would index past them).

Example:
    >>> import torch
    >>> quant_state_blob(torch.tensor(list(b'{"blocksize": 64, "shape": [4, 8]}'), dtype=torch.uint8), (4, 8))
    {'blocksize': 64, 'shape': [4, 8]}
"""

from __future__ import annotations

import json

import torch

from ..errors import CheckpointError


def quant_state_blob(tensor: torch.Tensor, shape: tuple) -> dict:
    """The non-tensor fields of a stored 4-bit QuantState (a uint8 tensor of JSON), checked."""
    try:
        meta = json.loads(tensor.cpu().numpy().tobytes().decode("utf-8")) if tensor.dtype == \
            torch.uint8 and tensor.dim() == 1 else None
    except (UnicodeDecodeError, ValueError, RecursionError):
        meta = None
    ok = isinstance(meta, dict) and list(meta.get("shape") or ()) == list(shape) and all(
        isinstance(meta.get(k), int) and not isinstance(meta.get(k), bool) and meta[k] > 0
        for k in ("blocksize",) + (("nested_blocksize",) if "nested_blocksize" in meta else ()))
    if not ok:
        raise CheckpointError(f"BnB4BitLinear: the quant_state blob should be bitsandbytes' JSON "
                              f"with shape {list(shape)} and a positive blocksize; got "
                              f"{str(meta)[:200] if meta is not None else 'unreadable bytes'}")
    return meta


def check_statistics(layer, name: str) -> None:
    """absmax has one value per block of the weight, the code books 16 (256 nested) values."""
    blocks = -(-layer.in_features * layer.out_features // layer._meta["blocksize"])
    want = {"weight_absmax": blocks, "weight_quant_map": 16}
    if layer.double_quant:
        want.update(weight_nested_absmax=-(-blocks // layer._meta.get("nested_blocksize", 256)),
                    weight_nested_quant_map=256)
    for attr, n in want.items():
        t = getattr(layer, attr)
        if t is not None and t.numel() != n:
            raise CheckpointError(f"bitsandbytes layer {name!r}: {attr.replace('_', '.', 1)} holds "
                                  f"{t.numel()} values, but a [{layer.out_features}, "
                                  f"{layer.in_features}] weight in blocks of "
                                  f"{layer._meta['blocksize']} needs {n}; the file is corrupt")
