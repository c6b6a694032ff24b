"""bitsandbytes backend: config JSON parity with diffusers, layer parity with bitsandbytes'
Linear4bit/Linear8bitLt, checkpoints moving both ways between diffusers and diffquant on a CPU.

diffusers refuses bitsandbytes without a GPU only in ``validate_environment`` (its layers and
bitsandbytes' CPU kernels work), so the diffusers side patches that check out to act as oracle.
"""

import json
import random

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import diffusers
from diffusers.quantizers.bitsandbytes import bnb_quantizer as d_bnb

from diffquant import BitsAndBytesConfig, CheckpointError, ConfigError
from diffquant.quantizers import DiffusersAutoQuantizer
from diffquant.quantizers.bitsandbytes import BnB4BitLinear, BnB8BitLinear
from tests.toy import DiffusersToyModel, ToyModel, assert_missing_piece_is_named, save_toy, toy_input

bnb = pytest.importorskip("bitsandbytes")

EXAMPLES = BitsAndBytesConfig.cpu_examples()
IDS = ["nf4", "fp4", "nf4-dq", "int8"]


DiffusersToy = DiffusersToyModel


@pytest.fixture
def diffusers_on_cpu(monkeypatch):
    for cls in (d_bnb.BnB4BitDiffusersQuantizer, d_bnb.BnB8BitDiffusersQuantizer):
        monkeypatch.setattr(cls, "validate_environment", lambda self, *a, **k: None)


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    save_toy(d)
    return d


def d_config(cfg: BitsAndBytesConfig) -> diffusers.BitsAndBytesConfig:
    return diffusers.BitsAndBytesConfig(**{k: v for k, v in cfg.to_dict().items()
                                           if not k.startswith("_") and k != "quant_method"})


def run(model, x):
    with torch.no_grad():
        return model(x)


# -- config --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", EXAMPLES, ids=IDS)
def test_config_json_matches_diffusers_both_ways(cfg):
    theirs = d_config(cfg).to_dict()
    theirs["quant_method"] = str(theirs["quant_method"].value)
    assert cfg.to_dict() == theirs
    assert list(cfg.to_dict()) == list(theirs)
    assert BitsAndBytesConfig.from_dict(json.loads(json.dumps(theirs))) == cfg
    assert DiffusersAutoQuantizer.from_dict(theirs) == cfg


def test_config_errors_and_registry_keys():
    with pytest.raises(ConfigError, match="load_in_4bit and load_in_8bit are both True"):
        BitsAndBytesConfig(load_in_4bit=True, load_in_8bit=True)
    with pytest.raises(ConfigError, match=r"bnb_4bit_quant_type='int4': expected one of \('fp4', 'nf4'\)"):
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="int4")
    with pytest.raises(ConfigError, match="bnb_4bit_quant_storage='int4'"):
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_storage="int4")
    with pytest.raises(ConfigError, match="neither load_in_4bit nor load_in_8bit"):
        DiffusersAutoQuantizer.from_config(BitsAndBytesConfig())
    assert BitsAndBytesConfig(load_in_8bit=True).registry_key() == "bitsandbytes_8bit"
    assert type(DiffusersAutoQuantizer.from_config(EXAMPLES[0])).__name__ == "BnB4BitQuantizer"
    assert type(DiffusersAutoQuantizer.from_config(EXAMPLES[3])).__name__ == "BnB8BitQuantizer"
    c = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype="bfloat16")
    assert c.bnb_4bit_compute_dtype is torch.bfloat16 and c.quantization_method() == "fp4"


# -- layers against bitsandbytes' own ------------------------------------------------------------
def bnb_reference_layer(cfg, w, b):
    """bitsandbytes' own layer holding (w, b), quantized on the CPU as diffusers would."""
    out_f, in_f = w.shape
    if cfg.load_in_8bit:
        layer = bnb.nn.Linear8bitLt(in_f, out_f, True, has_fp16_weights=False,
                                    threshold=cfg.llm_int8_threshold)
        layer.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(in_f, out_f, True, cfg.bnb_4bit_compute_dtype,
                                  compress_statistics=cfg.bnb_4bit_use_double_quant,
                                  quant_type=cfg.bnb_4bit_quant_type)
        layer.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False,
                                         compress_statistics=cfg.bnb_4bit_use_double_quant,
                                         quant_type=cfg.bnb_4bit_quant_type, module=layer)
    layer.bias = nn.Parameter(b.clone(), requires_grad=False)
    return layer.to("cpu").eval()  # .to() is where bitsandbytes quantizes


def diffquant_layer(cfg, w, b, pieces=None):
    q = DiffusersAutoQuantizer.from_config(cfg, pre_quantized=pieces is not None)
    q.update_torch_dtype(w.dtype)
    layer = q.make_layer("x", nn.Linear(w.shape[1], w.shape[0], device="meta"))
    layer.bias = nn.Parameter(b.clone(), requires_grad=False)
    for name, t in (pieces or {"weight": w}).items():
        layer.load_piece(name, t, pre_quantized=pieces is not None, dtype=w.dtype, device=None)
    return layer.eval()


@pytest.mark.parametrize("cfg", EXAMPLES, ids=IDS)
def test_layer_matches_bitsandbytes(cfg):
    g = torch.Generator().manual_seed(0)
    # in_features a multiple of 64: bitsandbytes' own CPU (AVX512-BF16) Linear4bit path crashes
    # otherwise; diffquant's layer does not (see the next test, with 160)
    w = (torch.randn(96, 192, generator=g) * 0.05).to(torch.bfloat16)
    b = torch.randn(96, generator=g).to(torch.bfloat16)
    x = torch.randn(2, 5, 192, generator=g).to(torch.bfloat16)
    ref, ours = bnb_reference_layer(cfg, w, b), diffquant_layer(cfg, w, b)
    theirs_sd = {k: v for k, v in ref.state_dict().items() if k != "bias"}
    ours_sd = {k: v for k, v in ours.state_dict().items() if k != "bias"}
    assert list(ours_sd) == list(theirs_sd)
    for k in theirs_sd:  # the stored bytes are bitsandbytes' own, bit for bit
        assert torch.equal(ours_sd[k], theirs_sd[k]), k
    if cfg.load_in_8bit:
        deq_ref = bnb.functional.int8_vectorwise_dequant(ref.weight.data, ref.weight.SCB)
    else:  # before the forward, which repacks bitsandbytes' weight for its CPU kernel
        deq_ref = bnb.functional.dequantize_4bit(ref.weight.data, ref.weight.quant_state)
    assert torch.equal(ours.dequantized_weight(), deq_ref)
    y_ours, y_ref = run(ours, x), run(ref, x)
    assert y_ours.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y_ours, y_ref, rtol=2 ** -7, atol=2 ** -7)  # bf16 rounding


@pytest.mark.parametrize("cfg", EXAMPLES, ids=IDS)
def test_pieces_load_in_any_order_and_under_inference_mode(cfg):
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(48, 160, generator=g).to(torch.bfloat16), torch.zeros(48, dtype=torch.bfloat16)
    src = diffquant_layer(cfg, w, b)
    pieces = {k: v for k, v in src.state_dict().items() if k != "bias"}
    x = torch.randn(3, 160, generator=g).to(torch.bfloat16)
    names = list(pieces)
    for seed in range(3):
        random.Random(seed).shuffle(names)
        layer = diffquant_layer(cfg, w, b, pieces={n: pieces[n].clone() for n in names})
        assert layer.missing_pieces() == []
        with torch.inference_mode():
            assert torch.equal(layer(x), run(src, x))


# -- whole models: quantize on load, save, reload, diffusers both ways ---------------------------
@pytest.mark.parametrize("cfg", EXAMPLES, ids=IDS)
def test_quantize_on_load_matches_diffusers_and_round_trips(cfg, toy_dir, tmp_path, diffusers_on_cpu):
    x = toy_input()
    ours = ToyModel.from_pretrained(toy_dir, quantization_config=cfg, torch_dtype=torch.bfloat16)
    theirs = DiffusersToy.from_pretrained(toy_dir, quantization_config=d_config(cfg),
                                          torch_dtype=torch.bfloat16, device_map="cpu")
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert sorted(ours_sd) == sorted(theirs_sd)
    assert all(torch.equal(ours_sd[k], theirs_sd[k]) for k in theirs_sd)
    y = run(ours, x)
    torch.testing.assert_close(y, run(theirs, x), rtol=2 ** -6, atol=2 ** -6)

    ours.save_pretrained(tmp_path / "dq")
    reloaded = ToyModel.from_pretrained(tmp_path / "dq", torch_dtype=torch.bfloat16)
    assert reloaded.hf_quantizer.quantization_config == cfg
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in ours_sd.items())
    assert torch.equal(run(reloaded, x), y)

    # diffquant's directory loads in diffusers (bitsandbytes' own layers) with the same output
    in_diffusers = DiffusersToy.from_pretrained(tmp_path / "dq", torch_dtype=torch.bfloat16,
                                                device_map="cpu")
    torch.testing.assert_close(run(in_diffusers, x), y, rtol=2 ** -6, atol=2 ** -6)


@pytest.mark.parametrize("cfg", [EXAMPLES[2], EXAMPLES[3]], ids=["nf4-dq", "int8"])
def test_diffusers_checkpoint_loads_in_diffquant(cfg, toy_dir, tmp_path, diffusers_on_cpu):
    x = toy_input()
    theirs = DiffusersToy.from_pretrained(toy_dir, quantization_config=d_config(cfg),
                                          torch_dtype=torch.bfloat16, device_map="cpu")
    y_theirs = run(theirs, x)
    theirs.save_pretrained(tmp_path / "d")
    ours = ToyModel.from_pretrained(tmp_path / "d", torch_dtype=torch.bfloat16)
    assert ours.hf_quantizer.quantization_config == cfg
    torch.testing.assert_close(run(ours, x), y_theirs, rtol=2 ** -6, atol=2 ** -6)
    on_disk = load_file(tmp_path / "d" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(on_disk[k], v) for k, v in ours.state_dict().items())


@pytest.mark.parametrize("cfg, piece", [(EXAMPLES[2], "blocks.1.weight.nested_absmax"),
                                        (EXAMPLES[0], "proj_in.weight.quant_state.bitsandbytes__nf4"),
                                        (EXAMPLES[3], "proj_out.SCB")], ids=["nf4-dq", "nf4", "int8"])
def test_missing_piece_is_named(cfg, piece, toy_dir, tmp_path):
    assert_missing_piece_is_named(toy_dir, cfg, piece, tmp_path)


def test_wrong_quant_type_and_dtype_are_refused(toy_dir, tmp_path):
    ToyModel.from_pretrained(toy_dir, quantization_config=EXAMPLES[0],
                             torch_dtype=torch.bfloat16).save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["bnb_4bit_quant_type"] = "fp4"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="holds 'weight.quant_state.bitsandbytes__nf4' but its "
                                              "config says bnb_4bit_quant_type='fp4'"):
        ToyModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    layer = BnB8BitLinear(8, 4, False)
    with pytest.raises(CheckpointError, match=r"'weight' should be int8 \[4, 8\], got torch.bfloat16"):
        layer.load_piece("weight", torch.zeros(4, 8, dtype=torch.bfloat16), pre_quantized=True,
                         dtype=None, device=None)
    with pytest.raises(CheckpointError, match="packed 4-bit 'weight' should hold 16 bytes"):
        BnB4BitLinear(8, 4, False).load_piece("weight", torch.zeros(4, 8), pre_quantized=True,
                                              dtype=None, device=None)


@pytest.mark.parametrize("cfg, ratio", [(EXAMPLES[0], (0.25, 0.32)), (EXAMPLES[3], (0.5, 0.53))],
                         ids=["nf4", "int8"])
def test_footprint_and_dequantize(cfg, ratio, toy_dir):
    full = ToyModel.from_pretrained(toy_dir, torch_dtype=torch.bfloat16)
    q = ToyModel.from_pretrained(toy_dir, quantization_config=cfg, torch_dtype=torch.bfloat16)
    r = q.get_memory_footprint() / full.get_memory_footprint()
    assert ratio[0] < r < ratio[1]
    x = toy_input()
    y = run(q, x)
    q.dequantize()
    assert type(q.proj_in) is nn.Linear and q.proj_in.weight.dtype == torch.bfloat16
    torch.testing.assert_close(run(q, x), y, rtol=0.05, atol=0.05)


def test_skip_modules_stay_full_precision(toy_dir):
    cfg = BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["proj_out", "blocks.0"])
    m = ToyModel.from_pretrained(toy_dir, quantization_config=cfg, torch_dtype=torch.bfloat16)
    assert type(m.proj_out) is nn.Linear and type(m.blocks[0]) is nn.Linear
    assert type(m.blocks[1]) is BnB4BitLinear and type(m.proj_in) is BnB4BitLinear
