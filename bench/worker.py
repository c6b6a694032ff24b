"""One measurement, run in its own child process: ``python -m bench.worker job.json result.json``.

A job loads the bench checkpoint with one library (diffquant or diffusers) and one scheme, and
records, in this order so nothing later disturbs an earlier number:

1. ``baseline``: peak resident memory (VmHWM, i.e. ru_maxrss) after importing torch, the library
   and the backend's own package: the interpreter's fixed cost;
2. ``load_s`` and ``peak``: from_pretrained wall time and peak resident memory after it;
3. ``model_bytes`` / ``linear_bytes``: bytes the loaded model holds (tensor subclasses such as
   torchao's and quanto's are opened to their inner tensors);
4. seconds per forward at each image-token count (the minimum of ``repeats`` after a warm-up),
   and the outputs, saved for the quality table.

Errors never escape: each stage's exception becomes ``error`` in the result, and what was
measured before it is kept.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

BACKEND_PACKAGES = {"torchao": "torchao", "bitsandbytes": "bitsandbytes", "quanto": "optimum.quanto",
                    "gguf": "gguf", "modelopt": "modelopt.torch.quantization"}


def peak_rss() -> int:
    """Peak resident bytes of this process (VmHWM; ru_maxrss where /proc is missing)."""
    from diffquant.report import peak_rss_bytes

    return peak_rss_bytes()


def resident() -> int | None:
    """Resident bytes now (VmRSS)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_anon() -> int | None:
    """Anonymous resident bytes now (RssAnon): memory the process owns, file pages excluded."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class AnonPeak:
    """Peak RssAnon while the block runs, sampled every ``interval`` s by a thread.

    ru_maxrss also counts the pages of a memory-mapped checkpoint that a loader touched, which
    the kernel can drop at will; the anonymous peak is what the loader itself allocated.
    """

    def __init__(self, interval: float = 0.002):
        import threading

        self.interval, self.peak, self._stop = interval, rss_anon(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.wait(self.interval):
            now = rss_anon()
            if now is not None and self.peak is not None:
                self.peak = max(self.peak, now)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        now = rss_anon()
        if now is not None and self.peak is not None:
            self.peak = max(self.peak, now)


def short_error(err: BaseException) -> str:
    """One line for a table cell: the type and the first line of the message."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}"[:160]


def _import_backend(backend: str) -> None:
    package = BACKEND_PACKAGES.get(backend)
    if package:
        try:
            __import__(package)
        except Exception:  # noqa: BLE001 - a missing backend shows up as the load error
            pass


def _load(job: dict, config):
    """The model, loaded as ``job`` says (the timed part)."""
    import torch

    dtype = getattr(torch, job["dtype"])
    path = job["checkpoint"]
    if job["lib"] == "diffquant":
        from diffquant import FluxTransformer2DModel

        if job.get("gguf_source"):
            return FluxTransformer2DModel.from_single_file(job["gguf_source"], config=path,
                                                           quantization_config=config,
                                                           torch_dtype=dtype)
        return FluxTransformer2DModel.from_pretrained(path, quantization_config=config,
                                                      torch_dtype=dtype)
    from diffusers import FluxTransformer2DModel

    if job.get("gguf_source"):
        return FluxTransformer2DModel.from_single_file(job["gguf_source"], config=path,
                                                       quantization_config=config, torch_dtype=dtype)
    return FluxTransformer2DModel.from_pretrained(path, quantization_config=config, torch_dtype=dtype)


def tensor_bytes(t, seen: set) -> int:
    """Bytes behind ``t``, each storage counted once; tensor subclasses opened to inner tensors."""
    import torch

    if t is None or not isinstance(t, torch.Tensor) or t.is_meta:
        return 0
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n, None), seen) for n in names)
    storage = t.untyped_storage()
    key = (storage.data_ptr(), str(t.device))
    if key in seen:
        return 0
    seen.add(key)
    return storage.nbytes()


def footprint(model) -> dict:
    """Bytes of the whole model, and of linear layers' weights (everything but their bias)."""
    seen: set = set()
    linear_bytes = linear_weights = 0
    for module in model.modules():
        n_in, n_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
        if not (isinstance(n_in, int) and isinstance(n_out, int)):
            continue
        tensors = [t for name, t in list(module.named_parameters(recurse=False))
                   + list(module.named_buffers(recurse=False)) if name != "bias"]
        linear_bytes += sum(tensor_bytes(t, seen) for t in tensors)
        linear_weights += n_in * n_out
    total = linear_bytes + sum(tensor_bytes(t, seen) for t in
                               list(model.parameters()) + list(model.buffers()))
    return {"model_bytes": total, "linear_bytes": linear_bytes, "linear_weights": linear_weights}


def _forward_times(model, job: dict, result: dict) -> dict:
    """Seconds per forward for each image-token count; returns the float32 outputs."""
    import torch

    from bench.model import SIZES, make_inputs

    size = SIZES[job["size"]]
    dtype = getattr(torch, job["dtype"])
    outputs, times = {}, {}
    # no_grad, not inference_mode: quanto repacks weights on first use, which inference tensors forbid
    with torch.no_grad():
        for n in size.image_tokens:
            # inputs follow the model (diffusers' bitsandbytes places it on the GPU itself)
            device = next(model.parameters()).device
            inputs = {k: v.to(device) for k, v in make_inputs(size, n).items()}
            for key in ("hidden_states", "encoder_hidden_states", "pooled_projections"):
                inputs[key] = inputs[key].to(dtype)
            if not times and size.warmup:  # warm-up once: first-call allocations and kernel selection
                model(**inputs, return_dict=False)
            best = float("inf")
            for _ in range(size.repeats):
                start = time.perf_counter()
                out = model(**inputs, return_dict=False)[0]
                best = min(best, time.perf_counter() - start)
            times[str(n)] = best
            outputs[str(n)] = out.float().cpu()
            result.setdefault("rss_after", {})[str(n)] = resident()  # after this count's forwards
            result["step_s"] = dict(times)  # kept even if a later token count fails
    result["peak_forward"] = peak_rss()
    return outputs


def run_job(job: dict) -> dict:
    """Run one measurement in this process; see the module docstring."""
    import torch

    torch.set_num_threads(job["threads"])
    result: dict = {"lib": job["lib"], "label": job["label"]}
    stage = "import"
    try:
        from bench.schemes import Scheme, config_of, diffusers_config

        scheme = Scheme(**job["scheme"])
        if job["lib"] == "diffusers":
            import diffusers  # noqa: F401
            from diffusers import FluxTransformer2DModel  # noqa: F401 - resolve the lazy import
        else:
            import diffquant.quantizers  # noqa: F401 - registers the backends
        _import_backend(scheme.backend)
        stage = "config"
        config = config_of(scheme) if scheme.quantized else None
        if config is not None and job["lib"] == "diffusers":
            config = diffusers_config(config)
        result["baseline"], result["anon_baseline"] = peak_rss(), rss_anon()
        stage = "load"
        with AnonPeak() as anon:
            start = time.perf_counter()
            model = _load(job, config)
            result["load_s"] = time.perf_counter() - start
        result["peak"], result["anon_peak"] = peak_rss(), anon.peak
        result.update(footprint(model))
        if hasattr(model, "get_memory_footprint"):
            result["footprint_reported"] = model.get_memory_footprint()
        if job.get("export_gguf"):
            stage = "export"
            _export(model, job, config)
        if job.get("speed", True):
            stage = "forward"
            outputs = _forward_times(model, job, result)
            if job.get("outputs"):
                torch.save(outputs, job["outputs"])
    except Exception as err:  # noqa: BLE001 - the error goes into the table cell
        result["error"] = f"{stage}: {short_error(err)}"
        result["traceback"] = traceback.format_exc()[-4000:]
    return result


def _export(model, job: dict, config) -> None:
    """Write the .gguf that diffusers' GGUF loader reads (diffusers cannot quantize on load)."""
    from diffquant.single_file import export_gguf

    target = Path(job["export_gguf"])
    tmp = target.with_suffix(".tmp.gguf")
    # diffusers names: its loader splits original-layout files with Flux-dev sizes written in
    export_gguf(model, tmp, qtype=config.quant_type, layout="diffusers")
    os.replace(tmp, target)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m bench.worker JOB.json RESULT.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())
    result = run_job(job)
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
