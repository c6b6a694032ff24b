"""Single-file checkpoints: ``ModelMixin.from_single_file`` and ``export_gguf``.

``from_single_file`` loads one ``.gguf`` or ``.safetensors`` file whose keys are diffusers'
or those of Black Forest Labs' original Flux code (``double_blocks.N.img_attn.qkv`` ...).
Original keys are mapped to diffusers' by a plan (target key -> rows of a source tensor), so
fused tensors split without reading the file twice: ``qkv`` becomes ``to_q/to_k/to_v`` and
``linear1`` becomes ``to_q/to_k/to_v/proj_mlp`` by slicing rows, which is valid on GGUF
blocks too because ggml blocks run along a row. Tensors are read one at a time.

Without ``config``, a Flux config is inferred from the tensor shapes (block counts, widths).

Example:
    >>> import torch
    >>> from diffquant import FluxTransformer2DModel, GGUFQuantizationConfig
    >>> m = FluxTransformer2DModel.from_single_file("flux1-dev-Q8_0.gguf",         # doctest: +SKIP
    ...         quantization_config=GGUFQuantizationConfig(torch.bfloat16), torch_dtype=torch.bfloat16)
    >>> export_gguf(m, "flux-Q8_0.gguf", "Q8_0")     # community layout   # doctest: +SKIP
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .safetensors_file import SafetensorsFile
from .errors import CheckpointError, ConfigError
from .gguf_file import GGUFFile
from .hub import resolve_dir
from .ops.formats.gguf import FLOAT_TYPES, dequantize

logger = logging.getLogger(__name__)

PREFIXES = ("model.diffusion_model.",)


# -- the file: GGUF blocks or safetensors floats, one tensor at a time ------------------------
class _Source:
    def __init__(self, path: Path):
        self.path = path
        if path.suffix == ".gguf":
            self._gguf, self._st = GGUFFile(path), None
            self.entries = {n: (i.shape, i.qtype) for n, i in self._gguf.tensors.items()}
        elif path.suffix == ".safetensors":
            self._gguf, self._st = None, SafetensorsFile(path)
            self.entries = {n: (self._st.shape(n), None) for n in self._st.keys()}
        else:
            raise CheckpointError(f"{path}: expected a .gguf or .safetensors file")

    def read(self, name: str) -> torch.Tensor:
        """GGUF: uint8 blocks [..., bytes] (floats for F32/F16/BF16); safetensors: the tensor."""
        if self._st is not None:
            return self._st.tensor(name)
        blocks, qtype = self._gguf.read(name), self.entries[name][1]
        return blocks.view(FLOAT_TYPES[qtype]) if qtype in FLOAT_TYPES and blocks.dim() else blocks

    def close(self):
        (self._gguf or self._st).close()


class Piece(NamedTuple):
    source: str
    start: int | None = None   # rows [start, stop) of the source; None = all
    stop: int | None = None
    swap_halves: bool = False  # BFL's final modulation is (shift, scale); diffusers' (scale, shift)


# -- original Flux (BFL) key names -> diffusers' -------------------------------------------------
_D, _S = r"double_blocks\.(\d+)\.", r"single_blocks\.(\d+)\."
_T, _ST = r"transformer_blocks.\1.", r"single_transformer_blocks.\1."
_FLUX_RENAMES = [(re.compile(f"^{a}$"), b) for a, b in [
    (r"time_in\.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    (r"time_in\.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    (r"vector_in\.in_layer", "time_text_embed.text_embedder.linear_1"),
    (r"vector_in\.out_layer", "time_text_embed.text_embedder.linear_2"),
    (r"guidance_in\.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    (r"guidance_in\.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    (r"txt_in", "context_embedder"), (r"img_in", "x_embedder"), (r"final_layer\.linear", "proj_out"),
    (_D + r"img_mod\.lin", _T + "norm1.linear"), (_D + r"txt_mod\.lin", _T + "norm1_context.linear"),
    (_D + r"img_mlp\.0", _T + "ff.net.0.proj"), (_D + r"img_mlp\.2", _T + "ff.net.2"),
    (_D + r"txt_mlp\.0", _T + "ff_context.net.0.proj"), (_D + r"txt_mlp\.2", _T + "ff_context.net.2"),
    (_D + r"img_attn\.proj", _T + "attn.to_out.0"), (_D + r"txt_attn\.proj", _T + "attn.to_add_out"),
    (_D + r"img_attn\.norm\.query_norm", _T + "attn.norm_q"),
    (_D + r"img_attn\.norm\.key_norm", _T + "attn.norm_k"),
    (_D + r"txt_attn\.norm\.query_norm", _T + "attn.norm_added_q"),
    (_D + r"txt_attn\.norm\.key_norm", _T + "attn.norm_added_k"),
    (_S + r"modulation\.lin", _ST + "norm.linear"), (_S + r"linear2", _ST + "proj_out"),
    (_S + r"norm\.query_norm", _ST + "attn.norm_q"), (_S + r"norm\.key_norm", _ST + "attn.norm_k"),
]]
_FLUX_SPLITS = [(re.compile(f"^{a}$"), b) for a, b in [
    (_D + r"img_attn\.qkv", [_T + "attn.to_q", _T + "attn.to_k", _T + "attn.to_v"]),
    (_D + r"txt_attn\.qkv", [_T + "attn.add_q_proj", _T + "attn.add_k_proj", _T + "attn.add_v_proj"]),
    (_S + r"linear1", [_ST + "attn.to_q", _ST + "attn.to_k", _ST + "attn.to_v", _ST + "proj_mlp"]),
]]


def is_bfl_flux(keys) -> bool:
    return any(k.startswith(("double_blocks.", "single_blocks.")) for k in keys)


def flux_bfl_plan(shapes: dict[str, tuple]) -> dict[str, Piece]:
    """Diffusers key -> Piece of a BFL-named source tensor; unknown keys keep their names."""
    plan = {}
    for key, shape in shapes.items():
        stem, _, leaf = key.rpartition(".")
        leaf = "weight" if leaf == "scale" else leaf
        if stem == "final_layer.adaLN_modulation.1":
            plan[f"norm_out.linear.{leaf}"] = Piece(key, swap_halves=True)
            continue
        for pattern, targets in _FLUX_SPLITS:
            if pattern.match(stem):
                inner = _split_width(stem, shape, shapes, len(targets))
                bounds = [i * inner for i in range(len(targets))] + [shape[0]]
                for j, target in enumerate(targets):
                    plan[f"{pattern.sub(target, stem)}.{leaf}"] = Piece(key, bounds[j], bounds[j + 1])
                break
        else:
            new = next((p.sub(t, stem) for p, t in _FLUX_RENAMES if p.match(stem)), None)
            plan[f"{new}.{leaf}" if new else key] = Piece(key)
    return plan


def _split_width(stem: str, shape: tuple, shapes: dict, parts: int) -> int:
    if parts == 3:  # qkv: three equal parts
        return shape[0] // 3
    proj = shapes.get(stem.replace("linear1", "linear2") + ".weight")  # linear2: [inner, inner + mlp]
    if proj is None:
        raise CheckpointError(f"tensor {stem!r}: cannot split linear1 into q, k, v, mlp without "
                              f"{stem.replace('linear1', 'linear2')}.weight")
    return proj[0]


def piece_shape(piece: Piece, shape: tuple) -> tuple:
    if piece.start is None:
        return tuple(shape)
    return (piece.stop - piece.start, *shape[1:])


def infer_flux_config(shapes: dict[str, tuple], source: str, overrides: dict = ()) -> dict:
    """FluxTransformer2DModel init arguments from diffusers-named tensor shapes (+ overrides)."""
    def need(key):
        if key not in shapes:
            raise ConfigError(f"{source}: cannot infer the model config: tensor {key!r} is missing; "
                              "pass config=<directory with config.json>")
        return shapes[key]

    inner, in_channels = need("x_embedder.weight")
    norm = "transformer_blocks.0.attn.norm_q.weight"
    head_dim = need(norm if norm in shapes else "single_transformer_blocks.0.attn.norm_q.weight")[0]
    out_channels = need("proj_out.weight")[0]
    count = lambda prefix: len({k.split(".")[1] for k in shapes if k.startswith(prefix)})  # noqa: E731
    config = dict(patch_size=1, in_channels=in_channels,
                  out_channels=None if out_channels == in_channels else out_channels,
                  num_layers=count("transformer_blocks."),
                  num_single_layers=count("single_transformer_blocks."),
                  attention_head_dim=head_dim, num_attention_heads=inner // head_dim,
                  joint_attention_dim=need("context_embedder.weight")[1],
                  pooled_projection_dim=need("time_text_embed.text_embedder.linear_1.weight")[1],
                  guidance_embeds="time_text_embed.guidance_embedder.linear_1.weight" in shapes)
    config.update(overrides)
    if "axes_dims_rope" in overrides:
        return config
    if head_dim != 128:  # rope axes are not visible in the weights; Flux's are (16, 56, 56)
        raise ConfigError(f"{source}: attention_head_dim={head_dim}, so the rope axes cannot be "
                          "inferred (Flux's (16, 56, 56) needs 128); pass axes_dims_rope=(...) or "
                          "config=<directory with config.json>")
    config["axes_dims_rope"] = (16, 56, 56)
    return config


# -- the plan as a checkpoint that ModelMixin._assign_from streams ------------------------------
class _PlannedCheckpoint:
    """keys/shape/tensor/file_of over a plan; quantized pieces stay blocks where ``keep`` says so.

    For a GGUF layer, a quantized weight ``x.weight`` comes as its uint8 blocks plus an extra
    key ``x.weight_qtype``; every other tensor comes decoded to floats.
    """

    def __init__(self, source: _Source, plan: dict[str, Piece], keep):
        self.source, self.plan, self._cache = source, plan, (None, None)
        self._qtypes = {}
        for key, piece in plan.items():
            qtype = source.entries[piece.source][1]
            if qtype is not None and qtype not in FLOAT_TYPES and keep(key):
                self._qtypes[key + "_qtype"] = qtype
        self._keys = []
        for key in plan:
            self._keys.append(key)
            if key + "_qtype" in self._qtypes:
                self._keys.append(key + "_qtype")

    def keys(self) -> list[str]:
        return self._keys

    def file_of(self, key: str) -> Path:
        return self.source.path

    def shape(self, key: str) -> tuple:
        if key in self._qtypes:
            return ()
        piece = self.plan[key]
        return piece_shape(piece, self.source.entries[piece.source][0])

    def tensor(self, key: str) -> torch.Tensor:
        if key in self._qtypes:
            return torch.tensor(int(self._qtypes[key]), dtype=torch.int32)
        piece = self.plan[key]
        if self._cache[0] != piece.source:  # split pieces of one tensor come one after another
            self._cache = (piece.source, self.source.read(piece.source))
        data = self._cache[1]
        if piece.start is not None:
            data = data[piece.start:piece.stop]
        if piece.swap_halves:
            data = torch.cat(data.chunk(2, dim=0)[::-1], dim=0)
        qtype = self.source.entries[piece.source][1]
        if data.dtype == torch.uint8 and key + "_qtype" not in self._qtypes:
            data = dequantize(data, qtype, torch.float32)
        return data.contiguous()


def _resolve_config(cls, config, subfolder, shapes: dict, path: Path, overrides: dict,
                    hub: dict) -> dict:
    if isinstance(config, dict):
        return {**config, **overrides}
    if config is None:
        if "x_embedder.weight" in shapes and "context_embedder.weight" in shapes:
            return infer_flux_config(shapes, str(path), overrides)
        raise ConfigError(f"{path}: cannot infer a {cls.__name__} config from this file; pass "
                          "config=<directory (or hub id) holding its config.json>")
    if subfolder is None:  # a model's folder, or a pipeline's (hub id or directory)
        root = resolve_dir(config, allow_patterns=[cls.config_name,
                                                   f"transformer/{cls.config_name}"], **hub)
        if not (root / cls.config_name).is_file() and \
                (root / "transformer" / cls.config_name).is_file():
            subfolder = "transformer"
    return {**cls.load_config(config, subfolder=subfolder, **hub), **overrides}


def _make_quantizer(quantization_config, source: _Source):
    if quantization_config is None:
        return None
    from .quantizers.auto import DiffusersAutoQuantizer

    blocks = source.path.suffix == ".gguf" and getattr(quantization_config, "quant_type", None) is None
    return DiffusersAutoQuantizer.from_config(quantization_config, pre_quantized=blocks)


def open_single_file(cls, path, torch_dtype, kwargs: dict):
    """(torch_dtype, local path, hub arguments) of a ``from_single_file`` call; errors name the
    file or the argument."""
    from .hub import resolve_single_file, split_hub_kwargs
    from .modeling import parse_torch_dtype

    torch_dtype = parse_torch_dtype(torch_dtype, f"{cls.__name__}.from_single_file")
    if torch_dtype == "auto":  # a .gguf file's tensors each have their own (F32, F16, BF16)
        raise ConfigError(f"{cls.__name__}.from_single_file: torch_dtype='auto' has no single "
                          "dtype to follow in a single file; name one (torch.bfloat16) or pass "
                          "None")
    hub = split_hub_kwargs(kwargs)
    path = resolve_single_file(path, **hub)
    if not path.is_file():
        raise CheckpointError(f"{path}: single-file checkpoint not found (a local .gguf or "
                              ".safetensors file, or a https://huggingface.co/ORG/REPO/blob/"
                              "REVISION/FILE link, is expected)")
    return torch_dtype, path, hub


def load_single_file(cls, path, *, config=None, subfolder: str | None = None,
                     quantization_config=None, torch_dtype: torch.dtype | None = None,
                     device_map=None, **kwargs):
    """``cls.from_single_file``: see this module's docstring."""
    torch_dtype, path, hub = open_single_file(cls, path, torch_dtype, kwargs)
    source = _Source(path)
    try:
        names = {k: k[len(p):] for k in source.entries for p in PREFIXES if k.startswith(p)}
        shapes = {names.get(k, k): v[0] for k, v in source.entries.items()}
        plan = flux_bfl_plan(shapes) if is_bfl_flux(shapes) else {k: Piece(k) for k in shapes}
        back = {v: k for k, v in names.items()}
        plan = {t: p._replace(source=back.get(p.source, p.source)) for t, p in plan.items()}
        target_shapes = {t: piece_shape(p, source.entries[p.source][0]) for t, p in plan.items()}
        params = cls.init_kwargs_from_config(kwargs, source="from_single_file arguments")
        config_dict = _resolve_config(cls, config, subfolder, target_shapes, path, params, hub)
        model = load_planned(cls, source, plan, config_dict, quantization_config, torch_dtype,
                             device_map)
    finally:
        source.close()
    if model.hf_quantizer is None and torch_dtype is not None:
        model.to(torch_dtype)
    return model


def load_planned(cls, source, plan: dict[str, Piece], config_dict: dict, quantization_config,
                 torch_dtype, device_map):
    """Build ``cls`` from ``config_dict`` on meta, quantize it as configured and stream
    ``plan``'s tensors of ``source`` (a ``_Source`` or anything with its ``path``, ``entries``
    and ``read``) into it: the quantizer lifecycle (``ModelMixin._load_quantized``) over a
    single file."""
    quantizer = _make_quantizer(quantization_config, source)
    model = cls._build_on_meta(config_dict, source.path)

    def planned(model):  # planned once the quantized layers say which tensors stay blocks
        keep = (lambda key: quantizer.check_if_quantized_param(model, key)) if quantizer \
            else (lambda key: False)
        return _PlannedCheckpoint(source, plan, keep)

    model._load_quantized(planned, quantizer, torch_dtype, device_map)
    model.register_to_config(_name_or_path=str(source.path))
    return model.eval()


# -- export ---------------------------------------------------------------------------------------
def export_gguf(model: nn.Module, path, qtype=None, **kwargs) -> Path:
    """Write ``model`` as one ``.gguf`` file (Flux: the community layout); the arguments and
    the layouts are ``diffquant.gguf_export.export_gguf``'s.

    Example:
        >>> export_gguf(model, "transformer-Q8_0.gguf", "Q8_0")                 # doctest: +SKIP
    """
    from .gguf_export import export_gguf as export

    return export(model, path, qtype, **kwargs)
