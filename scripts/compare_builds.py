"""Compile the C kernels of an older revision and of this tree with the same flags and compare
the machine code of every function both libraries hold, instruction by instruction (addresses
and alignment padding set aside): the check that moving C code between files changed no kernel.

    python scripts/compare_builds.py d37f5c7 [--targets native x86-64-v4 x86-64]

Prints, per target, how many functions are identical and which are not.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PADDING = re.compile(r"^(data16 |cs )*(nop|xchg\s+%ax,%ax)")


def compile_tree(tree: Path, flags: list[str], out: Path) -> Path:
    """Every C file under ``tree``'s src/diffquant/ops (wherever its csrc lies) into ``out``."""
    sources = sorted((tree / "src" / "diffquant" / "ops").rglob("csrc/*.c"))
    subprocess.run(["cc", *flags, "-o", str(out), *map(str, sources)], check=True)
    return out


def functions(so: Path) -> dict[str, list[str]]:
    """{function: its instructions}, addresses and padding removed."""
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(so)], check=True,
                          capture_output=True, text=True).stdout
    found, current = {}, None
    for line in text.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if head:  # a static function of a header may be there once per C file that uses it
            name = head.group(1)
            while name in found:
                name += "'"
            current = found[name] = []
        elif current is not None and "\t" in line:
            ins = line.split("\t", 1)[1].strip()
            if not PADDING.match(ins):
                current.append(re.sub(r"<[^>]*>", "", re.sub(r"0x[0-9a-f]+|\b[0-9a-f]{4,}\b",
                                                            "N", ins)))
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("old", help="the revision to compare with (git archive)")
    ap.add_argument("--targets", nargs="+", default=["native", "x86-64-v4", "x86-64"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="compare-builds-") as tmp:
        old = Path(tmp) / "old"
        old.mkdir()
        archive = subprocess.run(["git", "archive", args.old], cwd=ROOT, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        for target in args.targets:
            flags = ["-O3", f"-march={target}", "-ffp-contract=off", "-shared", "-fPIC",
                     "-pthread", "-fopenmp"]
            a = functions(compile_tree(old, flags, Path(tmp) / f"old-{target}.so"))
            b = functions(compile_tree(ROOT, flags, Path(tmp) / f"new-{target}.so"))
            both = sorted(n for n in set(a) & set(b) if not n.startswith(("_", "frame_dummy",
                                                                         "register_tm",
                                                                         "deregister_tm")))
            differ = [n for n in both if a[n] != b[n]]
            print(f"{target}: {len(both)} functions in both, {len(both) - len(differ)} identical; "
                  f"differ: {differ or 'none'}; only in the new: {sorted(set(b) - set(a))}")


if __name__ == "__main__":
    sys.exit(main())
