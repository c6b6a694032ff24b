"""AutoModel: diffusers' loader that picks the model class from the folder's config.json.

diffusers' quantization pages load components as ``AutoModel.from_pretrained(model_id,
subfolder="transformer", quantization_config=...)``; this is the same call, dispatching on the
config's ``_class_name`` to diffquant's model class of that name, which does the loading; a
class diffquant does not implement is diffusers' own, loaded by diffquant (``diffusers_class``).

Example:
    >>> from diffquant import AutoModel, TorchAoConfig                          # doctest: +SKIP
    >>> t = AutoModel.from_pretrained("pipe_dir", subfolder="transformer",      # doctest: +SKIP
    ...                               quantization_config=TorchAoConfig("int8wo"))
"""

from __future__ import annotations

from .configuration import read_json
from .errors import ConfigError
from .hub import resolve_dir, split_hub_kwargs
from .pipeline_components import DIFFUSERS_CLASSES, import_class


class AutoModel:
    """Not instantiated: ``AutoModel.from_pretrained`` returns the named model class's model."""

    def __init__(self, *args, **kwargs):
        raise TypeError("AutoModel is not instantiated; call AutoModel.from_pretrained(...)")

    @classmethod
    def from_pretrained(cls, pretrained_model_or_path, subfolder: str | None = None, **kwargs):
        """The model in ``pretrained_model_or_path[/subfolder]``, of the class its config.json
        names; every other argument goes to that class's ``from_pretrained``."""
        hub = split_hub_kwargs(dict(kwargs))          # a copy: the class's load takes them too
        directory = resolve_dir(pretrained_model_or_path, subfolder=subfolder, **hub)
        path = directory / "config.json"
        name = read_json(path, what="model config").get("_class_name")
        if not isinstance(name, str):
            raise ConfigError(f"{path}: key '_class_name' should name the model class, got {name!r}")
        if name in DIFFUSERS_CLASSES and not name.endswith("Scheduler"):
            model_cls = import_class(name, DIFFUSERS_CLASSES)
        else:  # any other family: diffusers' class, loaded by diffquant (diffusers_bridge.py)
            from .diffusers_bridge import diffusers_class

            model_cls = diffusers_class(name, where=str(path))
        return model_cls.from_pretrained(pretrained_model_or_path, subfolder=subfolder, **kwargs)
