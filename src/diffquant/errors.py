"""diffquant's error classes.

Every error that bad input can cause is one of these, so a caller can catch
``DiffquantError`` and a script can rely on ``ValueError``/``OSError`` as before.
Messages name the file, key or field, what was expected and what to do.
"""


class DiffquantError(Exception):
    """Base class of every error diffquant raises on purpose."""


class ConfigError(DiffquantError, ValueError):
    """A configuration (config.json, a quantization config, an argument) is invalid."""


class CheckpointError(DiffquantError, OSError):
    """A file on disk is missing, truncated, corrupt or not what its index says."""


class QuantizationError(DiffquantError, ValueError):
    """A quantization request cannot be honoured (scheme, dtype, device, state)."""


class BackendUnavailableError(DiffquantError, ImportError):
    """A backend's library is not installed or cannot run on this machine."""
