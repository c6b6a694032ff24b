"""Prompts per minute of ``diffquant batch`` with the shipped pipeline: in-process (2 torch
threads, then 1), then on a local Ray cluster with 1 and 2 actors (one CPU each), as a markdown
table.

    python -m bench.batch                 # 64 prompts, 64x64, 4 steps: a few minutes
    python -m bench.batch --prompts 8 --actors 1 2 4 --quantize gguf:q8_0

"wall" counts everything run_batch does (in-process: the imports and the load, as a fresh
command pays them; Ray: quantizing once in the driver, starting the actors, each importing and
loading the pipeline); "steady" counts the images finished after every worker made its first
(the records' ``worker`` and ``finished``), over the time from then to the last: the rate a
long batch approaches. The Ray cluster is started once, before the timings. On a shared
machine read the load average in the header before the numbers.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time

from bench.tables import machine_line, md_table
from diffquant.batch import run_batch

COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "white", "black")
SHAPES = ("circle", "square", "triangle")


def prompts(n: int) -> list[dict]:
    """``n`` prompts the shipped pipeline was trained on, each with its own seed."""
    pairs = itertools.cycle(itertools.product(COLOURS, SHAPES))
    return [{"prompt": f"a {c} {s}", "seed": i} for i, (c, s) in zip(range(n), pairs)]


def measure(items: list[dict], args, **kwargs) -> list[str]:
    """Cells of one row: wall seconds and prompts per minute of the whole batch, and the steady
    rate: images finished after every worker made its first, over the time from then to the
    last (start-up and loading left out)."""
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as out:
        start = time.time()
        records = run_batch(items, out, quantize=args.quantize, steps=args.steps,
                            height=args.size, width=args.size, batch_size=args.batch_size,
                            progress=False, **kwargs)
        wall = time.time() - start
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        raise SystemExit(f"bench.batch: {len(failed)} prompts failed: {failed[0]['error']}")
    firsts = {}
    for r in records:
        firsts[r["worker"]] = min(firsts.get(r["worker"], r["finished"]), r["finished"])
    warm = max(firsts.values())  # every worker has loaded and made an image
    last = max(r["finished"] for r in records)
    after = sum(r["finished"] > warm for r in records)
    steady = after / (last - warm) * 60 if last > warm else float("nan")
    return [f"{wall:.1f}", f"{warm - start:.1f}", f"{len(items) / wall * 60:.1f}",
            f"{steady:.1f}"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.batch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--quantize", action="append", default=None, metavar="SPEC")
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    import ray

    items = prompts(args.prompts)
    rows = []
    print("in-process ...", file=sys.stderr, flush=True)
    rows.append(["one machine, no Ray, 2 torch threads", "-", *measure(items, args)])
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as an actor of one CPU runs (Ray sets OMP_NUM_THREADS)
    rows.append(["one machine, no Ray, 1 torch thread", "-", *measure(items, args)])
    torch.set_num_threads(threads)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    try:
        for n in args.actors:
            print(f"Ray, {n} actor(s) ...", file=sys.stderr, flush=True)
            rows.append([f"Ray Data, {n} actor(s) x 1 CPU", str(n),
                         *measure(items, args, ray="", ray_actors=n)])
    finally:
        ray.shutdown()
    scheme = "+".join(args.quantize or []) or "unquantized"
    print(machine_line(threads=2))
    print(f"\n{args.prompts} prompts, {args.size}x{args.size}, {args.steps} steps, batch size "
          f"{args.batch_size}, {scheme}, shipped pipeline, float32 on the CPU\n")
    print(md_table(["run", "actors", "wall s", "s until every worker made one",
                    "prompts/min (wall)", "prompts/min (steady)"], rows))


if __name__ == "__main__":
    main()
