"""Property-based: every config class round-trips; mutated GGUF files raise only diffquant errors."""

import json
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import diffquant.quantizers as q
from diffquant.errors import ConfigError, DiffquantError, QuantizationError
from diffquant.gguf_file import GGUFFile, write_gguf
from diffquant.ops.formats.gguf import GGMLType, quantize
from tests.test_fuzz_checkpoint import mutate

CONFIG_CLASSES = sorted(set(q.AUTO_QUANTIZATION_CONFIG_MAPPING.values()), key=lambda c: c.__name__)
module_lists = st.none() | st.lists(st.sampled_from(["proj_out", "blocks.0", "x_embedder", "*norm*",
                                                     "transformer_blocks.*.ff"]), max_size=3)


@st.composite
def configs(draw, cls):
    """A config of ``cls``: one of its CPU examples with its generic fields varied."""
    base = draw(st.sampled_from(cls.cpu_examples())).to_dict()
    for key, value in list(base.items()):
        if key.startswith("_"):
            continue
        if isinstance(value, bool):
            base[key] = draw(st.booleans())
        elif key in ("modules_to_not_convert", "llm_int8_skip_modules"):
            base[key] = draw(module_lists)
        elif key == "llm_int8_threshold":
            base[key] = draw(st.floats(0.5, 20, allow_nan=False))
    return base


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_every_config_class_round_trips(data):
    cls = data.draw(st.sampled_from(CONFIG_CLASSES))
    d = data.draw(configs(cls))
    try:
        config = q.DiffusersAutoQuantizer.from_dict(d)
    except (ConfigError, QuantizationError):
        return  # a varied combination may be invalid; it must then fail with a clear error
    assert type(config) is cls
    again = q.DiffusersAutoQuantizer.from_dict(json.loads(config.to_json_string()))
    assert again == config and again.to_dict() == config.to_dict()
    assert repr(again).startswith(cls.__name__ + "(")


_dir = Path(tempfile.mkdtemp())
_w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
write_gguf(_dir / "good.gguf", {"a.weight": (quantize(_w, GGMLType.Q8_0), GGMLType.Q8_0),
                                "b.weight": (quantize(_w, GGMLType.Q4_0), GGMLType.Q4_0),
                                "c.bias": (quantize(_w[0], GGMLType.F32), GGMLType.F32)})
GOOD = (_dir / "good.gguf").read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert"]), st.integers(0, len(GOOD)),
                          st.integers(1, 255)), min_size=1, max_size=4))
def test_mutated_gguf_raises_only_diffquant_errors(ops):
    path = _dir / "mutated.gguf"
    path.write_bytes(mutate(GOOD, ops))
    try:
        with GGUFFile(path) as f:
            for name in list(f.tensors):
                f.read_dequantized(name)
    except DiffquantError:
        pass
