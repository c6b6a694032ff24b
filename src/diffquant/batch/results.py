"""What a batch keeps under OUT/: the results log (``results.jsonl``, appended as images land,
rewritten whole at the end), the run's identity (``batch.json``), and a lock so two runs never
write one folder.

A job is done when its last record is ``ok`` and its image is in place; images are renamed
into place whole, so a killed run leaves only ``.partial`` files, which never count and are
removed by the next run.

Example:
    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp())
    >>> log = ResultsLog(out)
    >>> log.append([{"id": "00001", "seed": 0, "status": "error", "error": "ValueError: ..."}])
    >>> sorted(log.read())
    ['00001-0']
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from ..errors import ConfigError
from .worker import PARTIAL


def record_key(record: dict) -> str:
    return f"{record['id']}-{record['seed']}"


class ResultsLog:
    """``OUT/results.jsonl``: one JSON record a line; the last record of a key wins."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out / "results.jsonl"

    def read(self) -> dict[str, dict]:
        """{key: its last record}; a torn last line (a killed run) is skipped."""
        if not self.path.is_file():
            return {}
        latest = {}
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                latest[record_key(record)] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
        return latest

    def done(self) -> set[str]:
        """Keys whose last record is ok and whose image (and reference image) is in place."""
        return {key for key, r in self.read().items() if r.get("status") == "ok"
                and (self.out / r.get("path", "")).is_file()
                and ("psnr" not in r or (self.out / "reference" / Path(r["path"]).name).is_file())}

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in records))
            fh.flush()
            os.fsync(fh.fileno())

    def rewrite(self, records: list[dict], parquet: bool = False) -> None:
        """Replace the log by ``records`` (one per job, in prompt order), atomically; with
        ``parquet`` also write ``results.parquet`` (needs pyarrow)."""
        tmp = self.path.with_name(f".results-{os.getpid()}{PARTIAL}.jsonl")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        os.replace(tmp, self.path)
        if parquet:
            write_parquet(records, self.out / "results.parquet")


def write_parquet(records: list[dict], path: Path) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ConfigError(f"{path}: writing parquet needs pyarrow ({err}); pip install pyarrow, "
                          "or drop --parquet (results.jsonl has the same records)") from err
    columns = list(dict.fromkeys(k for r in records for k in r))
    table = pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in records])
    tmp = path.with_name(f".{path.stem}-{os.getpid()}{PARTIAL}.parquet")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def check_identity(out: Path, identity: dict) -> None:
    """``OUT/batch.json`` names the model, quantization, dtype and reference of the images in
    OUT/; a run with other ones is refused (it would mix two batches), the first one writes it."""
    path = out / "batch.json"
    if path.is_file():
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err}); remove it to start the batch "
                              "afresh") from err
        if found != identity:
            diff = ", ".join(f"{k} {found.get(k)!r} (now {identity.get(k)!r})" for k in identity
                             if found.get(k) != identity.get(k))
            raise ConfigError(f"{out}: holds a batch made with {diff} ({path}); give another "
                              "output folder, or the same options to resume it")
        return
    tmp = path.with_name(f".batch-{os.getpid()}{PARTIAL}.json")
    tmp.write_text(json.dumps(identity, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def remove_partials(out: Path) -> None:
    """Temporary files of a killed run (only ever renamed into place whole)."""
    for folder in (out, out / "images", out / "reference"):
        for path in folder.glob(f".*{PARTIAL}*") if folder.is_dir() else ():
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def locked(out: Path):
    """Hold ``OUT/.lock`` for the run: a second run on the same folder is refused."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): one run at a time is then the user's to keep
        yield
        return
    with open(out / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise ConfigError(f"{out}: another diffquant batch is writing it ({out / '.lock'}); "
                              "wait for it, or give another output folder") from err
        yield
