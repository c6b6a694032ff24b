"""``diffquant plan`` (the schemes that fit a memory budget, as a table), ``quantize --plan``
(write them) and ``generate --max-memory`` (run under a budget). Registered by cli/__init__.py;
the work is diffquant.budget.

Example:
    $ diffquant plan flux/ --max-memory 8GB --height 512 --width 512
    $ diffquant quantize flux/ flux-8gb/ --plan 8GB --height 512 --width 512
    $ diffquant generate --model flux-8gb/ --prompt "a cat" --height 512 --width 512
"""

from __future__ import annotations

import json
from pathlib import Path

EPILOGS = {"plan": """examples:
  diffquant plan flux/ --max-memory 16GB --height 1024 --width 1024
  diffquant plan flux/ --max-memory 8GB --sensitivity out/sensitivity.json --json out/plan.json
  diffquant quantize flux/ flux-8gb/ --plan 8GB    # writes the plan's schemes"""}

MAX_MEMORY_HELP = ("a memory budget such as 16GB or 8GiB: text encoders loaded only to encode, "
                   "the transformer only to denoise, the VAE decode tiled if needed (default: "
                   "the budget of a folder written by 'quantize --plan', else none)")


def add_plan_options(parser) -> None:
    """The run a plan is made for (plan and quantize --plan)."""
    parser.add_argument("--height", type=int, default=1024, help="image height (default 1024)")
    parser.add_argument("--width", type=int, default=None, help="image width (default: height)")
    parser.add_argument("--max-sequence-length", type=int, default=512,
                        help="T5 prompt tokens (default 512)")
    parser.add_argument("--batch", type=int, default=1, help="images per call (default 1)")
    parser.add_argument("--sensitivity", default=None, metavar="JSON", help="per-layer errors "
                        "from 'diffquant sensitivity --json' ({layer: {format: error}}, for the "
                        "transformer); default: each layer's weight error, measured here")


def register(command, common) -> None:
    pla = command("plan", cmd_plan, "pick schemes that fit a memory budget",
                  "Pick each component's scheme (and a per-layer mix where the budget falls "
                  "between two) for the best quality that fits --max-memory with one phase "
                  "resident at a time; print the table and the predicted peak.")
    pla.add_argument("src", metavar="SRC", help="pipeline directory (full precision)")
    pla.add_argument("--max-memory", required=True, help="the budget, e.g. 16GB, 8GiB")
    pla.add_argument("--json", default=None, help="also write the plan to this JSON file")
    add_plan_options(pla)
    common(pla, model_flag=False)


def make_plan(src: str, budget: str, args):
    from ..budget.planner import plan_pipeline
    from .commands import _dtype, _device, _import_torch, model_path

    _import_torch()
    sensitivity = None
    if args.sensitivity:
        sensitivity = {"transformer": json.loads(Path(args.sensitivity).read_text())}
    return plan_pipeline(model_path(src), budget, dtype=_dtype(args.dtype, _device(args.device)),
                         height=args.height, width=args.width or args.height,
                         max_sequence_length=args.max_sequence_length, batch=args.batch,
                         sensitivity=sensitivity)


def cmd_plan(args) -> int:
    plan = make_plan(args.src, args.max_memory, args)
    print(plan.table())
    if args.json:
        Path(args.json).write_text(plan.to_json() + "\n")
    return 0


def quantize_with_plan(args, dst: Path) -> int:
    """``quantize SRC DST --plan BUDGET``: plan, then write the plan's schemes."""
    from ..budget.apply import write_plan
    from .commands import UsageError, _dtype, _device

    if args.quantize:
        raise UsageError("--plan picks the schemes itself; drop --quantize (or drop --plan)")
    plan = make_plan(args.src, args.plan, args)
    print(plan.table())
    write_plan(args.src, dst, plan, _dtype(args.dtype, _device(args.device)))
    print(f"wrote {dst}; it runs under {args.plan}: diffquant generate --model {dst} --prompt ...")
    return 0


def max_memory(args, model: str):
    """--max-memory, else the budget of a plan written beside the model, else None."""
    given = getattr(args, "max_memory", None)
    if given is not None:
        return given
    from ..budget.apply import saved_plan

    plan = saved_plan(model) if Path(model).is_dir() else None
    return plan.budget if plan is not None else None
