"""bench.fast's tables: a quantized row's "vs bf16" is the median of its processes' own
same-process ratios, s/forward and load seconds the best process, errors shown in the cell."""

import json

from bench import fast


def test_best_takes_the_fastest_process_and_the_median_same_process_ratio():
    runs = [{"forward_s": 2.0, "bf16_s": 1.6}, {"forward_s": 1.5, "bf16_s": 1.0},
            {"error": "timed out after 1800 s"}, {"forward_s": 1.8, "bf16_s": 2.0}]
    best = fast._best(runs)
    assert best["forward_s"] == 1.5 and best["vs_bf16"] == 1.25  # ratios 0.9, 1.25, 1.5
    assert fast._vs_bf16(best, {"forward_s": 0.5}) == "1.25x"
    assert fast._vs_bf16({"forward_s": 1.5}, {"forward_s": 0.5}) == "3.00x"  # no pair: across
    assert fast._best([{"error": "x"}, {"error": "y"}]) == {"error": "x"}
    assert fast._best([{"load_s": 3.2}, {"load_s": 1.1}], "load_s") == {"load_s": 1.1}


def test_speed_table_rows_use_the_same_process_ratio():
    res = {(lib, label): {"error": "skipped"} for lib in ("diffquant", "diffusers")
           for label in fast.SCHEMES}
    res[("diffquant", "bf16")] = {"forward_s": 1.4}
    res[("diffusers", "bf16")] = {"forward_s": 1.3}
    res[("diffquant", "gguf Q8_0")] = fast._best([{"forward_s": 1.3, "bf16_s": 1.4}])
    res[("diffusers", "gguf Q8_0")] = fast._best([{"forward_s": 3.9, "bf16_s": 1.3}])
    rows = fast.speed_table(res)
    assert "| gguf Q8_0 | 1.30 | 0.93x | 3.90 | 3.00x | 0.33x |" in rows
    assert "| quanto int8 | err: skipped |  | err: skipped |  |  |" in rows


def test_a_child_that_fails_reports_its_error_instead_of_raising():
    r = fast.child({"kind": "forward", "lib": "diffquant", "label": "bogus", "spec": "nope:x",
                    "checkpoint": "/nonexistent", "size": "quick", "image": 16, "text": 8,
                    "repeats": 1}, timeout=120)
    assert set(r) == {"error"} and r["error"]


def test_only_forward_children_run_with_the_quiet_allocator(monkeypatch):
    seen = {}

    class Done:
        stdout, stderr = 'RESULT {"ok": 1}\n', ""

    def run(cmd, env, **kw):
        seen[json.loads(cmd[-1])["kind"]] = {k: env.get(k) for k in fast.QUIET_MALLOC}
        return Done()

    monkeypatch.setattr(fast.subprocess, "run", run)
    for kind in ("forward", "load"):
        monkeypatch.delenv("MALLOC_MMAP_MAX_", raising=False)
        assert fast.child({"kind": kind, "lib": "diffquant", "label": "bf16"}, 10) == {"ok": 1}
    assert seen["forward"] == fast.QUIET_MALLOC
    assert seen["load"] == {k: None for k in fast.QUIET_MALLOC}
