"""Property-based: mutated safetensors files and index files raise only diffquant's errors."""

import json
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from diffquant.checkpoint import Checkpoint
from diffquant.errors import DiffquantError

_tensors = {"a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
            "a.bias": torch.ones(3, dtype=torch.bfloat16), "b.idx": torch.arange(5)}
_dir = Path(tempfile.mkdtemp())
save_file(_tensors, str(_dir / "good.safetensors"))
GOOD = (_dir / "good.safetensors").read_bytes()

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, len(GOOD) - 1), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, len(GOOD) - 1), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, len(GOOD)), st.integers(0, 255)),
)


def mutate(data: bytes, ops) -> bytes:
    """Apply (kind, position, value) edits: flip a byte, cut the tail, insert a byte."""
    buf = bytearray(data)
    for kind, pos, val in ops:
        pos = min(pos, len(buf))
        if kind == "flip" and pos < len(buf):
            buf[pos] ^= val
        elif kind == "cut":
            del buf[pos:]
        elif kind == "insert":
            buf.insert(pos, val)
    return bytes(buf)


def _read_all(path):
    with Checkpoint.open(path) as ckpt:
        for key in ckpt.keys():
            ckpt.tensor(key)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mutation, min_size=1, max_size=4))
def test_mutated_safetensors_raise_only_diffquant_errors(ops):
    path = _dir / "mutated.safetensors"
    path.write_bytes(mutate(GOOD, ops))
    try:
        _read_all(path)
    except DiffquantError:
        pass


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                           max_leaves=8)


@settings(max_examples=150, deadline=None)
@given(st.one_of(json_values, st.dictionaries(st.sampled_from(["weight_map", "metadata"]), json_values),
                 st.builds(lambda m: {"weight_map": m},
                           st.dictionaries(st.sampled_from(list(_tensors) + ["zz"]),
                                           st.sampled_from(["good.safetensors", "../good.safetensors",
                                                            "/tmp/x", "", "nope.safetensors"]) | st.integers(),
                                           max_size=3))))
def test_mutated_index_raises_only_diffquant_errors(index):
    path = _dir / "model.safetensors.index.json"
    path.write_text(json.dumps(index))
    try:
        _read_all(path)
    except DiffquantError:
        pass
