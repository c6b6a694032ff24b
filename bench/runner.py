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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Runner:
    def __init__(self, inprocess: bool, timeout: int, workdir: Path, module: str = "bench.worker"):
        self.inprocess, self.timeout, self.workdir, self.module = inprocess, timeout, workdir, module
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
        try:
            proc = subprocess.run([sys.executable, "-m", self.module, str(job_file), str(result_file)],
                                  env=env, capture_output=True, text=True, timeout=self.timeout, cwd=ROOT)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {self.timeout} s"}
        if result_file.is_file():
            return json.loads(result_file.read_text())
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"child exited {proc.returncode}: {tail[:160]}"}
