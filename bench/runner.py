"""Run a job dict in a child process (``python -m <module> job.json result.json``), one at a time.

With ``inprocess=True`` (``--smoke``) the same ``run_job`` is called directly: the tables are
built by the same code, in seconds, but memory numbers then mean nothing.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Runner:
    def __init__(self, inprocess: bool, timeout: int, workdir: Path, module: str = "bench.worker",
                 limit_bytes: int | None = None):
        self.inprocess, self.timeout, self.workdir, self.module = inprocess, timeout, workdir, module
        self.limit = limit_bytes  # a child resident past this is killed (the machine's, not ours)
        self.count = 0

    def run(self, job: dict) -> dict:
        if self.inprocess:
            return importlib.import_module(self.module).run_job(job)
        self.count += 1
        job_file, result_file = (self.workdir / f"{self.count}-{k}.json" for k in ("job", "result"))
        job_file.write_text(json.dumps(job))
        # One thread count for torch, OpenMP and MKL alike; no hub access from the bench.
        env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]), MKL_NUM_THREADS=str(job["threads"]),
                   HF_HUB_OFFLINE="1",
                   PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
        with open(self.workdir / f"{self.count}-stderr.txt", "w+") as err:
            proc = subprocess.Popen([sys.executable, "-m", self.module, str(job_file),
                                     str(result_file)], env=env, stdout=subprocess.DEVNULL,
                                    stderr=err, text=True, cwd=ROOT)
            stopped = _watch(proc, self.timeout, self.limit)
            err.seek(0)
            tail = (err.read().strip().splitlines() or ["no output"])[-1]
        if stopped:
            return {"error": stopped}
        if result_file.is_file():
            return json.loads(result_file.read_text())
        return {"error": f"child exited {proc.returncode}: {tail[:160]}"}


def _watch(proc, timeout: float, limit: int | None) -> str | None:
    """Wait for ``proc``; kill it past ``timeout`` s or, every 0.2 s, past ``limit`` resident
    bytes. Returns why it was stopped, or None."""
    start = time.monotonic()
    while proc.poll() is None:
        if time.monotonic() - start > timeout:
            proc.kill()
            proc.wait()
            return f"timed out after {timeout} s"
        if limit is not None and (_resident(proc.pid) or 0) > limit:
            proc.kill()
            proc.wait()
            return f"killed past {limit / 2**30:.1f} GiB resident"
        time.sleep(0.2)
    return None


def _resident(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
