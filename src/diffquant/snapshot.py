"""A load reads one checkpoint: the directory is opened once and every file is opened through
that handle, so a save that swaps a new checkpoint in meanwhile cannot mix two trees.

A save (atomic.py) replaces a checkpoint with one ``renameat2(RENAME_EXCHANGE)``, but a load
opens many files one after another (config.json, shards, each pipeline component's folder):
by path, a load racing a save came back with a new transformer and an old VAE. An open
directory keeps pointing at the tree it opened, and on Linux ``/proc/self/fd/N/<file>`` opens
``<file>`` in that tree, for diffquant's readers and for transformers' alike.

The old tree must also outlive the load: the reader holds a shared ``flock`` on the directory,
and a save deletes a replaced tree only when it can lock every directory in it exclusively;
otherwise it leaves it as ``.<name>.held-*`` for the next save to remove. A reader that got its
lock only after a save deleted the tree (``st_nlink == 0``) opens the path again.

Where there is no ``/proc/self/fd`` (macOS, Windows), loads open paths as before.

Example:
    >>> with pinned("out/pipe") as root:             # doctest: +SKIP
    ...     config = (root / "transformer" / "config.json").read_text()
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

_PROC_FD = Path("/proc/self/fd")
_TRIES = 20


def _lock_shared(fd: int) -> None:
    if fcntl is not None:
        with contextlib.suppress(OSError):  # a file system without locks: pinning alone
            fcntl.flock(fd, fcntl.LOCK_SH)


@contextlib.contextmanager
def pinned(path: str | os.PathLike):
    """Yield a path that opens files in the tree ``path`` named on entry, however it is
    renamed or swapped meanwhile; error messages name ``path``, not the handle."""
    path = Path(path)
    fd = None
    for _ in range(_TRIES if _PROC_FD.is_dir() else 0):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:  # a folder we may enter but not list: opened by path, as before
            break
        _lock_shared(fd)
        if os.fstat(fd).st_nlink != 0:  # 0: a save deleted this tree before we locked it
            break
        os.close(fd)
        fd = None
    if fd is None:
        yield path
        return
    handle = str(_PROC_FD / str(fd))
    try:
        yield Path(handle)
    except BaseException as err:
        restore_paths(err, handle, str(path))
        raise
    finally:
        os.close(fd)  # closing the last descriptor of the file releases the lock


def restore_paths(err: BaseException, handle: str, real: str) -> None:
    """Write ``real`` where ``err``'s message says ``handle`` (the /proc/self/fd path)."""
    if err.args and isinstance(err.args[0], str) and handle in err.args[0]:
        err.args = (err.args[0].replace(handle, real), *err.args[1:])
    for attr in ("filename", "filename2"):
        value = getattr(err, attr, None)
        if isinstance(value, str) and handle in value:
            with contextlib.suppress(AttributeError, TypeError):
                setattr(err, attr, value.replace(handle, real))


def _restore_names(obj, handle: str, real: str) -> None:
    """Loaders record where they loaded from (``config._name_or_path``, a tokenizer's
    ``name_or_path``, a pipeline's): the path the caller gave, never the handle, which means
    nothing once the load is over."""
    def fix(value):
        return real + value[len(handle):] if isinstance(value, str) and \
            value.startswith(handle) else None

    components = getattr(obj, "components", None)
    for item in [obj, *(components.values() if isinstance(components, dict) else ())]:
        if fix(getattr(item, "name_or_path", None)):
            with contextlib.suppress(AttributeError, TypeError):
                item.name_or_path = fix(item.name_or_path)
        config = getattr(item, "config", None)
        fixed = fix(getattr(config, "_name_or_path", None))
        if fixed and isinstance(config, dict) and hasattr(item, "register_to_config"):
            item.register_to_config(_name_or_path=fixed)  # diffquant's frozen config
        elif fixed:
            with contextlib.suppress(AttributeError, TypeError):
                config._name_or_path = fixed


def pinned_load(load):
    """Decorate a ``from_pretrained(cls, name_or_path, ...)``: a local directory is pinned for
    the whole load (see the module docstring); anything else is passed on unchanged."""

    @functools.wraps(load)
    def wrapper(cls, *args, **kwargs):
        by_name = not args and "pretrained_model_name_or_path" in kwargs
        name_or_path = kwargs.pop("pretrained_model_name_or_path") if by_name else \
            (args[0] if args else None)
        args = args[1:] if args else ()
        try:
            local = Path(os.fspath(name_or_path)).expanduser()
            is_dir = local.is_dir()
        except (TypeError, ValueError, OSError):  # not a path (a hub id, a bad type): as before
            is_dir = False
        if not is_dir or not _PROC_FD.is_dir():
            return load(cls, name_or_path, *args, **kwargs)
        with pinned(local) as handle:
            obj = load(cls, handle, *args, **kwargs)
            _restore_names(obj, str(handle), os.fspath(name_or_path))
            return obj

    return wrapper
