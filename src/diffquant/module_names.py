"""Modules selected by name: exact names, prefixes and glob patterns, as
``modules_to_not_convert`` and ``_keep_in_fp32_modules`` give them (never by shapes). A leaf
module: the quantizers (quantizers/base.py) and the models (modeling.py) both use it.

Example:
    >>> matches_any("blocks.0.attn.to_q", ["blocks.0"]), matches_any("proj_out", ["*.to_q"])
    (True, False)
"""

import fnmatch


def matches_any(name: str, patterns) -> bool:
    """True if module ``name`` equals, is inside, or glob-matches one of ``patterns``."""
    for p in patterns or ():
        if name == p or name.startswith(p + ".") or fnmatch.fnmatchcase(name, p) \
                or (("." + p + ".") in ("." + name + ".")):
            return True
    return False
