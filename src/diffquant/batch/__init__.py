"""Batch generation: many prompts through one pipeline, on this machine or on a Ray cluster.

``run_batch`` (and ``diffquant batch PROMPTS OUT/``) loads the pipeline once, runs the prompts
``batch_size`` to a pipeline call, writes each image atomically to ``OUT/images/<id>-<seed>.png``
and a record per prompt to ``OUT/results.jsonl`` (prompt, seed, scheme, seconds, path, and PSNR
against the unquantized pipeline with ``reference``). A second run skips what is done, also
after a killed run; a prompt that fails is recorded with its error and the batch goes on. With
``ray`` the same groups run on a Ray Data actor pool (``ray_run.py``), with the same images.

Example:
    >>> from diffquant.batch import run_batch
    >>> prompts = ["a red circle", {"prompt": "a blue square", "seed": 7}]
    >>> records = run_batch(prompts, "out/batch", quantize=["torchao:int8wo"],  # doctest: +SKIP
    ...                     steps=2, height=64, width=64, reference=True)
    >>> [(r["id"], r["seed"], r["status"], r["path"]) for r in records]     # doctest: +SKIP
    [('00001', 0, 'ok', 'images/00001-0.png'), ('00002', 7, 'ok', 'images/00002-7.png')]
    >>> run_batch(..., ray="", ray_actors=2)   # on a local Ray cluster    # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from .prompts import Job, make_groups, read_prompts
from .results import ResultsLog, check_identity, locked, record_key, remove_partials

__all__ = ["run_batch", "read_prompts", "make_groups", "Job"]


def _quantized(model: str, component: str) -> bool:
    import json

    from ..hub import resolve_file

    path = resolve_file(model, "config.json", subfolder=component)
    return path.is_file() and "quantization_config" in json.loads(path.read_text(encoding="utf-8"))


def _check_model(model, quantize: list[str], reference):
    """Fail on a bad model, SPEC or reference before anything loads; returns the reference
    to load ("default", a folder, or None)."""
    from ..cli.commands import _model_index, _quant_config

    name, index = _model_index(None if model is None else str(model))
    _quant_config(quantize, name, index)
    if reference in (None, False):
        return None
    if reference is not True:
        _model_index(str(reference))
        return str(reference)
    quantized = [c for c in index if not c.startswith("_") and _quantized(name, c)]
    if quantized:
        raise ConfigError(f"reference: {name} is pre-quantized ({', '.join(quantized)}), so it "
                          "has no unquantized run; give the original pipeline's folder as the "
                          "reference")
    if not quantize:
        raise ConfigError("reference: nothing is quantized, so the reference is the pipeline "
                          "itself; give --quantize SPECs, or a reference pipeline folder")
    return "default" if model is None else str(model)


def run_batch(prompts, out, *, model=None, quantize=None, batch_size: int = 1, reference=None,
              seed: int = 0, steps: int = 4, height: int | None = None, width: int | None = None,
              guidance: float | None = None, negative_prompt: str | None = None,
              dtype: str = "auto", device: str = "auto", ray=None, ray_actors: int = 1,
              ray_cpus_per_actor: float = 1, ray_gpus_per_actor: float = 0,
              pipeline_dir=None, parquet: bool = False, progress: bool = True) -> list[dict]:
    """Make an image per prompt of ``prompts`` (a .jsonl/.txt path or a list) under ``out``;
    returns one record per prompt, in order (as ``out/results.jsonl`` holds them).

    ``model``: a pipeline folder or hub id (None or "default": the shipped one), quantized on
    load with ``quantize`` (CLI SPECs such as "gguf:q4_0"), or pre-quantized. ``reference``:
    True for the same model unquantized, or a pipeline folder; each record gets the PSNR
    against it.
    ``seed``/``steps``/``height``/``width``/``guidance``/``negative_prompt``: defaults a prompt
    line may override. ``ray``: None runs here; "" a local Ray cluster (or RAY_ADDRESS); else
    the cluster's address. On Ray, ``quantize`` is applied once here and saved to
    ``pipeline_dir`` (default ``out/.pipeline``), which every actor loads."""
    quantize = list(quantize or [])
    ray = "" if ray is True else None if ray is False else ray
    model = None if model in (None, "default") else model  # "default": the shipped pipeline
    jobs = read_prompts(prompts, seed=seed, steps=steps, height=height, width=width,
                        guidance=guidance, negative_prompt=negative_prompt)
    groups = make_groups(jobs, batch_size)
    if ray is not None:
        from .cluster import require_ray

        require_ray()  # before any loading: say which extra to install
    reference = _check_model(model, quantize, reference)
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    identity = {"model": "default" if model is None else str(model), "quantize": quantize,
                "dtype": dtype, "reference": reference}
    with locked(out):
        check_identity(out, identity)
        remove_partials(out)
        log = ResultsLog(out)
        done = log.done() & {j.key for j in jobs}
        latest = log.read()
        pending = [(g, {j.key for j in g} & done) for g in groups
                   if any(j.key not in done for j in g)]
        _run(pending, out, log, latest, len(jobs), len(done), model, quantize, reference,
             dict(dtype=dtype, device=device, ray=ray, actors=ray_actors, cpus=ray_cpus_per_actor,
                  gpus=ray_gpus_per_actor, pipeline_dir=pipeline_dir, progress=progress))
        records = [latest[j.key] for j in jobs if j.key in latest]
        log.rewrite(records, parquet=parquet)
    return records


def _run(pending, out: Path, log: ResultsLog, latest: dict, total: int, done: int, model,
         quantize: list[str], reference, opts: dict) -> None:
    from tqdm.auto import tqdm

    if not pending:
        return
    worker = dict(out=str(out), dtype=opts["dtype"], device=opts["device"],
                  scheme="+".join(quantize) or None, reference=reference)
    if opts["ray"] is None:
        from .worker import BatchWorker

        local = BatchWorker(model=model, quantize=quantize, **worker)  # before the bar: its own
    else:
        from .ray_run import absolute, prepare_pipeline_dir, run_on_ray

        if quantize:  # once, here; the actors load the result
            dest = Path(opts["pipeline_dir"] or out / ".pipeline").expanduser()
            model = prepare_pipeline_dir(model, quantize, opts["dtype"], dest,
                                         owned=opts["pipeline_dir"] is None)
        worker.update(out=absolute(out), model=absolute(model), quantize=None,
                      reference=absolute(reference))
    bar = tqdm(total=total, initial=done, unit="prompt", desc="batch",
               disable=not opts["progress"])

    def on_records(records: list[dict]) -> None:
        log.append(records)
        latest.update((record_key(r), r) for r in records)
        bar.update(len(records))
        if any(r["status"] != "ok" for r in records):
            bar.set_postfix(failed=sum(r["status"] != "ok" for r in latest.values()))

    try:
        if opts["ray"] is None:
            for jobs, skip in pending:
                on_records(local.run_group(jobs, skip))
        else:
            run_on_ray(pending, worker, on_records, address=opts["ray"] or None,
                       actors=opts["actors"], cpus=opts["cpus"], gpus=opts["gpus"])
    finally:
        bar.close()
