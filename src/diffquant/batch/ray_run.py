"""The batch on a Ray cluster: Ray Data ``map_batches`` over a fixed pool of actors, each a
``BatchWorker`` holding one pipeline loaded once from a pre-quantized folder.

Each row of the dataset is one group (one pipeline call, formed by the driver exactly as the
one-machine run forms it), so every image comes out of the same call with the same inputs as
on one machine. Ray does the scheduling, retries and back-pressure; the driver only writes the
records that come back. Quantizing happens once, in the driver (``prepare_pipeline_dir``),
never in an actor.

Example:
    >>> from diffquant.batch import run_batch
    >>> run_batch("prompts.jsonl", "out/", quantize=["gguf:q8_0"], ray="",  # doctest: +SKIP
    ...           ray_actors=2, ray_cpus_per_actor=1)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ConfigError
from .cluster import quiet_ray_data, ray_session
from .worker import BatchWorker, load_pipeline

MARKER = "diffquant_batch.json"
# set before an actor's process imports anything (tqdm reads its defaults on import): loading
# bars would only interleave in the driver's log, where the batch has its own bar
QUIET_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
             "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"}  # in a folder prepare_pipeline_dir wrote: what it holds


def prepare_pipeline_dir(model, quantize: list[str], dtype: str, dest: Path, owned: bool) -> Path:
    """Quantize ``model`` with ``quantize`` once and save it to ``dest`` (every actor loads it
    pre-quantized); a folder this wrote earlier for the same model and SPECs is reused.
    ``owned``: ``dest`` is the batch's own OUT/.pipeline, overwritten where it lacks the marker
    (a run killed between the save and the marker); a folder the user named never is."""
    want = {"model": "default" if model is None else str(model), "quantize": list(quantize),
            "dtype": dtype}
    marker = dest / MARKER
    if marker.is_file():
        found = json.loads(marker.read_text(encoding="utf-8"))
        if found == want:
            return dest
        raise ConfigError(f"{dest}: holds a pipeline quantized from {found.get('model')!r} with "
                          f"{found.get('quantize')} ({marker}); give another pipeline folder or "
                          "remove it")
    if not owned and dest.exists() and any(dest.iterdir()):
        raise ConfigError(f"{dest}: exists and was not written by diffquant batch (no {MARKER}); "
                          "give an empty or new folder for the pre-quantized pipeline")
    # on the CPU: the driver may have no accelerator, and the saved weights are the same
    load_pipeline(model, quantize, dtype, "cpu").save_pretrained(str(dest))
    tmp = dest / f".{MARKER}.{os.getpid()}"
    tmp.write_text(json.dumps(want) + "\n", encoding="utf-8")
    os.replace(tmp, marker)
    return dest


def run_on_ray(pending: list[tuple[list, set]], worker_kwargs: dict, on_records, *,
               address: str | None, actors: int, cpus: float, gpus: float) -> None:
    """Run ``pending`` groups ([(jobs, keys done)]) on ``actors`` Ray actors of ``cpus`` CPUs
    and ``gpus`` GPUs each; ``on_records`` gets each returned record as it arrives."""
    for name, value in (("ray_actors", actors), ("ray_cpus_per_actor", cpus)):
        if not value or value <= 0:
            raise ConfigError(f"{name} is {value}; expected a positive number")
    if gpus < 0:
        raise ConfigError(f"ray_gpus_per_actor is {gpus}; expected 0 or more")
    rows = [{"group": json.dumps({"jobs": [j.to_dict() for j in jobs], "skip": sorted(skip)})}
            for jobs, skip in pending]
    with ray_session(address) as ray:
        quiet_ray_data(ray)
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows))  # a group per block
        dataset = dataset.map_batches(
            BatchWorker, fn_constructor_kwargs=worker_kwargs, batch_size=1, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus,
            num_gpus=gpus or None, runtime_env={"env_vars": QUIET_ENV})
        for row in dataset.iter_rows():
            on_records([json.loads(row["record"])])


def absolute(path) -> str | None:
    """Actors may start in another directory: hand them absolute paths (hub ids as they are)."""
    if path is None or path == "default":
        return path
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else str(path)
