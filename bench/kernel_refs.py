"""The layers diffusers would run for each format of ``bench/kernels.py``, for its library column.

Each is built with the library diffusers uses for the scheme, from the same float weight (or, for
GGUF, the same raw ggml blocks) as diffquant's layer, in bf16:

- torchao ``int8wo`` / ``int8dq``: ``quantize_(nn.Linear, Int8WeightOnlyConfig())`` /
  ``Int8DynamicActivationInt8WeightConfig()``; ``int4wo``: torchao's default int4 layout needs
  the unpublished ``mslk`` package, so its CPU layout ``PrototypeInt4WeightOnlyConfig``
  (``Int4OpaqueTensor``, torch's ``_weight_int4pack_mm_for_cpu``), which a diffusers user passes
  to ``TorchAoConfig`` on a CPU;
- GGUF: diffusers' ``GGUFLinear`` holding a ``GGUFParameter`` of the blocks, compute dtype bf16,
  so its forward is diffusers' ``dequantize_gguf_tensor`` then ``F.linear``;
- quanto: optimum.quanto's ``quantize(module, weights=qint8 / qint4)`` then ``freeze``;
- bitsandbytes NF4: bitsandbytes' ``Linear4bit`` (compute dtype bf16), the layer diffusers
  swaps in. diffusers itself refuses to load a bitsandbytes model without a GPU, so on a CPU
  this column is bitsandbytes' own layer, which runs there.

A layer that cannot be built is reported as the string ``"n/a: <reason>"``, never raised.

Example:
    >>> import torch
    >>> lib = library_layer("int8wo", torch.randn(32, 64), torch.zeros(32, dtype=torch.bfloat16))
    >>> lib(torch.randn(3, 64, dtype=torch.bfloat16)).shape
    torch.Size([3, 32])
"""

from __future__ import annotations

from typing import Callable, Union

import torch
import torch.nn as nn

BF16 = torch.bfloat16
GGUF_FORMATS = ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")

Forward = Callable[[torch.Tensor], torch.Tensor]


def int4_group(k: int) -> int:
    """Group size of both int4wo layers: torchao's default 128, smaller where K needs it (torchao
    would otherwise leave the weight unquantized, a bf16 linear in disguise)."""
    return next((g for g in (128, 64, 32) if k % g == 0), 128)


def _linear(w: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    """An nn.Linear in bf16 holding w [N, K] and bias [N]."""
    n, k = w.shape
    with torch.device("meta"):
        lin = nn.Linear(k, n)
    lin.weight = nn.Parameter(w.to(BF16), requires_grad=False)
    lin.bias = nn.Parameter(bias.to(BF16), requires_grad=False)
    return lin


def _torchao(fmt: str, w: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    from torchao.quantization import (Int8DynamicActivationInt8WeightConfig,
                                      Int8WeightOnlyConfig, quantize_)
    from torchao.utils import TorchAOBaseTensor

    if fmt == "int4wo":
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        config = PrototypeInt4WeightOnlyConfig(group_size=int4_group(w.shape[1]))
    else:
        config = {"int8wo": Int8WeightOnlyConfig,
                  "int8dq": Int8DynamicActivationInt8WeightConfig}[fmt]()
    lin = _linear(w, bias)
    quantize_(lin, config)
    if not isinstance(lin.weight, TorchAOBaseTensor):
        raise ValueError(f"torchao left the {list(w.shape)} weight unquantized")
    return lin


def _gguf(fmt: str, blocks: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    import gguf
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[fmt]]
    n, k = blocks.shape[0], blocks.shape[1] // size * block
    with torch.device("meta"):  # as diffusers' _replace_with_gguf_linear (init_empty_weights)
        lin = GGUFLinear(k, n, bias=True, compute_dtype=BF16)
    # as diffusers' GGUF loader and GGUFQuantizer.create_quantized_param place it
    lin.weight = GGUFParameter(blocks, quant_type=gguf.GGMLQuantizationType[fmt])
    lin.bias = nn.Parameter(bias.to(BF16), requires_grad=False)
    return lin


def _quanto(fmt: str, w: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    from optimum.quanto import freeze, qint4, qint8, quantize

    model = nn.Sequential(_linear(w, bias))  # quanto swaps children, not the module it is given
    quantize(model, weights={"quanto int8": qint8, "quanto int4": qint4}[fmt])
    freeze(model)
    return model[0]


def library_layer(fmt: str, w: torch.Tensor, bias: torch.Tensor,
                  blocks: torch.Tensor | None = None) -> Union[Forward, str]:
    """w [N, K] float32, bias [N], ``blocks`` the raw ggml blocks for GGUF formats -> forward
    x [M, K] bf16 -> [M, N] bf16 of the library layer diffusers runs, or ``"n/a: <reason>"``."""
    try:
        if fmt in GGUF_FORMATS:
            return _gguf(fmt, blocks, bias)
        if fmt.startswith("quanto"):
            return _quanto(fmt, w, bias)
        if fmt == "bnb nf4":
            return _bnb_nf4(w, bias)
        return _torchao(fmt, w, bias)
    except Exception as e:  # noqa: BLE001 - a missing package or a refused shape is a table cell
        reason = str(e).splitlines()[0][:80] if str(e) else ""
        return f"n/a: {type(e).__name__}: {reason}".rstrip(": ")


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: how far a layer's output is from the library's (0 = identical)."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def _bnb_nf4(w: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    import bitsandbytes as bnb

    n, k = w.shape
    lin = bnb.nn.Linear4bit(k, n, bias=True, compute_dtype=BF16, quant_type="nf4")
    # as diffusers' loader: the bf16 weight in a Params4bit, quantized when it reaches its device
    lin.weight = bnb.nn.Params4bit(w.to(BF16), requires_grad=False, quant_type="nf4")
    lin.bias = nn.Parameter(bias.to(BF16), requires_grad=False)
    return lin.to(w.device)
