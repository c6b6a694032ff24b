"""``diffquant convert SRC DST``: between diffusers folders and single files.

The direction follows from SRC and DST:

- a pipeline (``default``, a directory, a hub id) or a model folder -> ``DST.gguf``: the
  ``--component`` (transformer: Flux, in the community layout unless ``--layout diffusers``;
  text_encoder_2: T5, in llama.cpp's layout) with ``--type`` or ``--recipe`` and ``--override``;
- ``SRC.gguf`` -> a folder: a Flux transformer kept quantized (diffquant's GGUF layers; it reloads
  with no configuration), or dequantized with ``--dtype``; a T5 encoder file -> a transformers
  T5EncoderModel folder, dequantized (``--dtype``);
- ``SRC.gguf`` -> ``DST.gguf``: the same tensors in another layout (blocks copied, never requantized);
- ``SRC.safetensors`` (original or diffusers Flux names) -> a folder: a diffusers model folder,
  in ``--dtype``, or quantized on the way with ``--type``.

Every write goes beside DST and is renamed into place; an existing DST is refused without
``--overwrite``.

Example:
    $ diffquant convert default out/flux-Q4_K_M.gguf --recipe Q4_K_M
    $ diffquant convert default out/t5-Q8_0.gguf --component text_encoder_2 --type Q8_0
    $ diffquant convert out/flux-Q4_K_M.gguf out/transformer --config default
"""

from __future__ import annotations

import json
from pathlib import Path

from .commands import EXIT_OK, UsageError, _import_torch, model_path

DESCRIPTION = __doc__.split("\n\n", 1)[1].split("Example:")[0].replace("``", "").strip()
EPILOG = """examples:
  diffquant convert default out/flux-Q8_0.gguf                      # community layout, Q8_0
  diffquant convert pipe/ out/flux-Q4_K_M.gguf --recipe Q4_K_M --override 'single_blocks.*.linear2.weight=Q6_K'
  diffquant convert pipe/ out/t5-Q8_0.gguf --component text_encoder_2
  diffquant convert out/flux-Q4_K_M.gguf out/transformer --config pipe/   # kept quantized
  diffquant convert out/flux-Q4_K_M.gguf out/transformer-bf16 --config pipe/ --dtype bfloat16
  diffquant convert flux1-dev.safetensors out/transformer --dtype bfloat16
  diffquant convert out/flux-Q8_0.gguf out/flux-diffusers-Q8_0.gguf --layout diffusers"""


def add_arguments(parser) -> None:
    parser.add_argument("src", metavar="SRC", help="'default' (the pipeline shipped with "
                        "diffquant), a pipeline or model directory, a hub id, a .gguf or a "
                        ".safetensors file")
    parser.add_argument("dst", metavar="DST", help="a .gguf file, or a directory to write")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--type", default=None, help="GGUF type of every quantizable weight: "
                      "Q8_0 (default), Q6_K, Q5_K, Q5_1, Q5_0, Q4_K, Q4_1, Q4_0, BF16, F16, F32")
    kind.add_argument("--recipe", default=None, help="a llama.cpp mixture: Q4_K_M, Q4_K_S, "
                      "Q5_K_M, Q5_K_S (chosen layers at a higher type)")
    parser.add_argument("--override", action="append", metavar="GLOB=TYPE", default=[],
                        help="per-layer type, last wins; GLOB matches the file's names or the "
                        "diffusers names of their parts, e.g. 'double_blocks.*.img_attn.qkv."
                        "weight=Q6_K' or '*.to_v.weight=Q8_0'")
    parser.add_argument("--layout", choices=["community", "diffusers"], default=None,
                        help="Flux key names in a written .gguf: community (original BFL names, "
                        "fused qkv; the default) or diffusers")
    parser.add_argument("--float-type", default="BF16", choices=["BF16", "F16", "F32"],
                        help="type of the layers kept unquantized (embedders, final layer)")
    parser.add_argument("--component", default="transformer",
                        help="pipeline component to export (transformer or text_encoder_2)")
    parser.add_argument("--config", default=None, help="for a single-file SRC: the model's "
                        "config (a model or pipeline directory, 'default', or a hub id); "
                        "default: inferred from the file")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="to a folder: dequantize to this dtype (default: keep GGUF "
                        "blocks); to a .gguf: the dtype the model is loaded in (float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")


def cmd_convert(args) -> int:
    src_text = model_path(args.src)
    src, dst = Path(src_text).expanduser(), Path(args.dst).expanduser()
    _check_destination(src, dst, args.overwrite)
    if src.suffix not in (".gguf", ".safetensors") and dst.suffix != ".gguf":
        raise UsageError(f"{dst}: converting a folder writes a .gguf file; to quantize a "
                         "pipeline into a folder use 'diffquant quantize'")
    if src.suffix in (".gguf", ".safetensors") and not src.is_file():
        raise UsageError(f"{src}: no such file")
    _import_torch()
    if src.suffix == ".gguf" and dst.suffix == ".gguf":
        written = _gguf_to_gguf(src, dst, args)
    elif dst.suffix == ".gguf":
        model = _load_for_export(src_text, src, args)
        written = _export(model, dst, args)
    elif src.suffix == ".gguf":
        written = _gguf_to_folder(src, dst, args)
    else:
        written = _single_file_to_folder(src, dst, args)
    print(f"wrote {written}")
    return EXIT_OK


def _check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    if src.exists() and dst.exists() and src.resolve() == dst.resolve():
        raise UsageError(f"{dst}: is the source itself; write the converted copy elsewhere")
    taken = dst.is_file() or (dst.is_dir() and any(dst.iterdir()))
    if taken and not overwrite:
        raise UsageError(f"{dst}: exists; choose another DST or pass --overwrite")
    if dst.suffix == ".gguf" and dst.is_dir():
        raise UsageError(f"{dst}: is a directory; name a .gguf file")


def _quiet(args) -> bool:
    return bool(getattr(args, "quiet", False))


def _load_for_export(text: str, src: Path, args):
    """The model to write: a .gguf file's (kept quantized), or a folder's component."""
    import torch

    from ..quantizers.gguf import GGUFQuantizationConfig

    dtype = getattr(torch, args.dtype or "float32")
    if src.suffix == ".gguf":
        from ..models.transformer_flux import FluxTransformer2DModel

        return FluxTransformer2DModel.from_single_file(
            src, config=_config_arg(args), torch_dtype=dtype,
            quantization_config=GGUFQuantizationConfig(dtype))
    if src.suffix == ".safetensors":
        raise UsageError(f"{src}: a .safetensors file converts to a folder; convert it to a "
                         "folder first, then the folder to .gguf")
    return _component(text, args.component, dtype)


def _component(text: str, name: str, dtype):
    """Component ``name`` of pipeline ``text``, or ``text`` itself when it is a model folder."""
    from ..hub import resolve_file

    index = resolve_file(text, "model_index.json")
    if index.is_file():
        entry = json.loads(index.read_text()).get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
            raise UsageError(f"{text}: the pipeline has no component {name!r}; choose one with "
                             "--component (transformer, text_encoder_2)")
        library, class_name, subfolder = entry[0], entry[1], name
    else:
        config_file = resolve_file(text, "config.json")
        if not config_file.is_file():
            raise UsageError(f"{text}: neither a pipeline (model_index.json) nor a model folder "
                             "(config.json)")
        config = json.loads(config_file.read_text())
        class_name = config.get("_class_name") or (config.get("architectures") or [None])[0]
        library, subfolder = ("diffusers" if "_class_name" in config else "transformers"), None
    if library == "transformers":
        import transformers

        cls = getattr(transformers, class_name)
        return cls.from_pretrained(text, subfolder=subfolder or "", dtype=dtype)
    from ..auto_model import AutoModel

    return AutoModel.from_pretrained(text, subfolder=subfolder, torch_dtype=dtype)


def _export(model, dst: Path, args) -> str:
    from ..gguf_export import export_gguf
    from ..t5_gguf import export_t5_gguf

    common = dict(recipe=args.recipe, overrides=args.override, float_type=args.float_type,
                  progress=not _quiet(args))
    if getattr(model.config, "model_type", None) in ("t5", "umt5"):
        if args.layout == "diffusers":
            raise UsageError("--layout applies to Flux transformers; a T5 encoder is written "
                             "in llama.cpp's layout, as ComfyUI-GGUF and stable-diffusion.cpp read it")
        path = export_t5_gguf(model, dst, args.type, **common)
    else:
        path = export_gguf(model, dst, args.type, layout=args.layout, **common)
    return f"{path} ({path.stat().st_size / 2**20:.1f} MiB)"


def _config_arg(args):
    return model_path(args.config) if args.config else None


def _gguf_to_gguf(src: Path, dst: Path, args) -> str:
    from ..gguf_export import relayout_gguf
    from ..t5_gguf import is_t5_gguf

    if args.type or args.recipe or args.override:
        raise UsageError("a .gguf converts to a .gguf with its tensors as they are (only the "
                         "key layout changes); to choose types, convert from the full-precision "
                         "folder")
    if is_t5_gguf(src):
        raise UsageError(f"{src}: a T5 encoder file has one layout (llama.cpp's); nothing to convert")
    path = relayout_gguf(src, dst, args.layout or "community", progress=not _quiet(args))
    return f"{path} ({args.layout or 'community'} layout, tensors as they were)"


def _gguf_to_folder(src: Path, dst: Path, args) -> str:
    import torch

    from ..t5_gguf import is_t5_gguf

    if args.type or args.recipe or args.override:
        raise UsageError("--type, --recipe and --override choose the types of a written .gguf "
                         "file; a .gguf converts to a folder as it is (or with --dtype)")
    if is_t5_gguf(src):
        if args.dtype is None:
            raise UsageError(f"{src}: a T5 encoder converts to a transformers folder, which "
                             "holds full-precision weights; pass --dtype (e.g. bfloat16)")
        from ..atomic import atomic_directory
        from ..t5_gguf import load_t5_encoder_gguf

        model = load_t5_encoder_gguf(src, torch_dtype=getattr(torch, args.dtype), dequantize=True)
        with atomic_directory(dst) as tmp:
            model.save_pretrained(tmp)
        return f"{dst} (T5EncoderModel, {args.dtype})"
    model = _load_for_export(str(src), src, args) if args.dtype is None else None
    if model is None:
        from ..models.transformer_flux import FluxTransformer2DModel

        model = FluxTransformer2DModel.from_single_file(src, config=_config_arg(args),
                                                        torch_dtype=getattr(torch, args.dtype))
    model.save_pretrained(dst)
    kind = f"dequantized to {args.dtype}" if args.dtype else "GGUF blocks kept"
    return f"{dst} ({type(model).__name__}, {kind})"


def _single_file_to_folder(src: Path, dst: Path, args) -> str:
    import torch

    from ..models.transformer_flux import FluxTransformer2DModel
    from ..quantizers.gguf import GGUFQuantizationConfig

    if args.recipe or args.override:
        raise UsageError("--recipe and --override choose a written .gguf file's types; to a "
                         "folder, --type quantizes every layer on the way")
    dtype = getattr(torch, args.dtype or "float32")
    quant = GGUFQuantizationConfig(dtype, quant_type=args.type) if args.type else None
    model = FluxTransformer2DModel.from_single_file(src, config=_config_arg(args), torch_dtype=dtype,
                                                    quantization_config=quant)
    model.save_pretrained(dst)
    return f"{dst} ({type(model).__name__}, {args.type or str(dtype).split('.')[-1]})"


__all__ = ["DESCRIPTION", "EPILOG", "add_arguments", "cmd_convert"]
