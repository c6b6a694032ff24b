"""``python -m diffquant.ops``: the CPU dispatch table (``ops/cpu/dispatch.py``) and what runs on
this machine for every scheme at 1, 4 and 256 rows. ``--probe``: run one layer per scheme and
report the kernels that ran (``diffquant.cpu_paths``; an entry point, so it may look up there)."""

import argparse


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m diffquant.ops", description=__doc__.split("\n")[0])
    ap.add_argument("--probe", action="store_true",
                    help="measure: run one layer per scheme and record its kernels")
    if ap.parse_args(argv).probe:
        from diffquant.cpu_paths import table
        print(table())
    else:
        from diffquant.ops.cpu.dispatch import describe
        print(describe())


if __name__ == "__main__":
    main()
