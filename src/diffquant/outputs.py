"""Output containers: dataclasses that also index like tuples, as diffusers' BaseOutput does."""

from collections import OrderedDict
from dataclasses import fields


class BaseOutput(OrderedDict):
    """An ordered dict whose non-None fields are also attributes and tuple positions.

    Subclasses are ``@dataclass``es; ``out[0]``, ``out.sample`` and ``out["sample"]`` all work,
    and ``out.to_tuple()`` drops fields that are None, like diffusers.
    """

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                self[f.name] = value

    def __getitem__(self, key):
        if isinstance(key, str):
            return dict(self.items())[key]
        return self.to_tuple()[key]

    def __setattr__(self, name, value):
        if name in self.keys() and value is not None:
            super().__setitem__(name, value)
        super().__setattr__(name, value)

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        super().__setattr__(key, value)

    def to_tuple(self):
        return tuple(self[k] for k in self.keys())
