"""The NVIDIA ModelOpt backend: config parity with diffusers, quantize-on-load, save/reload, and
bit-exactness against modelopt's own mtq.quantize + mtq.compress.

diffusers 0.42.1 + modelopt 0.47 on CPU, as oracles, have three limits (checked below or noted):
- NVIDIAModelOptConfig(...) without modelopt_config raises TypeError: diffusers spreads
  modelopt's _default_disabled_quantizer_cfg into a dict, and 0.47 made it a list. We build
  diffusers' config under a shim that restores the flat dict form (``_diffusers_config``).
- with block sizes (INT4/NF4/NVFP4) diffusers' from_pretrained fails in
  json.dumps(sort_keys=True) on {-1: 16, "type": "dynamic"} (int and str keys); those schemes are
  compared with modelopt's mtq.compress directly, the library diffusers drives.
- diffusers compresses per layer (mtq.compress(module)), which skips the root module, so its
  weights stay full precision and its forward passes a QTensor to F.linear (TypeError on CPU).
  We compare the weights it calibrates and saves, not its forward.
"""

import contextlib
import copy
import json
import warnings

import pytest
import torch
from torch import nn

from diffquant import NVIDIAModelOptConfig
from diffquant.configuration import ConfigMixin, register_to_config
from diffquant.errors import ConfigError, QuantizationError
from diffquant.modeling import ModelMixin
from diffquant.ops.formats import modelopt as mm
from diffquant.quantizers.modelopt import ModelOptLinear

warnings.filterwarnings("ignore", module="modelopt")
mtq = pytest.importorskip("modelopt.torch.quantization")

# max |y - y_ref| / max |y_ref| on the toy model, per scheme (measured: .035 .009 .067 .088 .103)
TOLERANCE = {"FP8": 0.06, "INT8": 0.02, "INT4": 0.12, "NF4": 0.15, "NVFP4": 0.18}
EXAMPLES = {c.quant_type: c for c in NVIDIAModelOptConfig.cpu_examples()}


class Toy(ModelMixin, ConfigMixin):
    """A few nn.Linear; ``proj_out`` is excluded by modelopt's default '*proj_out.*' pattern."""

    @register_to_config
    def __init__(self, width: int = 64, hidden: int = 128):
        super().__init__()
        self.proj_in = nn.Linear(width, hidden)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(2))
        self.proj_out = nn.Linear(hidden, width, bias=False)

    def forward(self, x):
        h = self.proj_in(x)
        for block in self.blocks:
            h = h + torch.nn.functional.gelu(block(h))
        return self.proj_out(h)


def _x():
    return torch.randn(4, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("modelopt") / "base"
    torch.manual_seed(0)
    Toy().to(torch.bfloat16).save_pretrained(path)
    return path


def _bits(t):
    return t.view(torch.uint8) if t.element_size() == 1 and t.is_floating_point() else t


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and torch.equal(_bits(sa[k]), _bits(sb[k])) for k in sa)


def _rel_err(y, ref):
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@contextlib.contextmanager
def _diffusers_config_shim():
    """Give diffusers the flat-dict default exclusions it was written for (see module doc)."""
    from diffquant.quantizers.modelopt import _default_disabled_cfg

    old = mtq.config._default_disabled_quantizer_cfg
    mtq.config._default_disabled_quantizer_cfg = _default_disabled_cfg()
    try:
        yield
    finally:
        mtq.config._default_disabled_quantizer_cfg = old


def _diffusers_config(**kwargs):
    from diffusers import NVIDIAModelOptConfig as DConfig

    with _diffusers_config_shim():
        return DConfig(**kwargs)


# -- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", sorted(EXAMPLES))
def test_config_round_trip_and_diffusers_parity(scheme):
    cfg = EXAMPLES[scheme]
    text = json.dumps(cfg.to_dict(), sort_keys=True)
    assert NVIDIAModelOptConfig.from_dict(json.loads(text)) == cfg
    kwargs = {k: v for k, v in cfg.to_dict().items()
              if k in ("quant_type", "channel_quantize", "block_quantize",
                       "scale_channel_quantize", "scale_block_quantize")}
    theirs = _diffusers_config(**kwargs)
    # same keys, and the same modelopt_config once JSON-ready (diffusers keeps int keys/tuples)
    ours = cfg.to_dict()
    assert set(ours) == set(theirs.to_dict())
    from diffquant.quantizers.modelopt import _canonical, _jsonable
    assert _jsonable(_canonical(theirs.modelopt_config)) == ours["modelopt_config"]
    # dicts move both ways: diffusers reads ours, we read diffusers'
    assert NVIDIAModelOptConfig.from_dict(theirs.to_dict()) == cfg
    from diffusers import NVIDIAModelOptConfig as DConfig
    assert DConfig.from_dict(json.loads(text)).quant_type == scheme


def test_config_equality_over_fields_and_errors():
    assert NVIDIAModelOptConfig("INT8") != NVIDIAModelOptConfig("INT8", channel_quantize=0)
    with pytest.raises(ConfigError, match=r"unknown field\(s\) 'bogus'"):
        NVIDIAModelOptConfig.from_dict({"quant_method": "modelopt", "quant_type": "FP8", "bogus": 1})
    with pytest.raises(ConfigError, match=r"quant_type='FP16': expected one of"):
        NVIDIAModelOptConfig("FP16")
    with pytest.raises(ConfigError, match=r"block_quantize='16': expected an int"):
        NVIDIAModelOptConfig("INT4", channel_quantize=-1, block_quantize="16")
    with pytest.raises(ConfigError, match="scale_block_quantize needs channel_quantize"):
        NVIDIAModelOptConfig("NF4", scale_channel_quantize=-1, scale_block_quantize=4)


# -- quantize on load, save, reload ------------------------------------------------------------
@pytest.mark.parametrize("scheme", sorted(EXAMPLES))
def test_quantize_forward_save_reload(base, tmp_path, scheme):
    ref = Toy.from_pretrained(base, torch_dtype=torch.bfloat16)
    q = Toy.from_pretrained(base, quantization_config=EXAMPLES[scheme], torch_dtype=torch.bfloat16)
    assert isinstance(q.blocks[0], ModelOptLinear) and q.blocks[0].scheme == scheme
    assert type(q.proj_out) is nn.Linear  # modelopt's default '*proj_out.*' exclusion
    x = _x()
    y = q(x)
    assert _rel_err(y, ref(x)) < TOLERANCE[scheme]
    assert q.get_memory_footprint() < 0.75 * ref.get_memory_footprint()

    q.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "modelopt" and saved["calib_cfg"] == {"method": "max"}
    again = Toy.from_pretrained(tmp_path / "q", torch_dtype=torch.bfloat16)  # detected, no config
    assert again.hf_quantizer.pre_quantized and again.config.quantization_config == q.config.quantization_config
    assert type(again.proj_out) is nn.Linear  # regression: sorted config.json keys kept it excluded
    assert _same_state(q, again) and torch.equal(again(x), y)

    dense = again.dequantize()
    assert type(dense.blocks[0]) is nn.Linear and dense.hf_quantizer is None
    assert torch.allclose(dense(x).float(), y.float(), atol=2e-2, rtol=2e-2)


def test_modules_to_not_convert(base):
    cfg = NVIDIAModelOptConfig("FP8", modules_to_not_convert=["blocks.0"])
    q = Toy.from_pretrained(base, quantization_config=cfg, torch_dtype=torch.bfloat16)
    assert type(q.blocks[0]) is nn.Linear and q.blocks[0].weight.dtype == torch.bfloat16
    assert isinstance(q.blocks[1], ModelOptLinear) and isinstance(q.proj_in, ModelOptLinear)


def test_unsupported_schemes_fail_loudly(base):
    with pytest.raises(QuantizationError, match=r"activation quantization .* FP8, INT8, INT4, NF4"):
        Toy.from_pretrained(base, quantization_config=NVIDIAModelOptConfig("FP8", weight_only=False))
    with pytest.raises(QuantizationError, match=r"layer 'proj_in'.*INT4 needs block_quantize"):
        Toy.from_pretrained(base, quantization_config=NVIDIAModelOptConfig("INT4"))


# -- bit-exact against modelopt ----------------------------------------------------------------
@pytest.mark.parametrize("scheme", sorted(EXAMPLES))
def test_bit_exact_with_mtq_compress(base, scheme):
    """Our state dict equals modelopt's mtq.quantize + mtq.compress on the same weights."""
    cfg = EXAMPLES[scheme]
    ours = Toy.from_pretrained(base, quantization_config=cfg, torch_dtype=torch.bfloat16)
    theirs = Toy.from_pretrained(base, torch_dtype=torch.bfloat16)
    mtq.quantize(theirs, copy.deepcopy(cfg.modelopt_config))
    mtq.compress(theirs)
    for name in ("proj_in", "blocks.0", "blocks.1"):
        mine = ours.get_submodule(name).state_dict()
        ref = {k: v for k, v in theirs.get_submodule(name).state_dict().items()
               if k in mine}
        assert ref.keys() == mine.keys(), name
        assert all(torch.equal(_bits(mine[k]), _bits(ref[k])) for k in mine), name
    if scheme != "NF4":  # modelopt 0.47's NF4 dequantize mis-broadcasts its scales on CPU
        x = _x()
        assert torch.equal(ours(x), theirs(x))


def test_nf4_and_int4_hand_built_block():
    # one block of 4 values, scale block of 1: NF4 code book value times the block's absmax
    w = torch.tensor([[-2.0, 0.0, 1.1258, 2.0]])  # amax 2
    q = torch.tensor([0x07, 0xDF], dtype=torch.uint8)  # idx 0, 7, 13, 15
    scale, double, zeros = torch.tensor([[127]], dtype=torch.int8), torch.tensor([63.5]), torch.tensor(0.0)
    got = mm.dequantize_nf4(q, scale, double, zeros, 4, (1, 4), torch.float32)
    assert torch.allclose(got, torch.tensor([[-2.0, 0.0, 1.1252, 2.0]]), atol=1e-3)
    # INT4: scale = 7 / amax, stored value = round(w * scale) + 8, high nibble first
    q4 = torch.tensor([[0x18, 0xCF]], dtype=torch.uint8)  # [-7, 0, 4, 7] + 8
    got4 = mm.dequantize_int4(q4, torch.tensor([[3.5]]), 4, (1, 4), torch.float32)
    assert torch.allclose(got4, torch.tensor([[-2.0, 0.0, 4 / 3.5, 2.0]]))
    assert (torch.round(w * 3.5) + 8).tolist() == [[1.0, 8.0, 12.0, 15.0]]


# -- diffusers' checkpoints --------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["FP8", "INT8"])
def test_diffusers_saved_checkpoint_loads(base, tmp_path, scheme):
    """diffusers saves its calibrated (not compressed, see module doc) weights + _amax; we load
    that directory pre-quantized and get exactly our own quantize-on-load result."""
    import diffusers

    class DToy(diffusers.ModelMixin, diffusers.ConfigMixin):
        @diffusers.configuration_utils.register_to_config
        def __init__(self, width: int = 64, hidden: int = 128):
            super().__init__()
            self.proj_in = nn.Linear(width, hidden)
            self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(2))
            self.proj_out = nn.Linear(hidden, width, bias=False)

    ours_cfg = EXAMPLES[scheme]
    dcfg = _diffusers_config(quant_type=scheme, channel_quantize=ours_cfg.channel_quantize)
    dmodel = DToy.from_pretrained(base, quantization_config=dcfg, torch_dtype=torch.bfloat16)
    dmodel.save_pretrained(tmp_path / "d")
    ours = Toy.from_pretrained(base, quantization_config=ours_cfg, torch_dtype=torch.bfloat16)
    for name in ("proj_in", "blocks.0"):  # the same calibration as diffusers
        assert torch.equal(ours.get_submodule(name).weight_quantizer._amax,
                           dmodel.get_submodule(name).weight_quantizer._amax)
    loaded = Toy.from_pretrained(tmp_path / "d", torch_dtype=torch.bfloat16)
    assert loaded.hf_quantizer.pre_quantized and loaded.config.quantization_config.quant_type == scheme
    assert _same_state(loaded, ours) and torch.equal(loaded(_x()), ours(_x()))
