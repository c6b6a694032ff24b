"""bitsandbytes' stored 4-bit QuantState, checked before it is trusted (bitsandbytes.py's
BnB4BitLinear uses these): the packed weight's size, the JSON blob of its non-tensor fields, and
the sizes of the statistics against the layer's weight (bitsandbytes itself would index past
them); and the fields a QuantState is rebuilt from.

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


def check_packed_weight(layer, tensor: torch.Tensor) -> None:
    """A stored packed 4-bit ``weight`` holds two codes a byte, in the config's storage dtype."""
    n_bytes = (layer.in_features * layer.out_features + 1) // 2
    if tensor.numel() * tensor.element_size() != n_bytes or tensor.is_floating_point() \
            and tensor.dtype != layer.quant_storage:
        raise CheckpointError(f"BnB4BitLinear: packed 4-bit 'weight' should hold {n_bytes} "
                              f"bytes of {layer.quant_storage}, got {tensor.dtype} "
                              f"{list(tensor.shape)}; is this checkpoint really 4-bit?")


def quant_state_fields(layer) -> dict:
    """``QuantState.from_dict``'s input: the layer's statistics buffers by their names after
    ``weight.`` ("absmax", "nested_quant_map" ...) and the blob's non-tensor fields."""
    pieces = {k.split(".", 1)[1]: getattr(layer, a) for k, a in layer.PIECES.items()
              if k not in ("weight", "weight.quant_state") and getattr(layer, a) is not None}
    return {**pieces, **layer._meta}
