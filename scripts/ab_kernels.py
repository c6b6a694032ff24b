"""``python -m bench.kernels`` on an older revision and on this tree, back to back, one format
at a time (old, new, new, old: a busy shared machine slows both alike), and a table of the fast
path's time relative to bf16 in each: the check that a change of the code around the kernels
left their speed alone.

    python scripts/ab_kernels.py d37f5c7 --rows 1 256 --reps 5

The old revision is unpacked with ``git archive`` into a temporary directory (its own C library
is built there, cached by its source like this tree's).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
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
    sys.path.insert(0, str(ROOT))
    from bench.kernels import FORMATS

    with tempfile.TemporaryDirectory(prefix="ab-kernels-") as tmp:
        old = Path(tmp)
        archive = subprocess.run(["git", "archive", args.old], cwd=ROOT, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        print(f"fast / bf16, median of {args.reps}; old = {args.old}, new = this tree; "
              "two processes each, alternated\n")
        print("| format | rows | old fast / bf16 | new fast / bf16 | new / old |")
        print("|---|---:|---:|---:|---:|")
        for fmt in args.formats or FORMATS:
            a1, b1, b2, a2 = (run(t, fmt, args.rows, args.reps) for t in (old, ROOT, ROOT, old))
            for m in sorted(a1):
                ratio_old = statistics.mean(r[m][1] / r[m][0] for r in (a1, a2))
                ratio_new = statistics.mean(r[m][1] / r[m][0] for r in (b1, b2))
                print(f"| {fmt} | {m} | {ratio_old:.2f} | {ratio_new:.2f} | "
                      f"{ratio_new / ratio_old:.2f} |", flush=True)


if __name__ == "__main__":
    main()
