"""Fault injection for tests/test_fault_*.py: child processes under resource limits (memory,
open files), children paused at a chosen line (a deterministic interleaving: no sleeps), small
file systems that fill up, read-only trees, and a tiny pipeline that saves in milliseconds.
"""

import contextlib
import hashlib
import multiprocessing
import os
import resource
import subprocess
import traceback
from pathlib import Path

import torch


def _context():
    """Children fork from a server that imported torch and diffquant once: a child starts in
    milliseconds, in a clean single-threaded process (not a fork of pytest and its threads)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "diffquant", "diffquant.pipeline", "tests.toy"])
    return ctx


_conn = None  # the child's end of its pipe to the test


def pause(tag: str) -> None:
    """In a child: stop here until the test calls ``resume()``."""
    _conn.send(("PAUSED", tag))
    _conn.recv()


def _child_main(conn, fn, args, limits):
    global _conn
    _conn = conn
    for which, value in (limits or {}).items():
        resource.setrlimit(which, (value, resource.getrlimit(which)[1]))
    try:
        conn.send(("DONE", fn(*args)))
    except BaseException as err:  # noqa: BLE001 - reported to the test, which asserts on it
        conn.send(("ERROR", f"{type(err).__name__}: {err}", traceback.format_exc()))


class Child:
    """``fn(*args)`` in a child process (a module-level ``fn``); ``pause(tag)`` in it stops it
    until ``resume()``, so the test decides what another process does in between. ``limits``
    ({resource.RLIMIT_AS: bytes, ...}) apply to the child alone."""

    def __init__(self, fn, *args, limits: dict | None = None):
        self.conn, child_conn = multiprocessing.Pipe()
        self.proc = _context().Process(target=_child_main, args=(child_conn, fn, args, limits))
        self.proc.start()

    def _recv(self, timeout: float):
        if not self.conn.poll(timeout):
            self.proc.kill()
            raise AssertionError(f"child gave no answer in {timeout} s")
        return self.conn.recv()

    def wait_paused(self, tag: str, timeout: float = 120) -> None:
        msg = self._recv(timeout)
        if msg != ("PAUSED", tag):
            self.proc.kill()
            raise AssertionError(f"child did not pause at {tag}: {msg}")

    def resume(self) -> None:
        self.conn.send("go")

    def result(self, timeout: float = 120):
        """What ``fn`` returned; an AssertionError carrying the child's traceback if it raised."""
        msg = self._recv(timeout)
        self.proc.join(timeout)
        if msg[0] != "DONE":
            raise AssertionError(f"child raised {msg[1]}\n{msg[2]}")
        return msg[1]

    def error(self, timeout: float = 120) -> str:
        """``"Type: message"`` of what ``fn`` raised (an AssertionError if it returned)."""
        msg = self._recv(timeout)
        self.proc.join(timeout)
        if msg[0] != "ERROR":
            raise AssertionError(f"child returned {msg[1]!r} instead of raising")
        return msg[1]


def fingerprint(module: torch.nn.Module) -> str:
    """A hash of every tensor of ``module`` (names, dtypes, bytes)."""
    h = hashlib.sha1()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def can_mount() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A tmpfs of ``size`` mounted at ``path`` (the tests run as root); unmounted after."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def make_read_only(path: Path) -> None:
    """Make the tmpfs at ``path`` read-only (root) or, without root, its folders 0o555."""
    if can_mount():
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
    else:
        for folder, _, _ in os.walk(path):
            os.chmod(folder, 0o555)


def tiny_pipeline(seed: int):
    """A FluxPipeline of diffquant's own tiny transformer, VAE and scheduler (no text encoders:
    model_index.json lists them as [null, null]), saved and loaded in well under a second."""
    from diffquant import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from diffquant.schedulers import FlowMatchEulerDiscreteScheduler
    from tests.tiny_pipeline import SCHEDULER_CONFIG, TRANSFORMER_CONFIG, VAE_CONFIG

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**VAE_CONFIG)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=vae,
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                        transformer=transformer)


def siblings(path: Path) -> list[str]:
    """Names beside ``path`` (leftovers of saves show up here)."""
    return sorted(p.name for p in path.parent.iterdir())


def limit_memory(headroom: int) -> None:
    """In a child: let its address space grow by at most ``headroom`` bytes from here."""
    pages = int(open("/proc/self/statm").read().split()[0])
    used = pages * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (used + headroom, resource.getrlimit(resource.RLIMIT_AS)[1]))
