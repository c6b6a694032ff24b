"""Ray, where diffquant uses it (``batch``, ``compare`` and ``sensitivity`` with ``--ray``):
the import with a clear error when it is missing, and a session on a cluster.

Ray is optional (``pip install 'diffquant[ray]'``); nothing imports it until ``--ray`` asks.

Example:
    >>> with ray_session(None) as ray:     # a local cluster, or RAY_ADDRESS  # doctest: +SKIP
    ...     print(ray.cluster_resources()["CPU"])
"""

from __future__ import annotations

import contextlib
import logging

from ..errors import BackendUnavailableError

EXTRA = "pip install 'diffquant[ray]'"


def require_ray():
    """The ``ray`` module, with Ray Data; a BackendUnavailableError naming the extra without."""
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data comes with the extra, not with bare `ray`
    except ImportError as err:
        raise BackendUnavailableError(f"--ray needs Ray and Ray Data, which are not installed "
                                      f"({err}); {EXTRA}") from err
    return ray


@contextlib.contextmanager
def ray_session(address: str | None):
    """Ray, connected: to ``address`` ("auto", "ray://head:10001", ...), or with None or ""
    to a local cluster (RAY_ADDRESS or one started with ``ray start`` if there is one, else a
    new one on this machine, shut down on exit). A session already open is used as it is."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    ray.init(address=address or None, include_dashboard=False, logging_level=logging.WARNING,
             configure_logging=True)
    try:
        yield ray
    finally:
        ray.shutdown()


def quiet_ray_data(ray) -> None:
    """Ray Data's own progress bars and execution logs off: the batch has one bar over the
    prompts."""
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    if hasattr(context, "print_on_execution_start"):
        context.print_on_execution_start = False
