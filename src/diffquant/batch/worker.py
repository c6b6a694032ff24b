"""One batch worker: a pipeline loaded once, groups of jobs run through it, each image written
atomically under ``OUT/images/``, one record per job.

The one-machine run makes one ``BatchWorker``; on Ray, Ray Data's actor pool makes one per
actor and calls it on rows of groups (``__call__``). Images are named by prompt id and seed, so
a retried group rewrites the same files with the same bytes.

``DIFFQUANT_BATCH_KILL_AFTER=N`` (for tests of resuming): once N images are in place, the
process kills itself with SIGKILL after writing the next image's temporary file, before the
rename, as a power cut or an out-of-memory kill would leave it.

Example:
    >>> from diffquant.batch.prompts import read_prompts
    >>> worker = BatchWorker("out/", quantize=["torchao:int8wo"])             # doctest: +SKIP
    >>> worker.run_group(read_prompts(["a red circle"], height=32, width=32))   # doctest: +SKIP
    [{'id': '00001', 'seed': 0, 'status': 'ok', 'path': 'images/00001-0.png', ...}]
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import secrets
import signal
import socket
import time
from pathlib import Path
from types import SimpleNamespace

from .prompts import Job

logger = logging.getLogger(__name__)
KILL_AFTER_ENV = "DIFFQUANT_BATCH_KILL_AFTER"
PARTIAL = ".partial"  # in the names of images being written; never counted as done
_committed = [0]  # images this process has put in place (for KILL_AFTER_ENV)


def load_pipeline(model, quantize, dtype: str, device: str):
    """The pipeline as the CLI loads it (``--model``, ``--quantize``, ``--dtype``, ``--device``)."""
    from ..cli.commands import load_pipeline as cli_load

    args = SimpleNamespace(model=None if model is None else str(model), dtype=dtype,
                           device=device, quiet=True)
    pipe, _ = cli_load(args, list(quantize or []))
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe


def describe_pipeline(pipe) -> str:
    """"transformer: torchao int8wo, ..." for a pipeline's quantized components, else
    "unquantized" (the scheme of a pre-quantized pipeline's records)."""
    from ..report import describe_quantization

    components = getattr(pipe, "components", {}) or {}
    parts = [f"{name}: {describe_quantization(c)}" for name, c in components.items()
             if c is not None and describe_quantization(c) != "-"]
    return ", ".join(parts) or "unquantized"


def _outputs(output, n: int) -> list:
    """A pipeline call's results, one per prompt: a PIL image, or a video's PIL frames."""
    from ..cli.media import pipeline_output

    frames = getattr(output, "frames", None)
    if frames is None:
        return list(output.images)[:n]
    return [pipeline_output(SimpleNamespace(frames=[video])) for video in list(frames)[:n]]


def call_pipeline(pipe, jobs: list[Job]) -> tuple[list, float]:
    """One pipeline call for ``jobs`` (equal call settings), a CPU generator seeded per job
    (the same noise on every device); returns (one result per job, seconds)."""
    import torch

    from ..cli.commands import run_sizes

    first = jobs[0]
    accepted = inspect.signature(pipe.__call__).parameters
    sizes = run_sizes(pipe, SimpleNamespace(height=first.height, width=first.width,
                                            max_sequence_length=None, num_frames=None))
    kwargs = dict(prompt=[j.prompt for j in jobs], num_inference_steps=first.steps,
                  generator=[torch.Generator("cpu").manual_seed(j.seed) for j in jobs],
                  output_type="pil", **sizes)
    negative = None if first.negative_prompt is None else [first.negative_prompt] * len(jobs)
    for name, field, value in (("guidance_scale", "guidance", first.guidance),
                               ("negative_prompt", "negative_prompt", negative),
                               ("true_cfg_scale", "true_cfg_scale", first.true_cfg_scale)):
        if value is None:
            continue
        if name not in accepted:
            raise ValueError(f"{type(pipe).__name__} takes no {name}; drop {field!r} from the "
                             "prompt's line")
        kwargs[name] = value
    start = time.perf_counter()
    with torch.no_grad():  # as `diffquant generate`: quanto's int4 layers fail under inference_mode
        output = pipe(**kwargs)
    return _outputs(output, len(jobs)), time.perf_counter() - start


def write_atomic(result, path: Path) -> None:
    """Write an image (or a video's frames) to ``path``: into a temporary file beside it,
    flushed to disk, then renamed over it, so ``path`` is always whole or absent."""
    from ..cli.media import save_output

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}-{os.getpid()}-{secrets.token_hex(4)}{PARTIAL}{path.suffix}")
    try:
        save_output(result, tmp, fps=16)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        limit = os.environ.get(KILL_AFTER_ENV)
        if limit is not None and _committed[0] >= int(limit):
            os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
        os.replace(tmp, path)
        _committed[0] += 1
    finally:
        tmp.unlink(missing_ok=True)


def _psnr(result, reference) -> float | None:
    """PSNR (dB) over every frame; None where the images are identical (PSNR is infinite, which
    JSON cannot hold)."""
    import math

    import numpy as np

    from ..report import psnr

    def stack(r):
        return np.stack([np.asarray(f) for f in (r if isinstance(r, list) else [r])])

    value = psnr(stack(result), stack(reference))
    return None if math.isinf(value) else round(value, 3)


class BatchWorker:
    """Holds one pipeline (and, with ``reference``, an unquantized one to measure against);
    makes the images of one group of jobs at a time.

    ``model``/``quantize``/``dtype``/``device`` as the CLI takes them; a pre-quantized folder
    loads with ``quantize=None``. ``reference`` is a pipeline folder (or "default") run without
    quantization: its images go to ``OUT/reference/`` and each record gets their PSNR."""

    def __init__(self, out, model=None, quantize=None, dtype="auto", device="auto",
                 reference=None, scheme: str | None = None):
        self.out = Path(out)
        self.pipe = load_pipeline(model, quantize, dtype, device)
        self.reference = None if reference is None else \
            load_pipeline(None if reference == "default" else reference, None, dtype, device)
        self.scheme = scheme or describe_pipeline(self.pipe)
        self.suffix = ".png"

    def _record(self, job: Job, **fields) -> dict:
        return {"id": job.id, "seed": job.seed, "prompt": job.prompt, "scheme": self.scheme,
                "height": job.height, "width": job.width, "steps": job.steps, **fields}

    def _error(self, job: Job, err: BaseException) -> dict:
        text = " ".join(str(err).split()) or type(err).__name__
        return self._record(job, status="error", error=f"{type(err).__name__}: {text}")

    def _write(self, job: Job, result, reference, seconds: float, batch: int) -> dict:
        name = f"{job.key}{'.webp' if isinstance(result, list) else self.suffix}"
        write_atomic(result, self.out / "images" / name)
        fields = dict(status="ok", path=f"images/{name}", seconds=round(seconds, 4), batch=batch)
        if reference is not None:
            write_atomic(reference, self.out / "reference" / name)
            fields["psnr"] = _psnr(result, reference)
        first = result[0] if isinstance(result, list) else result
        # which process made it, and when (unix seconds): on a cluster, where to look
        return self._record(job, **fields, size=[first.height, first.width],
                            worker=f"{socket.gethostname()}:{os.getpid()}",
                            finished=round(time.time(), 3))

    def run_group(self, jobs: list[Job], skip=frozenset()) -> list[dict]:
        """Run ``jobs`` as one pipeline call; a record per job not in ``skip`` (keys already
        done: the call still includes them, so the others get the same pixels as in an
        unbroken run). A failed call is retried one job at a time, so one bad prompt fails
        alone; a failure is a record with its error, never an exception."""
        records = [self._error(j, ValueError(j.problem())) for j in jobs if j.problem()]
        runnable = [j for j in jobs if not j.problem()]
        if not runnable:
            return records
        try:
            results, seconds = call_pipeline(self.pipe, runnable)
            refs = call_pipeline(self.reference, runnable)[0] if self.reference else None
        except Exception as err:  # noqa: BLE001 - recorded per prompt; the batch goes on
            logger.debug("batch call of %s failed", [j.key for j in runnable], exc_info=True)
            if len(runnable) == 1:
                return records + [self._error(runnable[0], err)]
            for job in runnable:
                if job.key not in skip:
                    records += self.run_group([job])
            return records
        for i, job in enumerate(runnable):
            if job.key not in skip:
                ref = None if refs is None else refs[i]
                records.append(self._write(job, results[i], ref, seconds / len(runnable),
                                           len(runnable)))
        return records

    def __call__(self, batch: dict) -> dict:
        """Ray Data's map_batches: rows of ``{"group": JSON}`` -> rows of ``{"record": JSON}``."""
        import numpy as np

        records = []
        for text in batch["group"]:
            group = json.loads(str(text))
            jobs = [Job.from_dict(d) for d in group["jobs"]]
            records += self.run_group(jobs, skip=frozenset(group["skip"]))
        return {"record": np.array([json.dumps(r) for r in records], dtype=object)}
