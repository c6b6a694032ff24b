"""The ``diffquant`` command line: generate | quantize | inspect | compare | convert | batch |
sensitivity | plan.

Every command takes ``--quantize backend:scheme[@components]`` (see diffquant.spec) where it
loads a pipeline. Errors print one line, ``diffquant: error: <cause>; <what to do>``, and exit
with 2 for bad input and 1 for a runtime failure (``--debug`` shows the traceback).
The parser and the error handling live here, the commands in ``commands.py`` (compare in
``compare.py``; batch and sensitivity, and the ``--ray`` options, in ``batch.py``).

Example:
    $ diffquant generate --prompt "a red circle" --quantize torchao:int8wo --out out/a.png
    $ diffquant quantize pipe/ pipe-int8/ --quantize torchao:int8wo
    $ diffquant inspect pipe-int8/
    $ diffquant convert default out/flux-Q4_K_M.gguf --recipe Q4_K_M

Wherever a model is taken, ``default`` names the pipeline shipped with diffquant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..errors import CheckpointError, ConfigError, QuantizationError
from . import batch as batch_cli
from . import budget as budget_cli
from . import commands, compare, convert, lora
from .commands import EXIT_RUNTIME, EXIT_USAGE, UsageError
from .compare import ChildError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors, as one line
        hint = f"see '{self.prog} --help'"
        raise UsageError(f"{message}; {hint}")


# -- parser -------------------------------------------------------------------------------
EPILOGS = {
    "generate": """examples:
  diffquant generate --prompt "a red circle above a blue square"
  diffquant generate --prompt "a green triangle" --quantize torchao:int8wo --out out/tri.png
  diffquant generate --model pipe/ --prompt "a cat" --quantize bnb:nf4@transformer,text_encoder_2
  diffquant generate --model pipe-int8/ --prompt "a cat"      # pre-quantized: no --quantize
  diffquant generate --model kontext/ --image cat.png --prompt "give the cat a hat"
  diffquant generate --prompt "a cat" --quantize gguf:q8_0 --lora style.safetensors:0.8
  diffquant generate --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --prompt "a cat" --frames 17 \
      --height 256 --width 256 --quantize gguf:q8_0 --out out/cat.webp   # any diffusers pipeline""",
    "quantize": """examples:
  diffquant quantize pipe/ pipe-int8/ --quantize torchao:int8wo
  diffquant quantize pipe/ pipe-mixed/ --quantize gguf:q4_0 --quantize quanto:int8@text_encoder_2""",
    "inspect": """examples:
  diffquant inspect pipe-int8/""",
    "compare": """examples:
  diffquant compare --prompt "a red circle" --quantize torchao:int8wo --quantize bnb:nf4
  diffquant compare --prompt "a blue square" --quantize gguf:q4_0 --out out/grid.png
  diffquant compare --prompt "a cat" --quantize bnb:nf4 --lora style.safetensors   # each with the LoRA
  diffquant compare --model pipe/ --prompt "a cat" --quantize gguf:q4_0+quanto:int8@text_encoder_2
  diffquant compare --prompt "a cat" --quantize gguf:q4_0 --quantize gguf:q8_0 --ray  # Ray tasks""",
    "convert": convert.EPILOG,
}
EPILOGS.update(batch_cli.EPILOGS)
EPILOGS.update(budget_cli.EPILOGS)
MODEL_HELP = ("pipeline directory, hub id, or 'default' (the pipeline shipped with diffquant; "
              "write ./default for a directory of that name)")
SPEC_HELP = ("backend:scheme[@component,...] (repeatable; default component: transformer), "
             "e.g. torchao:int8wo, bnb:nf4@transformer,text_encoder_2, gguf:q4_0, quanto:int8, "
             "modelopt:int8 (bnb = bitsandbytes: nf4, fp4, nf4-dq, fp4-dq, int8; modelopt int8 "
             "per output channel, int4 / nf4 / nvfp4 in blocks of 128 / 64 / 16 inputs); an "
             "unknown one is answered with every backend and scheme")


def _common(parser, model_flag=True) -> None:
    if model_flag:
        parser.add_argument("--model", default="default", help=MODEL_HELP + " (default: default)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                        help="dtype of unquantized weights and compute (auto: float32 on CPU, else bfloat16)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")


def _run_options(parser) -> None:
    parser.add_argument("--prompt", required=True, help="text prompt")
    parser.add_argument("--lora", action="append", metavar="FILE[:SCALE]", help=lora.HELP)
    parser.add_argument("--steps", type=int, default=4, help="denoising steps (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--height", type=int, default=None, help="image height (default: the "
                        "pipeline's own: for Flux the VAE's sample_size, 1024, 64 for the shipped "
                        "pipeline; for a pipeline diffquant runs through diffusers, its default)")
    parser.add_argument("--width", type=int, default=None, help="image width (default: as height)")
    parser.add_argument("--max-sequence-length", type=int, default=None, help="T5 prompt tokens "
                        "(default: the T5 tokenizer's model_max_length, at most 512)")
    parser.add_argument("--image", default=None, help="input image file for pipelines that edit "
                        "one (FluxKontextPipeline)")
    parser.add_argument("--frames", dest="num_frames", type=int, default=None, help="frames of a "
                        "video pipeline (Wan, LTX-Video, ...; default: the pipeline's own)")
    parser.add_argument("--fps", type=int, default=16, help="frames per second of a written "
                        "video (default 16)")


def _flags(default) -> argparse.ArgumentParser:
    # Sub-commands take them too, with SUPPRESS there so `diffquant -q generate` keeps -q.
    flags = _Parser(add_help=False)
    flags.add_argument("--quiet", "-q", action="store_true", default=default, help="no progress bars")
    flags.add_argument("--debug", action="store_true", default=default,
                       help="show tracebacks and library logs")
    return flags


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffquant", parents=[_flags(False)],
                     description="Load, run, quantize, save and compare diffusion pipelines.",
                     epilog="run 'diffquant COMMAND --help' for a command's options and examples")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def command(name, func, summary, description):
        cmd = sub.add_parser(name, parents=[_flags(argparse.SUPPRESS)], help=summary,
                             description=description, epilog=EPILOGS[name],
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.set_defaults(func=func)
        return cmd

    gen = command("generate", commands.cmd_generate, "generate an image or a video",
                  "Generate one image (or a video pipeline's frames), optionally quantized.")
    _common(gen)
    _run_options(gen)
    gen.add_argument("--quantize", action="append", metavar="SPEC", help=SPEC_HELP)
    gen.add_argument("--max-memory", default=None, metavar="SIZE", help=budget_cli.MAX_MEMORY_HELP)
    gen.add_argument("--out", default=None, help="output file: an image (.png, .jpg, .webp; "
                     "default out/image.png), or a video pipeline's frames as an animated .webp, "
                     ".gif or .png (default out/video.webp) or, without a suffix, a folder of "
                     "numbered PNGs")
    gen.add_argument("--stats-json", default=None, help=argparse.SUPPRESS)

    qua = command("quantize", commands.cmd_quantize, "write a pre-quantized pipeline copy",
                  "Quantize SRC and save it to DST; DST loads with no configuration.")
    qua.add_argument("src", metavar="SRC", help=MODEL_HELP)
    qua.add_argument("dst", metavar="DST", help="directory to write")
    qua.add_argument("--quantize", action="append", metavar="SPEC", help=SPEC_HELP + " (or --plan)")
    qua.add_argument("--plan", default=None, metavar="SIZE", help="instead of --quantize: the "
                     "schemes 'diffquant plan SRC --max-memory SIZE' picks (see its options)")
    qua.add_argument("--overwrite", action="store_true", help="save into DST even if not empty")
    budget_cli.add_plan_options(qua)
    _common(qua, model_flag=False)

    ins = command("inspect", commands.cmd_inspect, "list components and their quantization",
                  "Show each component: class, quantization, parameters, bytes on disk and in memory.")
    ins.add_argument("path", metavar="PATH", help=MODEL_HELP)
    _common(ins, model_flag=False)

    cmp_ = command("compare", compare.cmd_compare, "compare quantization schemes",
                   "Run the unquantized pipeline and each --quantize variant with the same seed, "
                   "each in its own process; write an image grid (a video's first frames) and "
                   "print time, memory and PSNR (over every frame).")
    _common(cmp_)
    _run_options(cmp_)
    cmp_.add_argument("--quantize", action="append", metavar="SPEC", required=True,
                      help=SPEC_HELP + "; each flag is one variant (join SPECs with '+')")
    cmp_.add_argument("--out", default="out/compare.png", help="grid PNG (default out/compare.png)")
    batch_cli.add_ray_options(cmp_, "task")  # each variant a Ray task
    batch_cli.register(command, _common)
    budget_cli.register(command, _common)

    con = command("convert", convert.cmd_convert, "convert between folders and .gguf / "
                  ".safetensors files", convert.DESCRIPTION)
    convert.add_arguments(con)
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
                             "(generate, quantize, inspect, compare, convert, batch, "
                             "sensitivity, plan)")
        commands.quiet_libraries(args.quiet, args.debug)
        return args.func(args)
    except KeyboardInterrupt:
        print("diffquant: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `diffquant inspect x | head`: the reader left; exit quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # as the Python docs advise
        return EXIT_RUNTIME
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

