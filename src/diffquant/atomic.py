"""Atomic directory saves: write beside the target, then swap it into place.

A save writes into ``.<name>.tmp-<pid>-<rand>`` next to the target. On success the new
directory replaces the old one with a single ``renameat2(RENAME_EXCHANGE)`` on Linux, so the
target path always holds either the whole old checkpoint or the whole new one, even if the
process is killed at any instant. Elsewhere two renames are used (a tiny window remains).

The rules a save keeps (docs/guarantees.md names the tests):

- a target path that is a symbolic link is followed: the checkpoint is saved where it points
  and the link stays a link (diffusers writes through it too);
- files of the old checkpoint that the new save does not write (a README) are carried over;
  a save never reads outside the model it saves and never copies what a link points to into
  a checkpoint: links that stay inside it are recreated as links, links out of it (and FIFOs,
  sockets, devices) are left out with a warning;
- two saves racing to one new path end with one complete checkpoint, from one of them;
- temporary names fit the file system's NAME_MAX (a long name is shortened plus a hash);
- the replaced tree is deleted unless a load still reads it (snapshot.py's shared lock): then
  it stays as ``.<name>.held-*`` until a later save of that target finds it free;
- an OS error while saving (a full disk, a read-only file system) is a CheckpointError naming
  the target and the cause; the earlier checkpoint is left as it was.

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
import hashlib
import logging
import os
import re
import shutil
import uuid
from pathlib import Path

from .errors import CheckpointError, DiffquantError
from .snapshot import fcntl, pinned

logger = logging.getLogger(__name__)

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
# Files in an old checkpoint that a new save replaces, never carries over.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json", ".gguf")
# ".<stem>.<kind>-<pid>-<8 hex>": what a temporary name adds to the stem, at most
_TEMP_OVERHEAD = len("..held-") + 7 + 1 + 8


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


def temp_stem(target: Path) -> str:
    """The part of ``target``'s name its temporary siblings carry: the name itself, or, where
    ``.<name>.tmp-<pid>-<rand>`` would pass the file system's NAME_MAX, a prefix of it plus a
    hash of the whole (a 240-character folder name is legal; 262 characters are not)."""
    try:
        limit = os.pathconf(target.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    raw = os.fsencode(target.name)
    if len(raw) + _TEMP_OVERHEAD <= limit:
        return target.name
    digest = hashlib.sha1(raw).hexdigest()[:8]
    keep = raw[: max(limit - _TEMP_OVERHEAD - 9, 1)].decode("utf-8", "ignore")
    return f"{keep}~{digest}"


def _remove(path: Path) -> None:
    """Delete a file, a link (never what it points to) or a tree; quietly if already gone."""
    with contextlib.suppress(FileNotFoundError):
        if path.is_symlink() or not path.is_dir():
            path.unlink()
        else:
            shutil.rmtree(path, ignore_errors=True)


def clean_leftovers(target: Path) -> None:
    """Remove temporary siblings of ``target`` left by saves whose process has died, and
    replaced trees that no load reads any more."""
    stem = temp_stem(target)
    if not target.parent.is_dir():
        return
    for entry in target.parent.iterdir():
        for kind in ("tmp", "old", "held"):
            prefix = f".{stem}.{kind}-"
            if not entry.name.startswith(prefix):
                continue
            pid = entry.name[len(prefix):].split("-", 1)[0]
            if kind == "held":
                _delete_unless_read(entry)
            elif pid.isdigit() and not _pid_alive(int(pid)):
                _remove(entry)


def _delete_unless_read(tree: Path) -> bool:
    """Delete ``tree`` if no load holds a lock on one of its directories; True if deleted."""
    if fcntl is None or tree.is_symlink() or not tree.is_dir():
        _remove(tree)
        return True
    fds = []
    try:
        for folder, dirs, _ in os.walk(tree):
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # a load reads it: it stays
            except OSError:
                pass  # no locks on this file system
        shutil.rmtree(tree, ignore_errors=True)
        return True
    except OSError:
        return False
    finally:
        for fd in fds:
            os.close(fd)


def _dispose(tree: Path, target: Path, tag: str) -> None:
    """The replaced checkpoint: deleted, or kept aside while a load still reads it."""
    if not _delete_unless_read(tree):
        with contextlib.suppress(OSError):
            os.rename(tree, target.parent / f".{temp_stem(target)}.held-{tag}")
            logger.info("%s: the replaced checkpoint is still being read; it is removed by a "
                        "later save", target)


def _carry_over(old: Path, new: Path) -> None:
    """Keep files of the old directory that the new save does not write (a README, say):
    regular files are copied, links into the checkpoint recreated as links; links out of it
    and other kinds (FIFOs, sockets) are left out, with a warning."""
    root = os.path.realpath(old)
    for entry in os.scandir(old):
        dest = new / entry.name
        if os.path.lexists(dest) or entry.name.endswith(_WEIGHT_SUFFIXES):
            continue
        _copy_entry(entry, dest, root)


def _copy_entry(entry: os.DirEntry, dest: Path, root: str) -> None:
    if entry.is_symlink():
        # never read through it; keep it only if it stays inside the checkpoint, so a
        # push_to_hub of the folder cannot upload what it points to
        if os.path.commonpath([root, os.path.realpath(entry.path)]) == root:
            os.symlink(os.readlink(entry.path), dest)
        else:
            logger.warning("%s: a link to %s, outside the checkpoint; not carried into the new "
                           "one", dest.name, os.readlink(entry.path))
    elif entry.is_dir(follow_symlinks=False):
        dest.mkdir()
        for child in os.scandir(entry.path):
            _copy_entry(child, dest / child.name, root)
    elif entry.is_file(follow_symlinks=False):
        # O_NOFOLLOW: the entry cannot have become a link since it was listed
        fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with open(fd, "rb") as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out)
        shutil.copystat(entry.path, dest, follow_symlinks=False)
    else:
        logger.warning("%s: not a regular file, folder or link; not carried into the new "
                       "checkpoint", entry.path)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _resolve_target(target: str | os.PathLike) -> Path:
    """The directory a save replaces: a link at ``target`` is followed (a loop is refused)."""
    path = Path(os.path.abspath(target))  # "out/.." is "." , not a folder named ".."
    if not path.name:
        raise CheckpointError(f"{path}: a checkpoint cannot replace the root of a file system")
    if path.is_symlink():
        real = Path(os.path.realpath(path))
        if real.is_symlink():
            raise CheckpointError(f"{path}: is a symbolic link that never reaches a directory "
                                  "(a loop); save to a real path")
        path = real
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path}: exists and is not a directory; cannot save a checkpoint there")
    return path


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike):
    """Yield a fresh temporary directory; on success it becomes ``target`` in one step."""
    target = _resolve_target(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(target)
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = target.parent / f".{temp_stem(target)}.tmp-{tag}"
        tmp.mkdir()
    except OSError as err:
        raise _save_error(target, err) from err
    try:
        yield tmp
        if target.is_dir():
            with pinned(target) as old:  # a racing save cannot delete it while it is copied
                _carry_over(old, tmp)
        _fsync_dir(tmp)
        _commit(tmp, target, tag)
    except DiffquantError:
        raise
    except Exception as err:  # noqa: BLE001 - an OS error, or one in a library's words
        os_error = as_os_error(err)
        if os_error is None:
            raise
        raise _save_error(target, os_error, tmp) from err
    finally:
        _remove(tmp)


def as_os_error(err: BaseException) -> OSError | None:
    """``err`` as an OSError: itself, or the one safetensors reports as "... (os error 28)"
    (its SafetensorError, raised by transformers' saves too, is not an OSError)."""
    if isinstance(err, OSError):
        return err
    code = re.search(r"\(os error (\d+)\)", str(err))
    return OSError(int(code[1]), os.strerror(int(code[1]))) if code else None


def _save_error(target: Path, err: OSError, tmp: Path | None = None) -> CheckpointError:
    """A CheckpointError naming the target, the cause and the file (as it will be named)."""
    where = os.fspath(err.filename) if err.filename else ""
    if tmp is not None and where.startswith(str(tmp)):
        where = where[len(str(tmp)):].lstrip(os.sep) or target.name
    cause = (err.strerror or str(err)) + (f", writing {where}" if where else "")
    out = CheckpointError(f"{target}: could not save the checkpoint ({cause}); what was at that "
                          "path before is unchanged")
    out.errno = err.errno
    return out


def _commit(tmp: Path, target: Path, tag: str) -> None:
    if not target.exists():
        try:
            os.rename(tmp, target)
            _fsync_dir(target.parent)
            return
        except OSError as err:  # another save created it meanwhile: swap with that one
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not target.is_dir():
                raise
    if _exchange(tmp, target):
        _dispose(tmp, target, tag)  # tmp now holds the old checkpoint
    else:
        old = target.parent / f".{temp_stem(target)}.old-{tag}"
        os.rename(target, old)
        os.rename(tmp, target)
        _dispose(old, target, tag)
    _fsync_dir(target.parent)
