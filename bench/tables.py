"""Markdown tables from the workers' results; each table is headed by the machine line.

``results[(label, lib)]`` is a worker result dict (or ``{"na": reason}``); every number that is
missing prints as the error or reason instead, so a failing scheme never hides the others.

Example:
    >>> from bench.tables import md_table
    >>> print(md_table(["a", "b"], [[1, 2]]))
    | a | b |
    |---|---|
    | 1 | 2 |
"""

from __future__ import annotations

import math
import os
import platform
from importlib import metadata

import torch

LIBS = ("diffquant", "diffusers")
PACKAGES = ("diffquant", "diffusers", "torch", "torchao", "bitsandbytes", "optimum-quanto", "gguf",
            "nvidia-modelopt", "safetensors")
TITLES = {
    "bits": "### 1. Weight bits per parameter",
    "memory": "### 2. Peak memory while quantizing on load",
    "load": "### 3. Load seconds",
    "speed": "### 4. Seconds per denoising step",
    "quality": "### 5. Quality: transformer output against the unquantized float32 model",
    "images": "### 6. Quality: final images of the shipped pipeline",
}


def md_table(header: list, rows: list[list]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(threads: int) -> str:
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} -")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    # The load average says how much other work shared the cores while timings were taken.
    load = f"load avg {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return (f"_CPU: {cpu_model()} ({os.cpu_count()} logical cores, {gpu}, {load}) · "
            f"threads: {threads} · Python {platform.python_version()} · {', '.join(versions)}_")


def section(key: str, machine: str, body: str, notes: str = "") -> str:
    return "\n\n".join(part for part in (TITLES[key], machine, body, notes) if part)


# -- cell helpers ----------------------------------------------------------------------------
def _cell(res: dict | None, value):
    """``value`` formatted, or the reason it is missing (the result's error or n/a text)."""
    if value is not None:
        return value
    if res is None:
        return "-"
    if "na" in res:
        return res["na"]
    return f"error: {res['error']}" if "error" in res else "-"


def gib(n) -> str:
    return f"{n / 2**30:.2f} GiB"


def _get(res, *keys):
    if res is None or "na" in res:
        return None
    if any(res.get(k) is None for k in keys):
        return None
    return [res[k] for k in keys] if len(keys) > 1 else res[keys[0]]


# -- 1. bits ---------------------------------------------------------------------------------
def bits_rows(schemes, results, ideals: dict, params: int, load_only: list) -> list[list]:
    rows = []
    for s in schemes:
        ideal, formula = ideals[s.label]
        row = [s.label, "-" if ideal is None else f"{ideal:.3f} ({formula})"]
        for lib in LIBS:
            res = results.get((s.label, lib))
            lin = _get(res, "linear_bytes", "linear_weights")
            row.append(_cell(res, lin and f"{8 * lin[0] / lin[1]:.3f}"))
        for lib in LIBS:
            res = results.get((s.label, lib))
            total = _get(res, "model_bytes")
            row.append(_cell(res, total and f"{total / params:.3f}"))
        rows.append(row)
    for name, ideal, formula in load_only:
        rows.append([f"gguf {name} (load only)", f"{ideal:.3f} ({formula})",
                     "n/a (no quantizer: loads from .gguf files only)", "-", "-", "-"])
    return rows


BITS_HEADER = ["scheme", "ideal bits/weight (formula)", "diffquant linear bits/weight",
               "diffusers linear bits/weight", "diffquant model bytes/param",
               "diffusers model bytes/param"]


# -- 2. memory, 3. load ----------------------------------------------------------------------
MEMORY_HEADER = ["scheme"] + [f"{lib} {col}" for lib in LIBS for col in
                              ("model size", "load peak − baseline", "× model",
                               "anon. peak × model", "after a step")]


def memory_rows(schemes, results) -> list[list]:
    rows = []
    for s in schemes:
        row = [s.label]
        for lib in LIBS:
            res = results.get((s.label, lib))
            got = _get(res, "model_bytes", "peak", "baseline")
            if got is None:
                row += [_cell(res, None), "", "", "", ""]
                continue
            size, peak, base = got
            after, anon = res.get("peak_forward"), _get(res, "anon_peak", "anon_baseline")
            row += [gib(size), gib(peak - base), f"{(peak - base) / size:.2f}×",
                    f"{(anon[0] - anon[1]) / size:.2f}×" if anon else "-",
                    gib(after - base) if after else "-"]
        rows.append(row)
    return rows


def load_rows(schemes, results) -> list[list]:
    rows = []
    for s in schemes:
        a, b = (_get(results.get((s.label, lib)), "load_s") for lib in LIBS)
        rows.append([s.label] + [_cell(results.get((s.label, lib)), v and f"{v:.2f}")
                                 for lib, v in zip(LIBS, (a, b))]
                    + [f"{b / a:.2f}×" if a and b else "-"])
    return rows


LOAD_HEADER = ["scheme", "diffquant load s", "diffusers load s", "diffusers ÷ diffquant"]


# -- 4. speed --------------------------------------------------------------------------------
def speed_header(tokens) -> list[str]:
    return ["scheme"] + [f"{lib} s/step @{n} (× own bf16)" for n in tokens for lib in LIBS]


def speed_rows(schemes, results, tokens, bf16_label: str) -> list[list]:
    rows = []
    for s in schemes:
        row = [s.label]
        for n in tokens:
            for lib in LIBS:
                res = results.get((s.label, lib))
                t = (_get(res, "step_s") or {}).get(str(n))
                ref = (_get(results.get((bf16_label, lib)), "step_s") or {}).get(str(n))
                text = t and (f"{t:.3f} ({t / ref:.2f}×)" if ref else f"{t:.3f}")
                row.append(_cell(res, text))
        rows.append(row)
    return rows


# -- 5. quality ------------------------------------------------------------------------------
def compare(out: dict, ref: dict) -> tuple[float, float]:
    """(relative L2 error, PSNR dB with peak = the reference's range) over all token counts."""
    a = torch.cat([out[k].flatten() for k in sorted(ref)]).double()
    b = torch.cat([ref[k].flatten() for k in sorted(ref)]).double()
    err = (a - b).norm() / b.norm()
    mse = float(((a - b) ** 2).mean())
    peak = float(b.max() - b.min())
    return float(err), (math.inf if mse == 0 else 10 * math.log10(peak ** 2 / mse))


QUALITY_HEADER = ["scheme", "diffquant rel. error", "diffquant PSNR dB", "diffusers rel. error",
                  "diffusers PSNR dB"]


def quality_rows(schemes, results, outputs: dict, reference: dict | None) -> list[list]:
    rows = []
    for s in schemes:
        row = [s.label]
        for lib in LIBS:
            res, out = results.get((s.label, lib)), outputs.get((s.label, lib))
            if reference is None or out is None:
                reason = _cell(res, None) if res and ("error" in res or "na" in res) else \
                    "no reference output" if reference is None else "-"
                row += [reason, ""]
                continue
            try:
                err, db = compare(out, reference)
                row += [f"{err:.2e}", f"{db:.1f}"]
            except (RuntimeError, ValueError) as e:  # mismatched shapes: say so in the cell
                row += [f"error: {e}", ""]
        rows.append(row)
    return rows
