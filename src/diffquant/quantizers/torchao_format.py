"""torchao's on-disk form, at the file boundary of the torchao backend (``torchao.py``).

diffusers >= 0.38 saves a torchao model as safetensors of torchao's flattened tensor subclasses:
each quantized weight ``<layer>.weight`` (an ``Int8Tensor`` or ``Float8Tensor``) becomes
``<layer>._weight_qdata``, ``_weight_scale`` (and ``_weight_zero_point`` for int8), and the file's
metadata holds one JSON description per tensor name (``{"_type": "Int8Tensor", "_data":
{"block_size": [1, K], "dtype": ...}, "_tensor_data_names": [...]}``, ``{"_type": "Tensor"}`` for
plain ones) plus ``tensor_names``. ``flatten`` writes that form from diffquant's plain buffers with
torchao's own helper, ``torchao_pieces`` reads it (and torchao subclasses from ``.bin`` files)
back into them.
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import CheckpointError, QuantizationError

# torchao tensor subclass each kind is saved as (diffusers 0.42 + torchao 0.18); int4wo has none
# that diffusers can run on a CPU (see torchao.py's docstring), so it keeps plain keys.
TORCHAO_TENSOR = {"int8wo": "Int8Tensor", "int8dq": "Int8Tensor", "float8wo": "Float8Tensor"}
_FLAT_NAMES = {"_weight_qdata": "weight", "_weight_scale": "weight_scale",
               "_weight_zero_point": "weight_zero_point"}


# -- reading ------------------------------------------------------------------------------------
def torchao_pieces(name: str, tensor: torch.Tensor, kind: str, where: str) -> list[tuple[str, torch.Tensor]]:
    """One tensor of a torchao checkpoint -> diffquant's (piece name, tensor) pairs.

    A torchao subclass (from a .bin) is opened into qdata/scale; a zero point must be all zeros
    (diffquant's int8 is symmetric, as torchao's default) and is dropped.
    """
    if type(tensor).__name__ in ("Int8Tensor", "Float8Tensor"):
        if list(tensor.block_size) != [1, tensor.shape[-1]]:
            raise CheckpointError(f"{where}: torchao {type(tensor).__name__} with block_size "
                                  f"{list(tensor.block_size)}; diffquant reads per-row scales only")
        if getattr(tensor, "act_pre_scale", None) is not None:
            raise CheckpointError(f"{where}: torchao tensor with act_pre_scale (AWQ/SmoothQuant) is "
                                  "not supported")
        pairs = [("weight", tensor.qdata), ("weight_scale", tensor.scale)]
        if getattr(tensor, "zero_point", None) is not None:
            pairs.append(("weight_zero_point", tensor.zero_point))
    elif name == "weight" and type(tensor) is not torch.Tensor:
        raise CheckpointError(f"{where}: torchao {type(tensor).__name__} weights cannot be read by "
                              f"diffquant's {kind} layer; re-quantize from the original checkpoint")
    else:
        pairs = [(_FLAT_NAMES.get(name, name), tensor)]
    out = []
    for piece, value in pairs:
        value = value.as_subclass(torch.Tensor) if type(value) is not torch.Tensor else value
        if piece == "weight_zero_point":
            if value.any():
                raise CheckpointError(f"{where}: nonzero torchao zero_point (asymmetric int8); "
                                      "diffquant reads symmetric int8 only")
            continue
        out.append((piece, value.reshape(value.shape[0], -1) if piece == "weight_scale" else value))
    return out


# -- writing ------------------------------------------------------------------------------------
def flatten(layers: dict, state_dict: dict, config) -> tuple[dict, dict[str, str]]:
    """diffusers 0.42's safetensors form of a state dict whose ``layers`` (name -> TorchAoLinear)
    were quantized as torchao ``config`` (an AOBaseConfig): (tensors, metadata).

    Each quantized weight becomes the tensor subclass torchao itself builds for ``config``, and
    torchao's ``flatten_tensor_state_dict`` names its pieces and writes the metadata. The
    subclasses are built over meta tensors (that helper copies every piece it flattens: a second
    copy of the model) and the stored buffers are put back under the names it gave.

    Example:
        >>> tensors, metadata = flatten({"x": layer}, model.state_dict(), Int8WeightOnlyConfig())  # doctest: +SKIP
        >>> sorted(tensors)  # doctest: +SKIP
        ['x._weight_qdata', 'x._weight_scale', 'x._weight_zero_point', 'x.bias']
    """
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    described, real, templates = {}, {}, {}
    for key, value in state_dict.items():
        prefix = key.rpartition(".")[0]
        layer = layers.get(prefix)
        if layer is None:
            described[key] = value
        elif prefix + ".weight" not in described:  # nn.Linear's order: weight, then bias
            dtype = layer.compute_dtype or torch.bfloat16
            if dtype not in templates:
                templates[dtype] = _template(config, dtype)
            described[prefix + ".weight"], pieces = _subclass(layer, templates[dtype], dtype)
            real.update({f"{prefix}._weight_{name}": t for name, t in pieces.items()})
            if layer.bias is not None:
                described[prefix + ".bias"] = state_dict[prefix + ".bias"]
    flat, metadata = flatten_tensor_state_dict(described)
    for key, value in flat.items():
        if value.is_meta:
            if key not in real:
                raise QuantizationError(f"torchao's flatten_tensor_state_dict named a piece {key!r}; "
                                        f"diffquant expected one of {sorted(real)[:4]}...")
            flat[key] = real[key]
    return flat, metadata


def _template(config, dtype: torch.dtype) -> torch.Tensor:
    """The weight torchao's ``quantize_`` makes for ``config`` on a 1 x 32 meta linear: its class
    and attributes (act_quant_kwargs, kernel_preference, ...) are what diffusers saves."""
    from torchao.quantization import quantize_

    if dataclasses.is_dataclass(config) and hasattr(config, "set_inductor_config"):
        config = dataclasses.replace(config, set_inductor_config=False)  # no global side effect
    linear = torch.nn.Linear(32, 1, bias=False, device="meta", dtype=dtype)
    quantize_(linear, config)
    return linear.weight


def _subclass(layer, template, dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(``template``'s class over meta pieces shaped as ``layer``'s, {piece name: stored tensor})."""
    cls = type(template)
    n, k = layer.out_features, layer.in_features
    if layer.weight.dtype != template.qdata.dtype:
        raise QuantizationError(f"{cls.__name__}: a {layer.weight.dtype} weight, torchao stores "
                                f"{template.qdata.dtype} for this config")
    pieces = {"qdata": layer.weight, "scale": layer.weight_scale.reshape(n, 1)}
    for name in getattr(cls, "optional_tensor_data_names", ()):
        value = getattr(template, name, None)
        if value is None:
            continue
        if name != "zero_point":
            raise QuantizationError(f"{cls.__name__}.{name}: diffquant stores no such piece")
        pieces[name] = torch.zeros(n, 1, dtype=value.dtype, device=layer.weight.device)  # symmetric
    names = [*cls.tensor_attribute_names, *getattr(cls, "optional_tensor_attribute_names", ())]
    attrs = {a: getattr(template, a) for a in names}
    attrs.update(block_size=[1, k], dtype=dtype)  # [N, K] [N, 1]: one scale per output row
    meta = {name: torch.empty(t.shape, dtype=t.dtype, device="meta") for name, t in pieces.items()}
    return cls(**meta, **attrs), pieces
