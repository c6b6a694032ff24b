"""``diffquant batch PROMPTS OUT/`` (many prompts, one pipeline; ``--ray`` for a cluster) and
``diffquant sensitivity`` (each layer's error per format), and the ``--ray`` options they share
with ``compare``. Registered by ``cli/__init__.py``; the work is ``diffquant.batch`` and
``diffquant.sensitivity``.

Example:
    $ diffquant batch prompts.jsonl out/ --quantize gguf:q4_0 --batch-size 4 --reference
    $ diffquant batch prompts.jsonl out/ --quantize gguf:q4_0 --ray --ray-actors 2
    $ diffquant sensitivity --format gguf:q4_k --format gguf:q6_k --json out/sens.json --ray
"""

from __future__ import annotations

import sys

from .commands import EXIT_OK, EXIT_RUNTIME

EPILOGS = {
    "batch": """examples:
  diffquant batch prompts.txt out/                        # the shipped pipeline, one prompt a line
  diffquant batch prompts.jsonl out/ --quantize torchao:int8wo --batch-size 4 --reference
  diffquant batch prompts.jsonl out/ --model pipe-q4/     # pre-quantized: no --quantize
  diffquant batch prompts.jsonl out/ --quantize gguf:q4_0 --ray --ray-actors 2
  diffquant batch prompts.jsonl /shared/out/ --quantize gguf:q4_0 --ray auto --ray-gpus-per-actor 1
a .jsonl line: {"prompt": "a cat", "id": "cat", "seed": 1, "height": 512, "width": 512,
  "steps": 4, "guidance": 3.5, "negative_prompt": "blurry", "true_cfg_scale": 4.0} (all but
  prompt optional); images go to OUT/images/<id>-<seed>.png, records to OUT/results.jsonl;
  run it again to resume (what is done is skipped, failed prompts are retried)""",
    "sensitivity": """examples:
  diffquant sensitivity --format gguf:q4_k --format gguf:q6_k
  diffquant sensitivity --model pipe/ --format gguf:q4_0 --format torchao:int8wo \\
      --layers 'transformer_blocks.*' --json out/sensitivity.json --ray""",
}


def add_ray_options(parser, per: str) -> None:
    """``--ray [ADDRESS]`` and the resources of each Ray actor (``per="actor"``) or task."""
    parser.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                        help="run on a Ray cluster: ADDRESS ('auto', 'ray://head:10001'), or "
                        "none for a local one (or RAY_ADDRESS); needs pip install "
                        "'diffquant[ray]'")
    if per == "actor":
        parser.add_argument("--ray-actors", type=int, default=1, metavar="N",
                            help="actors, each holding one pipeline (default 1)")
    parser.add_argument(f"--ray-cpus-per-{per}", type=float, default=1, metavar="N",
                        help=f"CPUs each Ray {per} reserves (default 1)")
    parser.add_argument(f"--ray-gpus-per-{per}", type=float, default=0, metavar="N",
                        help=f"GPUs each Ray {per} reserves (default 0; fractions share one)")


def register(command, common) -> None:
    """Add ``batch`` and ``sensitivity`` through cli/__init__.py's ``command`` and ``_common``."""
    bat = command("batch", cmd_batch, "generate an image per prompt of a file",
                  "Load the pipeline once and generate an image per prompt of PROMPTS (.jsonl or "
                  ".txt) into OUT/, resumable; with --ray on a Ray cluster.")
    bat.add_argument("prompts", metavar="PROMPTS", help=".jsonl (a JSON object a line) or .txt "
                     "(a prompt a line)")
    bat.add_argument("out", metavar="OUT", help="output folder (images/, results.jsonl)")
    common(bat)
    bat.add_argument("--quantize", action="append", metavar="SPEC",
                     help="backend:scheme[@component,...] as for generate (repeatable)")
    bat.add_argument("--batch-size", type=int, default=1, metavar="N",
                     help="prompts per pipeline call (default 1)")
    bat.add_argument("--reference", nargs="?", const=True, default=None, metavar="PIPELINE",
                     help="also run the unquantized pipeline (or PIPELINE) and record each "
                     "image's PSNR against it; its images go to OUT/reference/")
    bat.add_argument("--steps", type=int, default=4, help="default denoising steps (default 4)")
    bat.add_argument("--seed", type=int, default=0, help="default seed (default 0)")
    bat.add_argument("--height", type=int, default=None, help="default image height")
    bat.add_argument("--width", type=int, default=None, help="default image width")
    bat.add_argument("--guidance", type=float, default=None, help="default guidance scale")
    bat.add_argument("--negative-prompt", default=None, help="default negative prompt")
    bat.add_argument("--parquet", action="store_true", help="also write OUT/results.parquet "
                     "(needs pyarrow)")
    add_ray_options(bat, "actor")
    bat.add_argument("--pipeline-dir", default=None, metavar="DIR", help="with --ray and "
                     "--quantize: where the pipeline is saved quantized once for the actors "
                     "(default OUT/.pipeline; on several machines, shared storage)")

    sen = command("sensitivity", cmd_sensitivity, "measure each layer's error per format",
                  "Quantize one linear layer of a component at a time with each --format and "
                  "measure the relative error of the component's output (inputs from one "
                  "pipeline call) against the unquantized one (--dtype bfloat16 unless given).")
    common(sen)
    sen.set_defaults(dtype="bfloat16")
    sen.add_argument("--format", dest="formats", action="append", required=True, metavar="SPEC",
                     help="backend:scheme (repeatable), e.g. gguf:q4_k, gguf:q6_k, torchao:int8wo")
    sen.add_argument("--component", default="transformer", help="default transformer")
    sen.add_argument("--layers", action="append", metavar="GLOB", help="only layers matching "
                     "(repeatable), e.g. 'transformer_blocks.*'")
    sen.add_argument("--prompt", default="a red circle above a blue square")
    sen.add_argument("--seed", type=int, default=0)
    sen.add_argument("--height", type=int, default=None)
    sen.add_argument("--width", type=int, default=None)
    sen.add_argument("--json", default=None, metavar="FILE", help="write {layer: {format: error}}")
    add_ray_options(sen, "task")


def cmd_batch(args) -> int:
    from ..batch import run_batch

    records = run_batch(
        args.prompts, args.out, model=args.model, quantize=args.quantize,
        batch_size=args.batch_size, reference=args.reference, seed=args.seed, steps=args.steps,
        height=args.height, width=args.width, guidance=args.guidance,
        negative_prompt=args.negative_prompt, dtype=args.dtype, device=args.device, ray=args.ray,
        ray_actors=args.ray_actors, ray_cpus_per_actor=args.ray_cpus_per_actor,
        ray_gpus_per_actor=args.ray_gpus_per_actor, pipeline_dir=args.pipeline_dir,
        parquet=args.parquet, progress=not args.quiet)
    failed = [r for r in records if r["status"] != "ok"]
    print(f"wrote {len(records) - len(failed)} image(s) to {args.out}/images; records in "
          f"{args.out}/results.jsonl")
    for r in failed[:5]:
        print(f"  failed {r['id']} (seed {r['seed']}): {r['error']}", file=sys.stderr)
    if failed:
        print(f"diffquant: error: {len(failed)} of {len(records)} prompt(s) failed; their errors "
              "are in results.jsonl, and a second run retries them", file=sys.stderr)
        return EXIT_RUNTIME
    return EXIT_OK


def cmd_sensitivity(args) -> int:
    import json
    from pathlib import Path
    from types import SimpleNamespace

    import torch

    from ..report import format_table
    from ..sensitivity import check_formats, capture_inputs, layer_sensitivity
    from .commands import load_pipeline, run_sizes

    formats = check_formats(args.formats)  # before loading anything
    if args.ray is not None:
        from ..batch.cluster import require_ray

        require_ray()
    pipe, _ = load_pipeline(args)
    sizes = run_sizes(pipe, SimpleNamespace(height=args.height, width=args.width,
                                            max_sequence_length=None, num_frames=None))
    inputs = capture_inputs(pipe, args.component, prompt=args.prompt, num_inference_steps=1,
                            generator=torch.Generator("cpu").manual_seed(args.seed), **sizes)
    errors = layer_sensitivity(getattr(pipe, args.component), inputs, formats,
                               layers=args.layers, ray=args.ray,
                               ray_cpus_per_task=args.ray_cpus_per_task,
                               ray_gpus_per_task=args.ray_gpus_per_task, progress=not args.quiet)
    cell = lambda e: "-" if e is None else f"{e:.3g}"  # noqa: E731
    rows = [[name, *map(cell, by_format.values())] for name, by_format in errors.items()]
    print(format_table(["layer", *formats], rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(errors, indent=1) + "\n")
        print(f"wrote {args.json}")
    return EXIT_OK


def run_children_on_ray(commands: list[list[str]], files: list[tuple[str, str]], args) -> list[int]:
    """``compare --ray``: each variant's child command (``python -m diffquant generate``) as a
    Ray task, in a fresh process as without Ray (its peak memory its own); the files it writes
    come back as bytes and land at ``files`` here. Returns the exit codes."""
    from pathlib import Path

    from ..batch.cluster import ray_session

    with ray_session(args.ray) as ray:
        print(f"running {len(commands)} variants as Ray tasks", flush=True)
        task = ray.remote(num_cpus=args.ray_cpus_per_task,
                          num_gpus=args.ray_gpus_per_task or None)(_run_child)
        refs = [task.remote(cmd, image, stats, args.model is None)
                for cmd, (image, stats) in zip(commands, files)]
        codes = []
        for ref, (image, stats) in zip(refs, files):
            code, image_bytes, stats_bytes = ray.get(ref)
            for path, data in ((image, image_bytes), (stats, stats_bytes)):
                if data is not None:
                    Path(path).write_bytes(data)
            codes.append(code)
        return codes


def _run_child(cmd: list[str], image: str, stats: str, default_model: bool):
    """On a Ray worker: run ``cmd`` with its files in a local folder; (exit code, bytes)."""
    import subprocess
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="diffquant-compare-") as tmp:
        local = {image: str(Path(tmp) / Path(image).name), stats: str(Path(tmp) / Path(stats).name)}
        cmd = [sys.executable, *(local.get(a, a) for a in cmd[1:])]  # this node's Python
        if default_model:  # the shipped pipeline of this node's install
            at = cmd.index("--model")
            del cmd[at:at + 2]
        code = subprocess.run(cmd).returncode
        read = lambda p: Path(p).read_bytes() if Path(p).is_file() else None  # noqa: E731
        return code, read(local[image]), read(local[stats])

