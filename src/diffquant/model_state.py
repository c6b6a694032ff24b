"""What a loaded model is: its memory footprint, dequantize(), the casts a quantized model
refuses, its device and dtype; ModelMixin (modeling.py, the loading and saving) takes them as a
mixin.

Example:
    >>> model.get_memory_footprint()          # doctest: +SKIP
    >>> model.dequantize()                     # doctest: +SKIP
"""

from __future__ import annotations

import torch
from torch import nn


class ModelState(nn.Module):
    """Quantization state over ModelMixin's ``hf_quantizer``, ``is_quantized`` and
    ``quantization_method`` (class attributes there, set on the instance by a quantized load)."""

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """Bytes actually held by parameters (and buffers): the quantized size when quantized,
        plus whatever the quantized layers keep beside them (``QuantizedLinear.kept_tensors``:
        prepared forms for the fast path, cast scales), each storage once."""
        from .quantizers.base import QuantizedLinear  # lazy: the quantizers build on the models
        from .reachable import storage_bytes

        seen, total = set(), 0
        tensors = list(self.parameters()) + (list(self.buffers()) if return_buffers else [])
        for t in tensors:
            key = (t.untyped_storage().data_ptr(), t.device) if not t.is_meta else id(t)
            if key in seen:
                continue
            seen.add(key)
            total += t.numel() * t.element_size()
        kept = [t for m in self.modules() if isinstance(m, QuantizedLinear)
                for t in m.kept_tensors()]
        return total + storage_bytes(kept, seen)

    def dequantize(self):
        """Turn a quantized model back into a plain one in its compute dtype."""
        if self.hf_quantizer is None:
            raise ValueError(f"{type(self).__name__} is not quantized; nothing to dequantize")
        self.hf_quantizer.dequantize(self)
        config = {k: v for k, v in self.config.items()
                  if k not in ("quantization_config", "_pre_quantization_dtype")}
        object.__setattr__(self, "_internal_dict", type(self.config)(config))
        self.hf_quantizer, self.is_quantized, self.quantization_method = None, False, None
        return self

    def _refuse_cast(self, what: str):
        if self.is_quantized:
            method = getattr(self.quantization_method, "value", self.quantization_method)
            raise ValueError(f"{what} is not supported on a model quantized with {method}: its "
                             "weights are stored in the quantized format; load it again with "
                             "another torch_dtype, or dequantize() first")

    def to(self, *args, **kwargs):
        dtype = kwargs.get("dtype") or next((a for a in args if isinstance(a, torch.dtype)), None)
        if dtype is not None:
            self._refuse_cast(f".to({dtype})")
        return super().to(*args, **kwargs)

    def half(self, *args):
        self._refuse_cast(".half()")
        return super().half(*args)

    def float(self, *args):
        self._refuse_cast(".float()")
        return super().float(*args)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
