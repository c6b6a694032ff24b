"""``python -m bench.kernels`` on an older revision and on this tree, back to back, one format
at a time (old then new, new then old for the next format: a busy shared machine slows both
alike), and a table of the fast path's time relative to bf16 in each (bf16 is timed in turn with
it, round after round, so each ratio is taken under the same load): the check that a change of
the code around the kernels left their speed alone.

    python scripts/ab_kernels.py d37f5c7 --rows 1 256 --reps 5

The old revision is unpacked with ``git archive`` into a temporary directory (its own C library
is built there, cached by its source like this tree's).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|")


def run(tree: Path, fmt: str, rows: list[str], reps: int) -> dict[int, tuple[float, float]]:
    """{rows: (bf16 ms, fast ms)} of one ``bench.kernels`` process on ``tree`` for ``fmt``."""
    env = dict(os.environ, PYTHONPATH=str(tree / "src"))
    out = subprocess.run([sys.executable, "-m", "bench.kernels", "--formats", fmt.replace(" ", "-"),
                          "--rows", *rows, "--reps", str(reps)], cwd=tree, env=env,
                         capture_output=True, text=True, timeout=1800)
    found = {int(m[1]): (float(m[2]), float(m[5])) for m in map(ROW.match, out.stdout.splitlines())
             if m}
    if not found:
        raise RuntimeError(f"bench.kernels {fmt} on {tree}: no table\n{out.stderr[-2000:]}")
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("old", help="the revision to compare with (git archive)")
    ap.add_argument("--rows", nargs="+", default=["1", "256"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--formats", nargs="+", default=None)
    args = ap.parse_args()
    sys.path[:0] = [str(ROOT), str(ROOT / "src")]
    from bench.kernels import FORMATS

    with tempfile.TemporaryDirectory(prefix="ab-kernels-") as tmp:
        old = Path(tmp)
        archive = subprocess.run(["git", "archive", args.old], cwd=ROOT, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        print(f"fast / bf16 (and fast ms), median of {args.reps}; old = {args.old}, new = this "
              "tree; one process each, alternated\n")
        print("| format | rows | old fast / bf16 | new fast / bf16 | new / old | old ms | new ms |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for i, fmt in enumerate(args.formats or FORMATS):
            trees = (old, ROOT) if i % 2 == 0 else (ROOT, old)
            found = dict(zip(trees, (run(t, fmt, args.rows, args.reps) for t in trees)))
            a, b = found[old], found[ROOT]
            for m in sorted(a):
                ra, rb = a[m][1] / a[m][0], b[m][1] / b[m][0]
                print(f"| {fmt} | {m} | {ra:.2f} | {rb:.2f} | {rb / ra:.2f} | {a[m][1]:.2f} | "
                      f"{b[m][1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
