"""The tensors an object keeps: every tensor reachable from it through attributes, containers,
tensor subclasses' inner tensors, and the closures and defaults of its functions, each storage
once. ``get_memory_footprint`` counts with it what a quantized layer keeps beside its parameters
and buffers (a prepared form, a cast scale, a decoded table), so the footprint is what the
layer holds after any number of forwards.

Example:
    >>> import torch
    >>> t = torch.zeros(4)
    >>> kept = {"a": [t, t[:2]], "f": (lambda: torch.ones(2, dtype=torch.float64))}
    >>> storage_bytes(reachable_tensors(kept))
    16
"""

from __future__ import annotations

import functools
import types
from typing import Iterable

import torch
from torch import nn

# objects that never hold a tensor
_LEAVES = (str, bytes, int, float, complex, bool, type(None), type, types.ModuleType,
           torch.dtype, torch.device, types.BuiltinFunctionType)


def reachable_tensors(root, into_modules: bool = False) -> list[torch.Tensor]:
    """The plain tensors reachable from ``root``; by default not descending into nn.Modules,
    whose own parameters and buffers their owner counts (``into_modules``: all of them, as
    bench/held.py measures a whole model)."""
    leaves = _LEAVES if into_modules else _LEAVES + (nn.Module,)
    seen, found, stack = set(), [], [root]
    while stack:
        o = stack.pop()
        if isinstance(o, leaves) or id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            if type(o) not in (torch.Tensor, nn.Parameter) and hasattr(o, "__tensor_flatten__"):
                stack.extend(getattr(o, n) for n in o.__tensor_flatten__()[0])
            else:
                found.append(o)
            stack.extend(vars(o).values())  # what is set on a tensor (bitsandbytes' quant_state)
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            stack.extend(o)
        elif isinstance(o, types.FunctionType):
            stack.extend(_cell(c) for c in o.__closure__ or ())
            stack.extend(o.__defaults__ or ())
        elif isinstance(o, types.MethodType):
            stack.extend((o.__self__, o.__func__))
        elif isinstance(o, functools.partial):
            stack.extend((o.func, o.args, o.keywords))
        else:
            stack.extend(getattr(o, "__dict__", {}).values())
            slots = getattr(type(o), "__slots__", ())
            stack.extend(getattr(o, s) for s in ((slots,) if isinstance(slots, str) else slots)
                         if hasattr(o, s))
    return found


def _cell(cell):
    try:
        return cell.cell_contents
    except ValueError:  # a closure variable not assigned yet
        return None


def storage_bytes(tensors: Iterable[torch.Tensor], seen: set | None = None) -> int:
    """Bytes of the storages behind ``tensors``, each once (``seen``: keys already counted,
    updated). Meta tensors hold nothing."""
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        if t.is_meta:
            continue
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total
