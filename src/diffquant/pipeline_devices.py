"""A pipeline's devices: ``to()``, ``device``/``dtype``, model CPU offload and the VAE's memory
switches, as the mixin DiffusionPipeline takes (pipeline.py holds loading and saving).

Example:
    >>> pipe.enable_model_cpu_offload()      # doctest: +SKIP
    >>> pipe.to(torch.bfloat16)               # doctest: +SKIP
"""

from __future__ import annotations

import logging

import torch
from torch import nn

# DiffusionPipeline's logger: its warnings keep the name a user filters them by
logger = logging.getLogger("diffquant.pipeline")


class PipelineDevices:
    """``to``, ``device``, ``dtype``, offload hooks and VAE switches over ``self._modules()``;
    the state (``_offload_device``, ``_offload_hooks``) is set by DiffusionPipeline.__init__."""

    # -- devices ---------------------------------------------------------------------------
    def to(self, *args, **kwargs):
        """Move components to a device and/or cast to a dtype (quantized ones keep their dtype)."""
        dtype = kwargs.pop("dtype", None)
        device = kwargs.pop("device", None)
        for a in args:
            if isinstance(a, torch.dtype):
                dtype = a
            else:
                device = a
        if device is not None and self._offload_device is not None:
            logger.warning("to(%s): model CPU offload is enabled and moves components itself", device)
        for _, module in self._modules():
            if dtype is not None and not getattr(module, "is_quantized", False):
                module.to(dtype=dtype)
            if device is not None:
                module.to(device)
        return self

    @property
    def device(self) -> torch.device:
        for _, module in self._modules():
            for p in module.parameters():
                return p.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for _, module in self._modules():
            for p in module.parameters():
                if p.is_floating_point():
                    return p.dtype
        return torch.float32

    @property
    def _execution_device(self) -> torch.device:
        return self._offload_device if self._offload_device is not None else self.device

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device=None) -> None:
        """Keep components on the CPU; move each to ``device`` only while it runs.

        The device defaults to the machine's accelerator (cuda:gpu_id, ...) and, without one, to
        the CPU, where offload changes nothing but still runs.

        Example:
            >>> pipe.enable_model_cpu_offload()      # doctest: +SKIP
        """
        self.remove_all_hooks()
        if device is None:
            acc = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
            device = torch.device("cpu") if acc is None else \
                torch.device(acc.type, gpu_id if gpu_id is not None else 0)
        self._offload_device = torch.device(device)
        order = (self.model_cpu_offload_seq or "").split("->")
        modules = sorted(self._modules(), key=lambda nm: order.index(nm[0]) if nm[0] in order
                         else len(order))
        for _, module in modules:
            module.to("cpu")
            self._offload_hooks.append(module.register_forward_pre_hook(
                self._make_onload_hook(module), with_kwargs=True))

    # -- the VAE's memory switches, as the pipelines of diffusers before 0.40 offered them ------
    def enable_vae_tiling(self) -> None:
        """``pipe.vae.enable_tiling()``: decode (and encode) large images a tile at a time."""
        self._vae("enable_vae_tiling").enable_tiling()

    def disable_vae_tiling(self) -> None:
        self._vae("disable_vae_tiling").disable_tiling()

    def enable_vae_slicing(self) -> None:
        """``pipe.vae.enable_slicing()``: decode a batch one image at a time."""
        self._vae("enable_vae_slicing").enable_slicing()

    def disable_vae_slicing(self) -> None:
        self._vae("disable_vae_slicing").disable_slicing()

    def _vae(self, what: str):
        vae = getattr(self, "vae", None)
        if vae is None:
            raise AttributeError(f"{type(self).__name__}.{what}: this pipeline has no vae")
        return vae

    def _onload(self, module: nn.Module) -> torch.device:
        """With offload enabled, put ``module`` alone on the execution device; returns that device.

        Hooks call this before ``forward``; pipelines call it before other entry points
        (``vae.decode``) that a forward hook does not see.
        """
        if self.__dict__.get("_residency") is not None:
            self._residency.enter(module)  # drops the components of the other phases
        device = self._offload_device
        if device is None:
            return _device_of(module) or self.device
        for _, other in self._modules():
            if other is not module and device.type != "cpu" and _device_of(other) == device:
                other.to("cpu")  # one component on the accelerator at a time
        if _device_of(module) != device:
            module.to(device)
        return device

    def _make_onload_hook(self, module: nn.Module):
        def onload(mod, args, kwargs):
            device = self._onload(module)
            move = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731
            return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}

        return onload

    def maybe_free_model_hooks(self) -> None:
        """After a call with offload enabled, send every component back to the CPU."""
        if self._offload_device is not None:
            for _, module in self._modules():
                module.to("cpu")

    def remove_all_hooks(self) -> None:
        for handle in self._offload_hooks:
            handle.remove()
        self._offload_hooks, self._offload_device = [], None


def _device_of(module: nn.Module) -> torch.device | None:
    for p in module.parameters():
        return p.device
    return None
