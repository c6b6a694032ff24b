"""The low-rank branch beside a linear layer: ``y = base(x) + sum_i s_i * (x @ A_i.T) @ B_i.T``.

The base layer (``nn.Linear`` or any backend's quantized linear) is left where it is and runs
as before on the same ``x``, so its stored weight is never rebuilt and its few-row kernels stay
in use; a forward hook adds each active adapter's product to its output. The adapters of one
layer live in a ``LoraTarget``, all targets in the model's ``LoraLayers`` container, which is a
submodule (``.to()``, offload and ``get_memory_footprint`` see the adapters) but writes nothing
into the model's state dict, so ``save_pretrained`` stays the base model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.cpu.dispatch import float32_product


@dataclass
class LoraState:
    """What every target of one model reads on each call (set by the model's LoRA API)."""

    active: list[str] = field(default_factory=list)         # adapters that run, in order
    weights: dict[str, float] = field(default_factory=dict)  # set_adapters' weight per adapter
    enabled: bool = True                                     # disable_lora() / enable_lora()
    call_scale: float = 1.0                                  # joint_attention_kwargs["scale"]


class _NotInStateDict(nn.Module):
    """A module whose tensors are the adapters', not the model's: left out of the model's state
    dict and of ``load_state_dict`` (the LoRA API saves and loads them)."""

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        return {} if destination is None else destination

    def _load_from_state_dict(self, *args, **kwargs):
        return None


class LoraFactors(_NotInStateDict):
    """One adapter on one layer: ``down`` (A) [rank, k], ``up`` (B) [out, rank], ``alpha``.

    ``k`` may be less than the layer's ``in_features``: the adapter then reads the first ``k``
    input columns (diffusers pads such an A with zeros: XLabs' single-block ``proj_lora``)."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, alpha: float | None):
        super().__init__()
        self.down = nn.Parameter(down, requires_grad=False)
        self.up = nn.Parameter(up, requires_grad=False)
        self.alpha = alpha
        self.scale = 1.0 if alpha is None else alpha / down.shape[0]

    def delta(self, in_features: int) -> torch.Tensor:
        """The weight update ``scale * up @ down`` [out, in_features], float32."""
        d = self.scale * (self.up.float() @ self.down.float())         # [out, k]
        return F.pad(d, (0, in_features - d.shape[1])) if d.shape[1] < in_features else d


class LoraTarget(_NotInStateDict):
    """The adapters of one layer and the hook that adds them to its output."""

    def __init__(self, state: LoraState):
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.state = state
        self.fused: set[str] = set()   # adapters merged into the base weight (skipped here)
        self.saved = None              # fuse.snapshot of the base layer before its first fuse
        self.handle = None

    def attach(self, base: nn.Module) -> None:
        self.detach()
        self.handle = base.register_forward_hook(self.hook)

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def hook(self, module, args, out):
        state = self.state
        if not state.enabled:
            return None
        run = [(self.adapters[n], self.adapters[n].scale * state.weights[n] * state.call_scale)
               for n in state.active if n in self.adapters and n not in self.fused]
        run = [(factors, scale) for factors, scale in run if scale != 0]
        return add_products(out, args[0], run) if run else None


def add_products(out: torch.Tensor, x: torch.Tensor, run) -> torch.Tensor:
    """``out + sum_i s_i * (x @ down_i.T) @ up_i.T`` for ``run`` = [(LoraFactors, s_i)];
    out [..., out_features], x [..., in_features]; ``out`` itself is never written.

    Adapters that read the same inputs are stacked (down [R, k], up [out, R], R the sum of their
    ranks), so each group costs two products and one pass over the output, however many
    adapters it holds. Where torch has no bf16 (fp16) matmul kernel for this CPU, the products
    are computed in float32 (ops/cpu/dispatch.py's rule for the quantized layers' products too;
    torch's generic bf16 loop took 30x the float32 route for a rank-64 product here) and added
    to a float32 copy of ``out``, rounded once at the end (one conversion pass each way: a
    mixed-dtype add took twice as long); otherwise they accumulate onto ``out`` in its dtype.
    """
    dtype = torch.float32 if float32_product(x) else x.dtype
    x = x.to(dtype)
    flat = out.reshape(-1, out.shape[-1])                                  # [N, out]
    acc = flat.to(dtype) if dtype != out.dtype else None                   # [N, out] float32
    for down, up, scale in _stacked(run, dtype):                           # [R, k], [out, R]
        xs = x if down.shape[1] == x.shape[-1] else x[..., :down.shape[1]]
        h = F.linear(xs, down)                                             # [..., R]
        h = h.reshape(-1, h.shape[-1]).mul_(scale)                         # [N, R]
        if acc is None:
            acc = torch.addmm(flat, h, up.t())                             # out + first product
        else:
            acc.addmm_(h, up.t())
    return (acc if acc.dtype == out.dtype else acc.to(out.dtype)).view(out.shape)


def _stacked(run, dtype):
    """(down [R, k], up [out, R], scale: a number or [R]) per input width k in ``run``, the
    adapters in their order; one adapter is used as it is (no copy)."""
    groups: dict[int, list] = {}
    for factors, scale in run:
        groups.setdefault(factors.down.shape[1], []).append((factors, scale))
    for group in groups.values():
        if len(group) == 1:
            (factors, scale), = group
            yield factors.down.to(dtype), factors.up.to(dtype), scale
            continue
        down = torch.cat([f.down.to(dtype) for f, _ in group])
        up = torch.cat([f.up.to(dtype) for f, _ in group], dim=1)
        scale = torch.cat([torch.full((f.down.shape[0],), s, dtype=dtype, device=down.device)
                           for f, s in group])
        yield down, up, scale


class LoraLayers(_NotInStateDict):
    """Every ``LoraTarget`` of a model, keyed by the target's module name ('.' written '/')."""

    def __init__(self):
        super().__init__()
        self.targets = nn.ModuleDict()
        self.state = LoraState()
        self.adapter_names: list[str] = []   # in load order

    @staticmethod
    def key(module_name: str) -> str:
        return module_name.replace(".", "/")

    def items(self):
        return [(k.replace("/", "."), t) for k, t in self.targets.items()]

    def target(self, module_name: str) -> LoraTarget:
        key = self.key(module_name)
        if key not in self.targets:
            self.targets[key] = LoraTarget(self.state)
        return self.targets[key]
