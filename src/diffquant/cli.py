"""The ``diffquant`` command line: generate | quantize | inspect | compare.

Every command takes ``--quantize backend:scheme[@components]`` (see diffquant.spec) where it
loads a pipeline. Errors print one line, ``diffquant: error: <cause>; <what to do>``, and exit
with 2 for bad input and 1 for a runtime failure (``--debug`` shows the traceback).

Example:
    $ diffquant generate --prompt "a red circle" --quantize torchao:int8wo --out out/a.png
    $ diffquant quantize pipe/ pipe-int8/ --quantize torchao:int8wo
    $ diffquant inspect pipe-int8/
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from .errors import CheckpointError, ConfigError, QuantizationError

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad input found by the CLI itself (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors, as one line
        hint = f"see '{self.prog} --help'"
        raise UsageError(f"{message}; {hint}")


# -- environment --------------------------------------------------------------------------
def _quiet_libraries(quiet: bool, debug: bool) -> None:
    """Silence other libraries' import chatter (and progress bars with --quiet) before import."""
    import logging
    import warnings

    if quiet:
        os.environ["TQDM_DISABLE"] = "1"  # tqdm reads TQDM_<arg> defaults (>= 4.66)
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if debug:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(levelname)s: %(message)s")
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # modelopt imports diffusers
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.ERROR, format="%(name)s: %(levelname)s: %(message)s")
    logging.getLogger("diffquant").setLevel(logging.WARNING)
    _QUIET_LOGGERS.extend(["torchao", "torch", "transformers", "bitsandbytes", "optimum", "modelopt"])


_QUIET_LOGGERS: list[str] = []


def _import_torch() -> None:
    """Import torch (which sets up its own loggers), then quiet the libraries' loggers.

    Called once the input is checked, so a bad path fails without paying for the import."""
    import logging

    import torch  # noqa: F401

    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _dtype(name: str):
    import torch

    if name == "auto":
        return None
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise UsageError(f"--dtype {name!r} is not a torch dtype; use bfloat16, float16 or float32")
    return value


def _device(name: str) -> str:
    import torch

    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


# -- pipelines ----------------------------------------------------------------------------
def _model_index(model) -> tuple[str, dict]:
    """(path or id, model_index.json) of ``model`` (None: the shipped default pipeline)."""
    if model is None:
        from .assets import default_pipeline_path

        model = str(default_pipeline_path())
    path = Path(model).expanduser()
    if not path.exists() and (model.startswith((".", "/", "~")) or model.count("/") != 1):
        raise UsageError(f"{model}: no such directory; give a pipeline directory or a hub id "
                         "like 'org/name'")
    if path.exists() and not path.is_dir():
        raise UsageError(f"{model}: is a file, not a pipeline directory; give the directory "
                         "that holds model_index.json")
    from .hub import resolve_file

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
    from .hub import resolve_file
    from .spec import build_quantization_config, parse_spec

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
    from .pipeline import DiffusionPipeline

    start = time.perf_counter()
    pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=_dtype(args.dtype),
                                             quantization_config=quant)
    device = _device(args.device)
    if device != "cpu":
        pipe = pipe.to(device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=args.quiet)
    return pipe, time.perf_counter() - start


def run_pipeline(pipe, args) -> tuple[object, float]:
    """One image for ``args.prompt``; returns (PIL image, seconds per denoising step)."""
    import inspect

    import torch

    kwargs = dict(num_inference_steps=args.steps, generator=torch.Generator("cpu").manual_seed(args.seed),
                  output_type="pil")
    if args.height:
        kwargs["height"] = args.height
    if args.width:
        kwargs["width"] = args.width
    stamps = []
    if "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:
        def on_step(_pipe, _step, _t, callback_kwargs):
            stamps.append(time.perf_counter())
            return callback_kwargs
        kwargs["callback_on_step_end"] = on_step
    start = time.perf_counter()
    with torch.inference_mode():
        image = pipe(args.prompt, **kwargs).images[0]
    total = time.perf_counter() - start
    # Between step callbacks is denoising only; without them, the whole call over the steps.
    per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else total / max(args.steps, 1)
    return image, per_step


# -- commands -----------------------------------------------------------------------------
def cmd_generate(args) -> int:
    pipe, load_s = load_pipeline(args, args.quantize)
    image, per_step = run_pipeline(pipe, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    if args.stats_json:  # written for `diffquant compare`, which runs each variant in a child
        from .report import peak_gpu_bytes, peak_rss_bytes, weight_bytes

        stats = {"load_s": load_s, "peak_rss": peak_rss_bytes(), "peak_gpu": peak_gpu_bytes(),
                 "weight_bytes": weight_bytes(pipe), "s_per_step": per_step}
        Path(args.stats_json).write_text(json.dumps(stats))
    else:
        print(f"wrote {out} ({image.width}x{image.height}, {args.steps} steps, seed {args.seed}, "
              f"load {load_s:.1f}s, {per_step:.2f}s/step)")
    return EXIT_OK


def cmd_quantize(args) -> int:
    src, dst = Path(args.src).expanduser(), Path(args.dst).expanduser()
    if dst.exists() and any(dst.iterdir()) and not args.overwrite:
        raise UsageError(f"{dst}: exists and is not empty; choose another DST or pass --overwrite")
    if src.exists() and dst.exists() and src.resolve() == dst.resolve():
        raise UsageError(f"{dst}: is the source itself; write the quantized copy elsewhere")
    args.model = args.src
    pipe, load_s = load_pipeline(args, args.quantize)
    pipe.save_pretrained(str(dst))
    print(f"wrote {dst} (quantized {', '.join(args.quantize)} in {load_s:.1f}s); it loads with no "
          f"configuration: diffquant generate --model {dst} --prompt ...")
    return EXIT_OK


def cmd_inspect(args) -> int:
    from .report import format_table, inspect_rows

    model, index = _model_index(args.path)
    args.model = model
    pipe, _ = load_pipeline(args)
    from .hub import resolve_dir

    header = ["component", "class", "quantization", "parameters", "on disk", "in memory"]
    print(format_table(header, inspect_rows(pipe, index, resolve_dir(model))))
    return EXIT_OK


class ChildError(Exception):
    """A compare variant failed in its child process; carries the child's exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _child_command(args, model: str, specs: list[str], image: Path, stats: Path) -> list[str]:
    cmd = [sys.executable, "-m", "diffquant", "generate", "--model", model, "--prompt", args.prompt,
           "--steps", str(args.steps), "--seed", str(args.seed), "--dtype", args.dtype,
           "--device", args.device, "--out", str(image), "--stats-json", str(stats)]
    for flag in ("height", "width"):
        if getattr(args, flag):
            cmd += [f"--{flag}", str(getattr(args, flag))]
    return cmd + [x for s in specs for x in ("--quantize", s)] + (["--quiet"] if args.quiet else [])


def cmd_compare(args) -> int:
    """Each variant runs in a fresh child process, so its peak memory is its own."""
    import subprocess
    import tempfile

    from PIL import Image

    from .report import compare_table, image_grid

    model, index = _model_index(args.model)
    variants = [[]] + [v.split("+") for v in args.quantize]
    for specs in variants[1:]:
        _quant_config(specs, model, index)  # a bad SPEC fails here, before anything runs
    labels = ["unquantized"] + args.quantize
    results, images = [], []
    with tempfile.TemporaryDirectory(prefix="diffquant-compare-") as tmp:
        for i, (specs, label) in enumerate(zip(variants, labels)):
            print(f"[{i + 1}/{len(variants)}] {label}", flush=True)
            image, stats = Path(tmp) / f"{i}.png", Path(tmp) / f"{i}.json"
            proc = subprocess.run(_child_command(args, model, specs, image, stats))
            data = json.loads(stats.read_text()) if stats.is_file() else {}
            if proc.returncode != 0 or "error" in data:
                raise ChildError(f"variant {label!r}: {data.get('error', f'exit code {proc.returncode}')}",
                                 data.get("code", proc.returncode or EXIT_RUNTIME))
            images.append(Image.open(image).convert("RGB"))
            results.append(data)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, labels).save(out)
    for i, (image, label) in enumerate(zip(images, labels)):  # each full-size, beside the grid
        image.save(out.with_name(f"{out.stem}-{i}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', label)}.png"))
    print(compare_table(labels, results, images))
    print(f"wrote {out} (and each image as {out.stem}-N-VARIANT.png beside it)")
    return EXIT_OK


# -- parser -------------------------------------------------------------------------------
EPILOGS = {
    "generate": """examples:
  diffquant generate --prompt "a red circle above a blue square"
  diffquant generate --prompt "a cat" --quantize torchao:int8wo --steps 4 --out out/cat.png
  diffquant generate --model pipe/ --prompt "a cat" --quantize bnb:nf4@transformer,text_encoder_2""",
    "quantize": """examples:
  diffquant quantize pipe/ pipe-int8/ --quantize torchao:int8wo
  diffquant quantize pipe/ pipe-mixed/ --quantize gguf:q4_0 --quantize quanto:int8@text_encoder_2""",
    "inspect": """examples:
  diffquant inspect pipe-int8/""",
    "compare": """examples:
  diffquant compare --prompt "a red circle" --quantize torchao:int8wo --quantize bnb:nf4
  diffquant compare --model pipe/ --prompt "a cat" --quantize gguf:q4_0 --out out/grid.png""",
}
SPEC_HELP = ("backend:scheme[@component,...] (repeatable; default component: transformer), "
             "e.g. torchao:int8wo, bnb:nf4@transformer,text_encoder_2, gguf:q4_0, quanto:int8, "
             "modelopt:int8")


def _common(parser, model_flag=True) -> None:
    if model_flag:
        parser.add_argument("--model", default=None, help="pipeline directory or hub id "
                            "(default: the pipeline shipped with diffquant)")
    parser.add_argument("--dtype", default="auto", help="torch dtype of the unquantized weights "
                        "and compute: auto (the library's default), bfloat16, float16, float32")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")


def _run_options(parser) -> None:
    parser.add_argument("--prompt", required=True, help="text prompt")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--height", type=int, default=None, help="image height (pipeline default)")
    parser.add_argument("--width", type=int, default=None, help="image width (pipeline default)")


def build_parser() -> argparse.ArgumentParser:
    flags = _Parser(add_help=False)
    flags.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    flags.add_argument("--debug", action="store_true", help="show tracebacks and library logs")
    parser = _Parser(prog="diffquant", parents=[flags],
                     description="Load, run, quantize, save and compare diffusion pipelines.",
                     epilog="run 'diffquant COMMAND --help' for a command's options and examples")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    fmt = argparse.RawDescriptionHelpFormatter

    gen = sub.add_parser("generate", parents=[flags], help="generate an image", epilog=EPILOGS["generate"],
                         formatter_class=fmt, description="Generate one image, optionally quantized.")
    _common(gen)
    _run_options(gen)
    gen.add_argument("--quantize", action="append", metavar="SPEC", help=SPEC_HELP)
    gen.add_argument("--out", default="out/image.png", help="output PNG (default out/image.png)")
    gen.add_argument("--stats-json", default=None, help=argparse.SUPPRESS)
    gen.set_defaults(func=cmd_generate)

    qua = sub.add_parser("quantize", parents=[flags], help="write a pre-quantized pipeline copy",
                         epilog=EPILOGS["quantize"], formatter_class=fmt,
                         description="Quantize SRC and save it to DST; DST loads with no configuration.")
    qua.add_argument("src", metavar="SRC", help="pipeline directory or hub id")
    qua.add_argument("dst", metavar="DST", help="directory to write")
    qua.add_argument("--quantize", action="append", metavar="SPEC", required=True, help=SPEC_HELP)
    qua.add_argument("--overwrite", action="store_true", help="save into DST even if it is not empty (save_pretrained replaces the weights)")
    _common(qua, model_flag=False)
    qua.set_defaults(func=cmd_quantize)

    ins = sub.add_parser("inspect", parents=[flags], help="list components and their quantization",
                         epilog=EPILOGS["inspect"], formatter_class=fmt,
                         description="Show each component: class, quantization, parameters, "
                                     "bytes on disk and in memory.")
    ins.add_argument("path", metavar="PATH", help="pipeline directory or hub id")
    _common(ins, model_flag=False)
    ins.set_defaults(func=cmd_inspect)

    cmp_ = sub.add_parser("compare", parents=[flags], help="compare quantization schemes",
                          epilog=EPILOGS["compare"], formatter_class=fmt,
                          description="Run the unquantized pipeline and each --quantize variant "
                                      "with the same seed (each in its own process); write an "
                                      "image grid and print time, memory and PSNR.")
    _common(cmp_)
    _run_options(cmp_)
    cmp_.add_argument("--quantize", action="append", metavar="SPEC", required=True,
                      help=SPEC_HELP + "; each flag is one variant (combine with '+')")
    cmp_.add_argument("--out", default="out/compare.png", help="grid PNG (default out/compare.png)")
    cmp_.set_defaults(func=cmd_compare)
    return parser


# -- entry point --------------------------------------------------------------------------
def _exit_code(err: BaseException) -> int:
    if isinstance(getattr(err, "exit_code", None), int):
        return err.exit_code
    if isinstance(err, (UsageError, ConfigError, CheckpointError, QuantizationError, FileNotFoundError)):
        return EXIT_USAGE
    return EXIT_RUNTIME


def _one_line(err: BaseException, code: int) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    if code == EXIT_RUNTIME and not isinstance(err, ChildError):
        text = f"{type(err).__name__}: {text}"
        if "; " not in text:
            text += "; rerun with --debug for the traceback"
    return text


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            raise UsageError("no command given; run 'diffquant --help' for the commands "
                             "(generate, quantize, inspect, compare)")
        _quiet_libraries(args.quiet, args.debug)
        return args.func(args)
    except KeyboardInterrupt:
        print("diffquant: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place errors become exit codes
        if debug:
            raise
        code = _exit_code(err)
        stats = getattr(locals().get("args"), "stats_json", None)
        if stats:  # a compare child: hand the error to the parent, which prints it once
            Path(stats).write_text(json.dumps({"error": _one_line(err, code), "code": code}))
        else:
            print(f"diffquant: error: {_one_line(err, code)}", file=sys.stderr)
        return code
