"""The work behind ``diffquant generate | quantize | inspect``: load a pipeline with SPECs applied,
run it, save it, describe it; the helpers every command shares (environment, exit codes, model
paths). ``compare`` is in compare.py, ``convert`` in convert.py, ``batch`` in batch.py.

Example:
    >>> from diffquant.cli import build_parser
    >>> args = build_parser().parse_args(["inspect", "pipe_dir"])      # doctest: +SKIP
    >>> cmd_inspect(args)                                               # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .media import pipeline_output, save_output, unwritable

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad input found by the CLI itself (exit code 2)."""


# -- environment --------------------------------------------------------------------------
def quiet_libraries(quiet: bool, debug: bool) -> None:
    """Silence other libraries' import chatter (and progress bars with --quiet) before import."""
    import logging
    import warnings

    if quiet:
        os.environ["TQDM_DISABLE"] = "1"  # tqdm reads TQDM_<arg> defaults (>= 4.66)
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    _STATE["quiet_loggers"] = not debug
    if debug:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(levelname)s: %(message)s")
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # modelopt imports diffusers
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.ERROR, format="%(name)s: %(levelname)s: %(message)s")
    logging.getLogger("diffquant").setLevel(logging.WARNING)


_STATE = {"quiet_loggers": False}
QUIET_LOGGERS = ("torchao", "torch", "transformers", "bitsandbytes", "optimum", "modelopt")


def _import_torch() -> None:
    """Import torch (which sets up its own loggers), then quiet the libraries' loggers.

    Called once the input is checked, so a bad path fails without paying for the import."""
    import logging

    import torch  # noqa: F401

    for name in QUIET_LOGGERS if _STATE["quiet_loggers"] else ():
        logging.getLogger(name).setLevel(logging.ERROR)


def _dtype(name: str, device: str):
    """auto: bfloat16 on an accelerator, float32 on a CPU (fast there, and one dtype for every
    component: a library default of None lets some backends pick bfloat16 for theirs alone)."""
    import torch

    if name == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    return getattr(torch, name)


def _device(name: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


# -- pipelines ----------------------------------------------------------------------------
DEFAULT_MODEL = "default"  # names the pipeline shipped with diffquant wherever a model is taken


def model_path(name: str | None) -> str:
    """``name`` as a path or hub id: ``default`` (or None) is the shipped pipeline's directory
    (write ``./default`` for a local directory of that name)."""
    if name is None or name == DEFAULT_MODEL:
        from ..assets import default_pipeline_path

        return str(default_pipeline_path())
    return name


def _model_index(model) -> tuple[str, dict]:
    """(path or id, model_index.json) of ``model`` (None or "default": the shipped pipeline)."""
    model = model_path(model)
    path = Path(model).expanduser()
    if not path.exists() and (model.startswith((".", "/", "~")) or model.count("/") != 1):
        raise UsageError(f"{model}: no such directory; give a pipeline directory or a hub id "
                         "like 'org/name'")
    if path.exists() and not path.is_dir():
        raise UsageError(f"{model}: is a file, not a pipeline directory; give the directory "
                         "that holds model_index.json")
    from ..hub import resolve_file

    index_file = resolve_file(model, "model_index.json")
    if not index_file.is_file():
        raise UsageError(f"{model}: not a pipeline directory (no model_index.json); give a "
                         "directory written by save_pretrained or 'diffquant quantize'")
    try:
        return model, json.loads(index_file.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"{index_file}: not valid JSON ({err}); repair or re-save the pipeline") from err


def _quant_config(specs: list[str] | None, model: str, index: dict):
    _import_torch()
    from ..hub import resolve_file
    from ..spec import build_quantization_config, parse_spec

    if not specs:
        return None
    config = build_quantization_config([parse_spec(s) for s in specs], index)
    for name in config.quant_mapping:
        # A pre-quantized component keeps its own config (from_pretrained only warns), so a
        # SPEC for it would be silently ignored: refuse instead.
        path = resolve_file(model, "config.json", subfolder=name)
        done = json.loads(path.read_text()).get("quantization_config") if path.is_file() else None
        if done:
            raise UsageError(f"{model}: component {name!r} is already quantized "
                             f"({done.get('quant_method')}); drop its --quantize SPEC, or "
                             "quantize the original pipeline")
    return config


def load_pipeline(args, specs=None):
    """Load ``args.model`` with ``specs`` applied; returns (pipeline, load seconds)."""
    model, index = _model_index(args.model)
    quant = _quant_config(specs, model, index)
    from ..pipeline import DiffusionPipeline

    _import_component_classes(index)
    start = time.perf_counter()
    device = _device(args.device)
    from .budget import max_memory

    budget = {"max_memory": m} if (m := max_memory(args, model)) is not None else {}
    pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=_dtype(args.dtype, device),
                                             quantization_config=quant, **budget)
    if device != "cpu":
        pipe = pipe.to(device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=args.quiet)
    return pipe, time.perf_counter() - start


def _import_component_classes(index: dict) -> None:
    """Import the components' libraries up front, so load seconds measure loading, not the
    seconds transformers (and diffusers, for a pipeline diffquant does not implement) take to
    import (best effort: loading reports any real problem)."""
    import importlib

    from .. import pipeline

    if index.get("_class_name") not in pipeline.PIPELINE_CLASSES:
        try:
            importlib.import_module("diffusers")
        except ImportError:
            pass
    for library, name in (v for k, v in index.items() if not k.startswith("_") and isinstance(v, list)):
        try:
            if library == "transformers":
                getattr(importlib.import_module("transformers"), name)
            elif name in getattr(pipeline, "DIFFUSERS_CLASSES", {}):
                importlib.import_module(pipeline.DIFFUSERS_CLASSES[name])
        except (ImportError, AttributeError, TypeError):
            pass


RUN_SIZES = ("height", "width", "max_sequence_length", "num_frames")


def run_sizes(pipe, args) -> dict:
    """--height/--width/--max-sequence-length/--frames where given; else a native pipeline runs
    at what it was built for: its VAE's sample_size (1024 for Flux, diffusers' own default) and
    its T5 tokenizer's model_max_length (capped at diffusers' 512), so small pipelines run at
    their own size, and a diffusers pipeline at its own defaults."""
    import inspect

    from ..pipeline import DiffusionPipeline

    accepted = inspect.signature(pipe.__call__).parameters
    if not isinstance(pipe, DiffusionPipeline):  # diffusers' class: its own defaults
        return {k: getattr(args, k) for k in RUN_SIZES if k in accepted and getattr(args, k, None)}
    vae_size = dict(getattr(getattr(pipe, "vae", None), "config", None) or {}).get("sample_size")
    vae_size = vae_size[0] if isinstance(vae_size, (list, tuple)) else vae_size
    t5 = getattr(pipe, "tokenizer_2", None) or getattr(pipe, "tokenizer", None)  # Chroma: T5 only
    tokens = getattr(t5, "model_max_length", None)
    defaults = {"height": vae_size, "width": vae_size,
                "max_sequence_length": min(tokens, 512) if isinstance(tokens, int) else None,
                "num_frames": None}
    sizes = {k: getattr(args, k, None) or defaults[k] for k in RUN_SIZES if k in accepted}
    sizes = {k: v for k, v in sizes.items() if isinstance(v, int)}
    if "max_area" in accepted and "height" in sizes and "width" in sizes:
        sizes["max_area"] = sizes["height"] * sizes["width"]  # Kontext sizes its output by area
    return sizes


def input_image(pipe, args, sizes: dict) -> dict:
    """``image=`` (the --image file, RGB) for a pipeline that edits one; none without --image.

    Kontext resizes its input to its ~1 MP training resolutions; for an output below 1 MP (a
    small pipeline, or --height/--width) the image is brought to the output's area at its own
    aspect ratio instead, so it costs what the output does."""
    import inspect

    if args.image is None:
        return {}
    accepted = inspect.signature(pipe.__call__).parameters
    if "image" not in accepted:
        raise UsageError(f"--image {args.image}: {type(pipe).__name__} takes no input image; "
                         "drop --image or give a pipeline that edits images (FluxKontextPipeline)")
    from PIL import Image

    with Image.open(args.image) as file:
        image = file.convert("RGB")
    area = sizes.get("max_area")
    if area is None or area >= 1024 ** 2 or "_auto_resize" not in accepted:
        return {"image": image}
    from ..pipelines.flux_kontext import output_size

    height, width = output_size(image.height, image.width, area, pipe.vae_scale_factor * 2)
    return {"image": image.resize((width, height), Image.Resampling.LANCZOS), "_auto_resize": False}


def check_image_file(args) -> None:
    """--image names a readable image file (checked before any loading)."""
    if getattr(args, "image", None) is None:
        return
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(args.image) as image:
            image.verify()
    except (OSError, UnidentifiedImageError) as err:
        raise UsageError(f"--image {args.image}: cannot read it as an image ({err}); give a "
                         "PNG or JPEG file") from err


def run_pipeline(pipe, args) -> tuple[object, float]:
    """One image (or video) for ``args.prompt``; returns (PIL image or list of PIL frames,
    seconds per denoising step)."""
    import inspect

    import torch

    # A CPU generator gives the same noise on every device, so images compare across machines.
    sizes = run_sizes(pipe, args)
    kwargs = dict(num_inference_steps=args.steps, generator=torch.Generator("cpu").manual_seed(args.seed),
                  output_type="pil", **sizes, **input_image(pipe, args, sizes))
    stamps = []
    if "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:
        def on_step(_pipe, _step, _t, callback_kwargs):
            stamps.append(time.perf_counter())
            return callback_kwargs
        kwargs["callback_on_step_end"] = on_step
    start = time.perf_counter()
    # no_grad, as the pipeline's own __call__: optimum-quanto's int4 / int2 layers, which
    # transformers puts in quanto-quantized text encoders, fail under inference_mode
    with torch.no_grad():
        image = pipeline_output(pipe(prompt=args.prompt, **kwargs))  # Kontext: image first
    total = time.perf_counter() - start
    # Between step callbacks is denoising only; without them, the whole call over the steps.
    per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else total / max(args.steps, 1)
    return image, per_step


# -- commands -----------------------------------------------------------------------------
def cmd_generate(args) -> int:
    check_image_file(args)
    why = unwritable(Path(args.out)) if args.out else None
    if why:
        raise UsageError(why)
    pipe, load_s = load_pipeline(args, args.quantize)
    from .lora import apply_loras

    apply_loras(pipe, args.lora)
    image, per_step = run_pipeline(pipe, args)
    video = isinstance(image, list)
    out = Path(args.out or ("out/video.webp" if video else "out/image.png"))
    written = save_output(image, out, args.fps)
    first = image[0] if video else image
    if args.stats_json:  # written for `diffquant compare`, which runs each variant in a child
        from ..report import peak_gpu_bytes, peak_rss_bytes, weight_bytes

        stats = {"load_s": load_s, "peak_rss": peak_rss_bytes(), "peak_gpu": peak_gpu_bytes(),
                 "weight_bytes": weight_bytes(pipe), "s_per_step": per_step}
        Path(args.stats_json).write_text(json.dumps(stats))
    else:
        steps = f"{args.steps} step" + "s" * (args.steps != 1)
        what = f"{written}, " if video else ""
        print(f"wrote {out} ({what}{first.width}x{first.height}, {steps}, seed {args.seed}, "
              f"load {load_s:.1f}s, {per_step:.2f}s/step)")
    return EXIT_OK


def cmd_quantize(args) -> int:
    args.src = model_path(args.src)
    src, dst = Path(args.src).expanduser(), Path(args.dst).expanduser()
    if dst.exists() and any(dst.iterdir()) and not args.overwrite:
        raise UsageError(f"{dst}: exists and is not empty; choose another DST or pass --overwrite")
    if src.exists() and dst.exists() and src.resolve() == dst.resolve():
        raise UsageError(f"{dst}: is the source itself; write the quantized copy elsewhere")
    args.model = args.src
    if args.plan:  # the schemes a memory budget fits (cli/budget.py)
        from .budget import quantize_with_plan

        return quantize_with_plan(args, dst)
    if not args.quantize:
        raise UsageError("give --quantize SPEC (repeatable) or --plan SIZE")
    pipe, load_s = load_pipeline(args, args.quantize)
    pipe.save_pretrained(str(dst))
    print(f"wrote {dst} (quantized {', '.join(args.quantize)} in {load_s:.1f}s); it loads with no "
          f"configuration: diffquant generate --model {dst} --prompt ...")
    return EXIT_OK


def cmd_inspect(args) -> int:
    from ..report import format_table, inspect_rows

    from ..hub import resolve_dir

    model, index = _model_index(args.path)
    args.model = model
    pipe, _ = load_pipeline(args)
    header = ["component", "class", "quantization", "parameters", "on disk", "in memory"]
    print(format_table(header, inspect_rows(pipe, index, resolve_dir(model))))
    return EXIT_OK


# compare (cli/compare.py) builds on the helpers above; its names stay importable from here
from .compare import ChildError, _child_command, cmd_compare  # noqa: E402,F401
