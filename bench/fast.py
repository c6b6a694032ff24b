"""Forward speed and quantize-on-load cost, diffquant vs diffusers, in one markdown table set.

    python -m bench.fast            # Flux-width transformer (3072, 2 + 3 blocks, 1.16B params),
                                    # 1024 image + 256 text tokens: tens of minutes on 2 threads
    python -m bench.fast --quick    # width 1024, 1 + 1 blocks, 256 + 64 tokens: a few minutes

Every number comes from its own child process (``--child JOB``), run one at a time, with 2 torch
threads, glibc's allocator told to keep freed memory in forward processes (``QUIET_MALLOC``: a
full-size forward otherwise took 40-170K page faults, 5-15% of its time and most of the spread
between runs), and OpenMP's wait policy as the caller has it (the default, as users run: workers
spin briefly after each op; ``OMP_WAIT_POLICY=PASSIVE`` makes every op wake a sleeping worker,
which cost diffquant's C kernels, on torch's pool, 2-10% per layer). A forward job loads the model,
warms it up once on 16 image tokens (lazy packed forms, reused buffers, first-call kernel choices)
and times ``repeats`` forwards back to back; for a quantized scheme it then does the same with its
library's bf16 model in the same process. s/forward is the best over three such processes (on the
full size); "vs bf16" the median over them of each process's own ratio, since the same bf16 forward
moved by 10-25% between processes (without QUIET_MALLOC). A load job (best of three too) resets the peak-RSS counter after
its imports, loads with the checkpoint in the page cache, and reports seconds, peak minus baseline,
the model's bytes, and whether any mapping of the checkpoint file is left. GGUF models come, in
both libraries, from ``from_single_file`` of one ``.gguf`` written by
``diffquant.single_file.export_gguf`` (diffusers cannot quantize GGUF on load). Last,
``bench.kernels`` at the model's width times one linear layer per format at 1 row and at the step's
rows, against bf16 and against the library layer diffusers runs, and one row through a chain of 16
distinct layers per format (``--stream``: a model's modulation linears).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.model import SIZES, ensure_checkpoint, make_inputs, warm_page_cache

THREADS = 2
# Forward processes only (both libraries, bf16 and quantized alike): glibc maps every tensor of
# 32 MB and more, and smaller ones after it trims its heap, to fresh pages, each page faulted in
# on first touch; with these it reuses what was freed. Load processes keep the defaults, since
# their peak memory is what they measure.
QUIET_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(16 << 30)}
# label -> (diffquant config, diffusers config); None = unquantized bf16, "n/a" = not comparable
SCHEMES = {
    "bf16": (None, None),
    "torchao int8wo": ("torchao:int8wo", "torchao:Int8WeightOnlyConfig"),
    "torchao int8dq": ("torchao:int8dq", "torchao:Int8DynamicActivationInt8WeightConfig"),
    "torchao int4wo (g128)": ("torchao:int4wo", "n/a"),
    "quanto int8": ("quanto:int8", "quanto:int8"),
    "quanto int4": ("quanto:int4", "quanto:int4"),
    "gguf Q8_0": ("gguf:Q8_0", "gguf:Q8_0"),
    "gguf Q6_K": ("gguf:Q6_K", "gguf:Q6_K"),
    "gguf Q4_K": ("gguf:Q4_K", "gguf:Q4_K"),
    "gguf Q4_1": ("gguf:Q4_1", "gguf:Q4_1"),
    "gguf Q4_0": ("gguf:Q4_0", "gguf:Q4_0"),
}
GGUF_TYPES = [spec.split(":")[1] for spec, _ in SCHEMES.values() if spec and spec.startswith("gguf")]


# -- child side -------------------------------------------------------------------------------
def _config(lib: str, spec: str | None):
    import torch

    if spec is None:
        return None
    backend, name = spec.split(":")
    if lib == "diffquant":
        import diffquant as dq

        return {"torchao": lambda: dq.TorchAoConfig(name), "quanto": lambda: dq.QuantoConfig(name),
                "gguf": lambda: dq.GGUFQuantizationConfig(torch.bfloat16)}[backend]()
    import diffusers

    if backend == "torchao":
        import torchao.quantization as tq

        return diffusers.TorchAoConfig(getattr(tq, name)())
    if backend == "quanto":
        return diffusers.QuantoConfig(weights_dtype=name)
    return diffusers.GGUFQuantizationConfig(compute_dtype=torch.bfloat16)


def _load(job: dict, config):
    import torch

    if job["lib"] == "diffquant":
        from diffquant import FluxTransformer2DModel
    else:
        from diffusers import FluxTransformer2DModel
    if job.get("gguf"):
        return FluxTransformer2DModel.from_single_file(job["gguf"], config=job["checkpoint"],
                                                       quantization_config=config,
                                                       torch_dtype=torch.bfloat16)
    return FluxTransformer2DModel.from_pretrained(job["checkpoint"], quantization_config=config,
                                                  torch_dtype=torch.bfloat16)


def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _inputs(size, image_tokens: int, text_tokens: int) -> dict:
    import torch

    inputs = make_inputs(dataclasses.replace(size, text_tokens=text_tokens), image_tokens)
    return {k: v.to(torch.bfloat16) if k in ("hidden_states", "encoder_hidden_states",
                                              "pooled_projections") else v
            for k, v in inputs.items()}


def run_child(job: dict) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    config = _config(job["lib"], job["spec"])
    if job["lib"] == "diffusers":
        from diffusers import FluxTransformer2DModel  # noqa: F401 - resolve the lazy import
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM: the peak from here on is the load's
    base = _status("VmRSS")
    start = time.perf_counter()
    model = _load(job, config)
    from bench.worker import footprint  # opens torchao's tensor subclasses to their storage

    out = {"load_s": time.perf_counter() - start, "peak_delta": _status("VmHWM") - base,
           "model_bytes": footprint(model)["model_bytes"]}
    with open("/proc/self/maps") as fh:
        out["mapped"] = sum(job["checkpoint"] in line or ".safetensors" in line for line in fh)
    if job.get("export"):
        from diffquant.single_file import export_gguf

        tmp = Path(job["export"]).with_suffix(".tmp.gguf")
        export_gguf(model, tmp, qtype=job["qtype"], layout="diffusers")  # what diffusers splits at any width
        os.replace(tmp, job["export"])
    if job["kind"] == "forward":
        out.update(_forwards(job, model))
    return out


def _forwards(job: dict, model) -> dict:
    """Best seconds of ``repeats`` forwards (``forward_s``) and, for a quantized scheme, then of
    the same library's bf16 model loaded in the same process (``bf16_s``): between processes the
    same bf16 forward moved by 10-25%. Each model runs its forwards back to back, as a
    pipeline's steps do, after one warm-up on 16 image tokens."""
    import torch

    size = SIZES[job["size"]]
    out = {"forward_s": _best_forward(model, size, job)}
    if job["spec"] is not None:
        out["bf16_s"] = _best_forward(_load({**job, "gguf": None}, None), size, job)
    return out


def _best_forward(model, size, job: dict) -> float:
    import torch

    best = float("inf")
    with torch.no_grad():
        model(**_inputs(size, 16, job["text"]), return_dict=False)  # warm-up
        inputs = _inputs(size, job["image"], job["text"])
        for _ in range(job["repeats"]):
            t0 = time.perf_counter()
            model(**inputs, return_dict=False)
            best = min(best, time.perf_counter() - t0)
    return best


# -- parent side ------------------------------------------------------------------------------
def child(job: dict, timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS),
               TOKENIZERS_PARALLELISM="false", **(QUIET_MALLOC if job["kind"] == "forward" else {}))
    cmd = [sys.executable, "-m", "bench.fast", "--child", json.dumps(job)]
    print(f"  {job['lib']:9s} {job['label']:22s} {job['kind']} ...", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": tail[:120]}


def _best(results, key: str = "forward_s") -> dict:
    """The fastest of several results of one job by ``key`` (an error only if every try
    failed), with ``vs_bf16``: the median over the processes of each one's forward_s / bf16_s
    where they timed their library's bf16 model after the scheme's."""
    results = list(results)
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[0]
    best = dict(min(ok, key=lambda r: r[key]))
    paired = sorted(r["forward_s"] / r["bf16_s"] for r in ok if "bf16_s" in r)
    if paired:
        best["vs_bf16"] = paired[len(paired) // 2]
    return best


def _fmt(r: dict | None, key: str = "forward_s") -> str:
    if r is None:
        return "n/a"
    return f"err: {r['error']}" if "error" in r else f"{r[key]:.2f}"


def _ratio(a: dict | None, b: dict | None) -> str:
    if not a or not b or "forward_s" not in a or "forward_s" not in b:
        return ""
    return f"{a['forward_s'] / b['forward_s']:.2f}x"


def _vs_bf16(a: dict | None, bf16: dict | None) -> str:
    """The same-process ratio where there is one (see _forwards), else across processes."""
    return f"{a['vs_bf16']:.2f}x" if a and "vs_bf16" in a else _ratio(a, bf16)


def speed_table(res: dict) -> list[str]:
    rows = ["| scheme | diffquant s/forward | vs bf16 | diffusers s/forward | vs bf16 | "
            "diffquant / diffusers |", "|---|---|---|---|---|---|"]
    dq_bf16, df_bf16 = res[("diffquant", "bf16")], res[("diffusers", "bf16")]
    for label in SCHEMES:
        a, b = res.get(("diffquant", label)), res.get(("diffusers", label))
        rows.append(f"| {label} | {_fmt(a)} | {_vs_bf16(a, dq_bf16)} | {_fmt(b)} | "
                    f"{_vs_bf16(b, df_bf16)} | {_ratio(a, b)} |")
    return rows


def load_table(res: dict, file_bytes: int) -> list[str]:
    rows = ["| torchao int8wo quantize-on-load | load s | GB/s | peak - baseline | quantized "
            "model | peak / model | checkpoint mappings left |", "|---|---|---|---|---|---|---|"]
    for lib in ("diffquant", "diffusers"):
        r = res[(lib, "load")]
        if "error" in r:
            rows.append(f"| {lib} | err: {r['error']} ||||||")
            continue
        rows.append(f"| {lib} | {r['load_s']:.2f} | {file_bytes / r['load_s'] / 1e9:.2f} | "
                    f"{r['peak_delta'] / 1e9:.2f} GB | {r['model_bytes'] / 1e9:.2f} GB | "
                    f"{r['peak_delta'] / r['model_bytes']:.2f}x | {r['mapped']} |")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fast", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="width-1024 transformer, minutes")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run_child(json.loads(args.child))), flush=True)
        return 0
    size = SIZES["quick" if args.quick else "full"]
    image, text, repeats = (256, 64, 2) if args.quick else (1024, 256, 2)
    # three processes per forward row on the full size: a process's memory placement (and the
    # shared machine) moved the same forward by 10-25% between processes (bf16 1.19-1.54 s)
    processes = 1 if args.quick else 3
    timeout = 600 if args.quick else 1800
    ckpt = ensure_checkpoint(size, log=lambda m: print(m, file=sys.stderr))
    file_bytes = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    base = {"checkpoint": str(ckpt), "size": size.name, "image": image, "text": text,
            "repeats": repeats}
    ggufs = {}
    for qtype in GGUF_TYPES:
        path = ckpt.parent / "fast-gguf" / f"transformer-{qtype}.gguf"
        path.parent.mkdir(exist_ok=True)
        if not path.is_file():
            r = _export(base, path, qtype, timeout)
            if "error" in r:
                print(f"export {qtype}: {r['error']}", file=sys.stderr)
        ggufs[qtype] = str(path)
    warm_page_cache(ckpt)
    res = {}
    for lib in ("diffquant", "diffusers"):
        job = {**base, "kind": "load", "lib": lib, "label": "torchao int8wo",
               "spec": SCHEMES["torchao int8wo"][lib == "diffusers"]}
        res[(lib, "load")] = _best((child(job, timeout) for _ in range(processes)), "load_s")
    for label, specs in SCHEMES.items():
        for lib, spec in zip(("diffquant", "diffusers"), specs):
            if spec == "n/a":
                continue
            job = {**base, "kind": "forward", "lib": lib, "label": label, "spec": spec}
            if spec and spec.startswith("gguf"):
                job["gguf"] = ggufs[spec.split(":")[1]]
            res[(lib, label)] = _best(child(job, timeout) for _ in range(processes))
    print(_header(size, image, text))
    print("\n".join(speed_table(res)))
    print()
    print("\n".join(load_table(res, file_bytes)))
    print()
    print(_kernel_tables(size.width, image + text, timeout), end="")
    return 0


def _kernel_tables(width: int, rows: int, timeout: float) -> str:
    """bench.kernels at the model's width, 1 row (the embedders and modulation linears) and the
    step's rows, each format against bf16 and against the library layer diffusers runs; then one
    row through 16 distinct layers per format."""
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), **QUIET_MALLOC)
    cmd = [sys.executable, "-m", "bench.kernels", "--shape", str(width), str(width),
           "--rows", "1", str(rows), "--reps", "5", "--stream", "16"]
    print("  kernels ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        return f"bench.kernels failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}\n"
    return "One linear layer per format (`python -m bench.kernels`):\n\n" + proc.stdout


def _export(base: dict, path: Path, qtype: str, timeout: float) -> dict:
    """Quantize the checkpoint to ``qtype`` with diffquant and write the .gguf both libraries load."""
    job = {**base, "kind": "export", "lib": "diffquant", "label": f"export {qtype}",
           "spec": None, "export": str(path), "qtype": qtype}
    return child(job, timeout)


def _header(size, image: int, text: int) -> str:
    import platform

    import torch

    from diffquant.ops.cpu.dispatch import cpu_products

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"Flux-width transformer {size.name}: width {size.width}, {size.double} double + "
            f"{size.single} single blocks; {image} image + {text} text tokens, batch 1, bf16; "
            f"{THREADS} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY') or 'default'}, "
            f"forward processes with {' '.join(f'{k}={v}' for k, v in QUIET_MALLOC.items())}; "
            f"{platform.processor() or platform.machine()}"
            f", torch {torch.__version__}; {cpu_products()}; load average {load:.1f} "
            f"(shared machine)\n")


if __name__ == "__main__":
    sys.exit(main())
