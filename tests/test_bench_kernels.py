"""bench.kernels: every format's table comes out, with the library column, and the library layer
it times computes what diffquant's fast path computes (so the ratio compares like with like)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import kernels
from bench.kernel_refs import agreement, library_layer
from diffquant.ops.cpu import linear as fl

ROOT = Path(__file__).resolve().parents[1]
BF16 = torch.bfloat16
# bf16 keeps 8 significant bits: 3 units in the last place of the largest output. Different
# quantizations are far apart (int4 ~10%, int8 ~1% at this shape); identical math gives 0 here.
TOL = 3 * 2.0 ** -8
N, K = 64, 256  # the K-quants (Q4_K, Q6_K) need K % 256 == 0
CELL = re.compile(r"^(\d+(\.\d+)?|n/a(: .+)?)$")


def test_every_format_prints_a_table_with_library_columns():
    out = subprocess.run(
        [sys.executable, "-m", "bench.kernels", "--shape", str(N), str(K), "--rows", "1", "3",
         "--reps", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    tables = out.stdout.split("### ")[1:]
    assert [t.split(" (")[0] for t in tables] == list(kernels.FORMATS)
    for t in tables:
        lines = t.splitlines()
        assert lines[2] == ("| rows | bf16 ms | fp32 ms | reference ms | fast ms | library ms | "
                            "fast / bf16 | fast / library |"), t
        rows = [ln for ln in lines[4:] if ln.startswith("| ")]
        assert [r.split("|")[1].strip() for r in rows] == ["1", "3"], t
        for r in rows:
            cells = [c.strip() for c in r.strip("|").split("|")]
            assert len(cells) == 8 and all(CELL.match(c) for c in cells), r
        assert "max |fast - library| / max |library|: 1 rows" in t, t


@pytest.mark.parametrize("fmt", kernels.FORMATS)
def test_library_layer_agrees_with_fast_path(fmt):
    torch.manual_seed(0)
    w, bias = torch.randn(N, K) * 0.02, (torch.randn(N) * 0.1).to(BF16)
    _, fast, _, lib = kernels.build(fmt, w, bias)
    assert callable(lib), lib
    # quanto's int4 CPU layer refuses inference_mode; the bench times quanto under no_grad, and
    # scratch buffers left by inference_mode calls cannot be written outside it: start afresh
    mode = torch.no_grad if fmt.startswith("quanto") else torch.inference_mode
    fl.clear_scratch()
    for m in (1, 3):
        x = torch.randn(m, K).to(BF16)
        with mode():
            y_fast, y_lib = fast(x), lib(x)
        assert y_lib.shape == (m, N) and y_lib.dtype == BF16
        assert agreement(y_fast, y_lib) <= TOL, (fmt, m, agreement(y_fast, y_lib))


def test_unbuildable_library_layer_is_a_cell_not_a_crash(monkeypatch):
    assert library_layer("Q4_0", torch.randn(N, K), torch.zeros(N), None).startswith("n/a: ")
    monkeypatch.setattr(kernels, "library_layer", lambda *a: "n/a: not installed")
    text = kernels.table("int8wo", N, K, [2], 1)
    assert "| n/a: not installed | " in text and text.rstrip().endswith("| n/a |")


def test_shape_a_format_cannot_hold_is_reported():
    text = kernels.table("Q4_K", 64, 64, [1], 1)
    assert text.startswith("### Q4_K (64x64): n/a: "), text


def test_stream_table_has_a_row_per_format_with_bf16_and_library_times(monkeypatch):
    monkeypatch.setattr(kernels, "_llc_bytes", lambda: 1 << 20)  # a small flush for the test
    text = kernels.stream_table(["int8wo", "Q8_0", "quanto int8"], N, K, layers=3, passes=1)
    lines = text.splitlines()
    assert lines[0].startswith(f"### One row through 3 distinct {N}x{K} layers per format")
    assert lines[2] == ("| format | bf16 ms/layer | fast ms/layer | library ms/layer | "
                        "fast / bf16 | fast / library |")
    rows = [ln for ln in lines[4:] if ln.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows] == ["int8wo", "Q8_0", "quanto int8"]
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")][1:]
        assert len(cells) == 5 and all(re.match(r"^\d+\.\d+$", c) for c in cells), r


def test_llc_size_is_read_from_sysfs_or_defaults():
    size = kernels._llc_bytes()
    assert size >= 1 << 20 and size % 1024 == 0
