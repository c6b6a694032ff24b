"""`python -m bench --smoke`: the bench's table-building code end to end on a toy model.

No timing or memory assertions (those numbers depend on the machine); the test checks that
every table is printed with its machine line, that every registered scheme gets a row, and
that a failing scheme shows its error in a cell instead of stopping the bench.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from bench import tables
from bench.schemes import enumerate_schemes

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smoke_output(tmp_path_factory):
    raw = tmp_path_factory.mktemp("bench") / "results.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--json", str(raw)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, raw


def test_every_table_is_printed_with_its_machine_line(smoke_output):
    out, _ = smoke_output
    for title in tables.TITLES.values():
        assert title in out
    assert out.count("_CPU: ") == len(tables.TITLES)
    assert "threads: 1" in out and "diffusers 0." in out and "torch 2." in out


def test_every_registered_scheme_has_a_row_in_each_table(smoke_output):
    out, raw = smoke_output
    labels = [s.label for s in enumerate_schemes()]
    assert "bf16 (unquantized)" in labels and len(labels) > 2
    for label in labels:
        assert out.count(f"| {label} |") >= 5, label  # tables 1 to 5
    assert raw.is_file()


def test_a_failing_scheme_prints_its_error_in_the_cell(monkeypatch):
    from bench import worker

    res = worker.run_job({"lib": "diffquant", "label": "x", "threads": 1, "size": "smoke",
                          "checkpoint": "/nonexistent/transformer", "dtype": "bfloat16",
                          "scheme": {"label": "x", "backend": "bf16"}})
    assert res["error"].startswith("load: ") and "nonexistent" in res["error"]
    rows = tables.load_rows(enumerate_schemes()[:1], {("bf16 (unquantized)", "diffquant"): res})
    assert rows[0][1] == f"error: {res['error']}"


def test_table_formats():
    assert tables.md_table(["a", "b"], [[1, "x|y"]]) == "| a | b |\n|---|---|\n| 1 | x/y |"
    err, db = tables.compare({"1": __import__("torch").ones(4)}, {"1": __import__("torch").ones(4)})
    assert err == 0 and db == float("inf")
