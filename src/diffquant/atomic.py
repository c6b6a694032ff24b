"""Atomic directory saves: write beside the target, then swap it into place.

A save writes into ``.<name>.tmp-<pid>-<rand>`` next to the target. On success the new
directory replaces the old one with a single ``renameat2(RENAME_EXCHANGE)`` on Linux, so the
target path always holds either the whole old checkpoint or the whole new one, even if the
process is killed at any instant. Elsewhere two renames are used (a tiny window remains).
Leftovers of killed saves are removed at the start of the next save of the same target.

Example:
    >>> with atomic_directory("out/model") as tmp:       # doctest: +SKIP
    ...     (tmp / "config.json").write_text("{}")
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import uuid
from pathlib import Path

from .errors import CheckpointError

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
# Files in an old checkpoint that a new save replaces, never carries over.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json", ".gguf")


def _libc_renameat2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


_renameat2 = _libc_renameat2()


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False where the OS cannot."""
    if _renameat2 is None:
        return False
    rc = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise CheckpointError(f"{b}: could not swap in the new checkpoint ({os.strerror(err)})")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(target: Path) -> None:
    """Remove temporary siblings of ``target`` left by saves whose process has died."""
    prefix_tmp, prefix_old = f".{target.name}.tmp-", f".{target.name}.old-"
    if not target.parent.is_dir():
        return
    for entry in target.parent.iterdir():
        for prefix in (prefix_tmp, prefix_old):
            if entry.name.startswith(prefix):
                pid = entry.name[len(prefix):].split("-", 1)[0]
                if pid.isdigit() and not _pid_alive(int(pid)):
                    shutil.rmtree(entry, ignore_errors=True)


def _carry_over(old: Path, new: Path) -> None:
    """Keep files of the old directory that the new save does not write (a README, say)."""
    for entry in old.iterdir():
        if (new / entry.name).exists() or entry.name.endswith(_WEIGHT_SUFFIXES):
            continue
        if entry.is_dir():
            shutil.copytree(entry, new / entry.name)
        else:
            shutil.copy2(entry, new / entry.name)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike):
    """Yield a fresh temporary directory; on success it becomes ``target`` in one step."""
    target = Path(target).absolute()
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target}: exists and is not a directory; cannot save a checkpoint there")
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = target.parent / f".{target.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            _carry_over(target, tmp)
        _fsync_dir(tmp)
        _commit(tmp, target, tag)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _commit(tmp: Path, target: Path, tag: str) -> None:
    if not target.exists():
        os.rename(tmp, target)
    elif _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old checkpoint
    else:
        old = target.parent / f".{target.name}.old-{tag}"
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(target.parent)
