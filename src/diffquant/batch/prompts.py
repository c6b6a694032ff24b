"""The prompts of a batch: read from a .jsonl or .txt file (or given as a list), one ``Job``
per prompt and seed, grouped into pipeline calls.

A .jsonl line is an object with ``prompt`` and optionally ``id``, ``seed``, ``height``,
``width``, ``steps``, ``guidance``, ``negative_prompt`` and ``true_cfg_scale``; a .txt line is a
prompt (blank lines and lines starting with ``#`` are skipped). A prompt's id is its ``id`` or
its line number (``00007``); its image is ``images/<id>-<seed>.png``.

Example:
    >>> jobs = read_prompts(["a red circle", {"prompt": "a blue square", "seed": 3}])
    >>> [(j.id, j.seed, j.prompt) for j in jobs]
    [('00001', 0, 'a red circle'), ('00002', 3, 'a blue square')]
    >>> [[j.id for j in g] for g in make_groups(jobs, batch_size=2)]
    [['00001', '00002']]
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

from ..errors import ConfigError

# line key -> (Job field, type); bool is refused where int is expected (json's true is not 1)
FIELDS = {"id": ("id", str), "prompt": ("prompt", str), "seed": ("seed", int),
          "height": ("height", int), "width": ("width", int), "steps": ("steps", int),
          "guidance": ("guidance", float), "negative_prompt": ("negative_prompt", str),
          "true_cfg_scale": ("true_cfg_scale", float)}
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


@dataclasses.dataclass(frozen=True)
class Job:
    """One image to make: a prompt, its seed and the settings of its pipeline call."""

    id: str
    prompt: str
    seed: int = 0
    height: int | None = None
    width: int | None = None
    steps: int = 4
    guidance: float | None = None
    negative_prompt: str | None = None
    true_cfg_scale: float | None = None
    line: int = 0  # where it came from, for messages

    @property
    def key(self) -> str:
        """``<id>-<seed>``: the name of its image, the same on every machine and retry."""
        return f"{self.id}-{self.seed}"

    def call_key(self) -> tuple:
        """Jobs with equal call keys can share one pipeline call."""
        return (self.height, self.width, self.steps, self.guidance, self.negative_prompt,
                self.true_cfg_scale)

    def problem(self) -> str | None:
        """Why no pipeline can run this job (a size or step count below 1), else None."""
        for name in ("height", "width", "steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                return f"{name} is {value}; expected a positive integer"
        return None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Job":
        return cls(**data)


def _value(where: str, key: str, value, kind):
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(f"{where}: {key!r} is {value!r}; expected {kind.__name__}")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{where}: {key!r} is {value!r}; expected a finite number")
    return value


def _job(where: str, line: int, data, defaults: dict) -> Job:
    if isinstance(data, str):
        data = {"prompt": data}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a JSON object with 'prompt', got "
                          f"{type(data).__name__}")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; a line "
                          f"takes {', '.join(FIELDS)}")
    if "prompt" not in data:
        raise ConfigError(f"{where}: no 'prompt'; every line needs one")
    fields = dict(defaults, line=line, id=f"{line:05d}")
    for key, value in data.items():
        name, kind = FIELDS[key]
        if key == "id" and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # {"id": 7}
        if value is not None or key in ("prompt", "id", "seed"):
            fields[name] = _value(where, key, value, kind)
    if not _ID.fullmatch(fields["id"]):
        raise ConfigError(f"{where}: id {fields['id']!r} cannot name a file; use letters, digits, "
                          "'_', '.' and '-' (at most 100, not starting with '.' or '-')")
    return Job(**fields)


def _lines(path: Path) -> list[tuple[int, object]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the prompts ({err}); give a UTF-8 .jsonl or "
                          ".txt file") from err
    rows = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or (path.suffix == ".txt" and line.startswith("#")):
            continue
        if path.suffix == ".txt":
            rows.append((n, raw.strip()))
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{n}: not valid JSON ({err.msg}); each line of a .jsonl "
                              'file is one object such as {"prompt": "a cat", "seed": 1}') from err
    return rows


def read_prompts(source, seed: int = 0, steps: int = 4, height: int | None = None,
                 width: int | None = None, guidance: float | None = None,
                 negative_prompt: str | None = None) -> list[Job]:
    """The jobs of ``source``: a .jsonl or .txt path, or a list of prompts (str or dict as a
    .jsonl line). The keyword arguments are the defaults a line may override."""
    defaults = dict(seed=seed, steps=steps, height=height, width=width, guidance=guidance,
                    negative_prompt=negative_prompt)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.suffix not in (".jsonl", ".txt"):
            raise ConfigError(f"{path}: a prompts file is .jsonl (one JSON object a line) or .txt "
                              "(one prompt a line)")
        if not path.is_file():
            raise ConfigError(f"{path}: no such prompts file")
        rows, name = _lines(path), str(path)
    else:
        rows, name = list(enumerate(source, 1)), "prompts"
    jobs = [_job(f"{name}:{n}", n, data, defaults) for n, data in rows]
    if not jobs:
        raise ConfigError(f"{name}: no prompts; give at least one")
    seen = {}
    for job in jobs:
        if job.key in seen:
            raise ConfigError(f"{name}:{job.line}: id {job.id!r} with seed {job.seed} repeats line "
                              f"{seen[job.key]}; both would write images/{job.key}.png")
        seen[job.key] = job.line
    return jobs


def make_groups(jobs: list[Job], batch_size: int) -> list[list[Job]]:
    """Jobs that share their call settings, in file order, ``batch_size`` to a pipeline call.

    The groups depend on the whole prompt list only, never on what is done or on which
    machine runs them: a batch's pixels can depend on its other rows (kernels chosen by row
    count), so the same group in the same call makes the same images everywhere."""
    if batch_size < 1:
        raise ConfigError(f"batch_size is {batch_size}; expected at least 1")
    by_key: dict[tuple, list[Job]] = {}
    for job in jobs:
        by_key.setdefault(job.call_key(), []).append(job)
    return [same[i:i + batch_size] for same in by_key.values()
            for i in range(0, len(same), batch_size)]
