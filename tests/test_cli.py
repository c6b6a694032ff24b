"""The `diffquant` command line: SPEC parsing in-process, each command through the real entry
point (`python -m diffquant`, which is what the console script runs) on a tiny pipeline."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from diffquant import cli
from diffquant.errors import ConfigError
from diffquant.report import format_table, image_grid, psnr
from diffquant.spec import (QuantSpec, build_quantization_config, diffquant_config, parse_spec,
                            transformers_config)
from tests.tiny_pipeline import TINY_PROMPT, build_tiny_flux_pipeline_dir

FLUX_INDEX = {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
              "text_encoder": ["transformers", "CLIPTextModel"],
              "text_encoder_2": ["transformers", "T5EncoderModel"],
              "vae": ["diffusers", "AutoencoderKL"],
              "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
              "tokenizer": ["transformers", "CLIPTokenizer"]}


def dq(*args, check=True):
    """Run `python -m diffquant ARGS`; returns the CompletedProcess (text mode)."""
    proc = subprocess.run([sys.executable, "-m", "diffquant", *map(str, args)],
                          capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def error_line(proc) -> str:
    """The one error line: the whole of stderr, checked to be exactly one line."""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("diffquant: error: "), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_flux_pipeline_dir(tmp_path_factory.mktemp("cli") / "pipe")


# -- SPEC parsing ---------------------------------------------------------------------------
@pytest.mark.parametrize("text, backend, scheme, comps", [
    ("torchao:int8wo", "torchao", "int8wo", ("transformer",)),
    ("bnb:nf4@transformer,text_encoder_2", "bitsandbytes", "nf4", ("transformer", "text_encoder_2")),
    ("bitsandbytes:8bit", "bitsandbytes", "int8", ("transformer",)),
    ("BNB:NF4-DQ", "bitsandbytes", "nf4-dq", ("transformer",)),
    ("gguf:Q4_0", "gguf", "q4_0", ("transformer",)),
    ("quanto:int8@ text_encoder ", "quanto", "int8", ("text_encoder",)),
    ("modelopt:int8", "modelopt", "int8", ("transformer",)),
])
def test_parse_spec(text, backend, scheme, comps):
    assert parse_spec(text) == QuantSpec(text, backend, scheme, comps)


@pytest.mark.parametrize("text, why", [
    ("torchao", "missing BACKEND or SCHEME"),
    (":int8", "missing BACKEND or SCHEME"),
    ("nope:int8", "unknown backend 'nope'"),
    ("torchao:int9", "unknown torchao scheme 'int9'"),
    ("bnb:nf3", "unknown bitsandbytes scheme 'nf3'"),
    ("gguf:q4_0@", "empty or repeated component"),
    ("gguf:q4_0@vae,vae", "empty or repeated component"),
])
def test_bad_spec_names_spec_expectation_and_choices(text, why):
    with pytest.raises(ConfigError) as info:
        parse_spec(text)
    msg = str(info.value)
    assert msg.startswith(f"bad --quantize SPEC {text!r}: {why}")
    assert "write BACKEND:SCHEME[@COMPONENT,...]" in msg
    for listed in ("torchao (", "bitsandbytes/bnb (nf4, fp4, nf4-dq", "gguf (", "q4_0", "quanto (",
                   "modelopt ("):
        assert listed in msg


def test_configs_from_specs():
    from diffquant import BitsAndBytesConfig, GGUFQuantizationConfig, QuantoConfig, TorchAoConfig

    assert diffquant_config(parse_spec("torchao:int8wo")) == TorchAoConfig("int8wo")
    assert diffquant_config(parse_spec("gguf:q4_0")) == GGUFQuantizationConfig(quant_type="Q4_0")
    assert diffquant_config(parse_spec("quanto:int8")) == QuantoConfig(weights_dtype="int8")
    assert diffquant_config(parse_spec("bnb:nf4-dq")) == BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    assert diffquant_config(parse_spec("bnb:int8")) == BitsAndBytesConfig(load_in_8bit=True)


def test_modelopt_specs_carry_the_block_sizes_its_block_formats_need():
    """NVIDIAModelOptConfig (as diffusers') refuses INT4 / NF4 / NVFP4 without block sizes, and a
    SPEC cannot give them: the CLI supplies the usual ones."""
    from diffquant import NVIDIAModelOptConfig

    blocks = dict(channel_quantize=-1, block_quantize=128)
    assert diffquant_config(parse_spec("modelopt:int4")) == NVIDIAModelOptConfig("INT4", **blocks)
    assert diffquant_config(parse_spec("modelopt:nf4")) == NVIDIAModelOptConfig(
        "NF4", channel_quantize=-1, block_quantize=64, scale_channel_quantize=-1,
        scale_block_quantize=256)
    assert diffquant_config(parse_spec("modelopt:nvfp4")) == NVIDIAModelOptConfig(
        "NVFP4", channel_quantize=-1, block_quantize=16, scale_channel_quantize=-1,
        scale_block_quantize=16)
    assert diffquant_config(parse_spec("modelopt:int8")) == NVIDIAModelOptConfig(
        "INT8", channel_quantize=0)
    assert diffquant_config(parse_spec("modelopt:fp8")) == NVIDIAModelOptConfig("FP8")


def _every_spec() -> list[str]:
    from diffquant.spec import available_backends, backend_schemes

    return [f"{b}:{s}" for b in available_backends() for s in backend_schemes(b)]


@pytest.mark.parametrize("text", _every_spec())
def test_every_scheme_the_cli_lists_quantizes_and_runs_the_transformer(tiny, text):
    """Each backend:scheme that --help and the SPEC errors offer loads the tiny pipeline's
    transformer quantized and runs it (modelopt's INT4 / NF4 / NVFP4 once answered every SPEC
    with an error that asked for block sizes a SPEC cannot carry)."""
    import torch

    from diffquant import FluxTransformer2DModel
    from diffquant.quantizers.base import QuantizedLinear

    model = FluxTransformer2DModel.from_pretrained(
        tiny / "transformer", quantization_config=diffquant_config(parse_spec(text)),
        torch_dtype=torch.float32)
    assert any(isinstance(m, QuantizedLinear) for m in model.modules()), text
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = model(torch.randn(1, 4, cfg.in_channels, generator=g),
                    torch.randn(1, 3, cfg.joint_attention_dim, generator=g),
                    torch.randn(1, cfg.pooled_projection_dim, generator=g), torch.tensor([0.5]),
                    torch.zeros(4, 3), torch.zeros(3, 3), return_dict=False,
                    guidance=torch.tensor([3.5]) if cfg.guidance_embeds else None)[0]
    assert out.shape == (1, 4, cfg.in_channels) and torch.isfinite(out).all(), text


def test_granular_config_uses_transformers_classes_for_text_encoders(monkeypatch):
    import importlib.util

    import transformers

    from diffquant import BitsAndBytesConfig

    pq = build_quantization_config([parse_spec("bnb:nf4@transformer,text_encoder_2"),
                                    parse_spec("quanto:int8@text_encoder")], FLUX_INDEX)
    assert pq.is_granular and sorted(pq.quant_mapping) == ["text_encoder", "text_encoder_2", "transformer"]
    assert type(pq.quant_mapping["transformer"]) is BitsAndBytesConfig
    te2 = pq.quant_mapping["text_encoder_2"]
    assert type(te2) is transformers.BitsAndBytesConfig and te2.bnb_4bit_quant_type == "nf4"
    assert type(pq.quant_mapping["text_encoder"]) is transformers.QuantoConfig
    ao = transformers_config(parse_spec("torchao:int8wo@text_encoder"), "text_encoder")
    assert type(ao.quant_type).__name__ == "Int8WeightOnlyConfig"
    # torchao int4 for transformers needs the mslk package (not installed here: no CPU int4)
    with pytest.raises(ConfigError, match="transformers' TorchAoConfig refused it .torchao "
                                          "int4wo on a transformers model .* needs the mslk "
                                          "package, which is not installed"):
        transformers_config(parse_spec("torchao:int4wo@text_encoder"), "text_encoder")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "mslk" else find_spec(name, *a))
    ao = transformers_config(parse_spec("torchao:int4wo@text_encoder"), "text_encoder")
    assert type(ao.quant_type).__name__ == "Int4WeightOnlyConfig"
    bnb8 = transformers_config(parse_spec("bnb:int8@text_encoder"), "text_encoder")
    assert type(bnb8) is transformers.BitsAndBytesConfig and bnb8.load_in_8bit


@pytest.mark.parametrize("specs, match", [
    (["torchao:int8wo", "gguf:q4_0"], "component 'transformer' is named by two SPECs"),
    (["gguf:q4_0@text_encoder"], "component 'text_encoder' is a transformers model and "
                                 "transformers has no backend that quantizes it this way; "
                                 "quantize text_encoder with bnb:nf4, quanto:int8 or torchao:int8wo"),
    (["modelopt:int8@text_encoder_2"], "component 'text_encoder_2' is a transformers model"),
    (["gguf:q4_0@unet"], "component 'unet' is not in this pipeline; name one of text_encoder, "
                         "text_encoder_2, transformer, vae"),
    (["gguf:q4_0@scheduler"], "component 'scheduler' is not a model"),
])
def test_granular_config_errors(specs, match):
    with pytest.raises(ConfigError, match=match):
        build_quantization_config([parse_spec(s) for s in specs], FLUX_INDEX)


# -- report helpers -------------------------------------------------------------------------
def test_psnr_table_and_grid():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 255  # mse = 255^2 / 48 -> psnr = 10 log10(48)
    assert psnr(a, a) == float("inf")
    assert psnr(a, b) == pytest.approx(10 * np.log10(48))
    assert format_table(["a", "bb"], [["xxx", 1]]).splitlines() == ["a    bb", "---  --", "xxx  1"]
    grid = image_grid([Image.new("RGB", (32, 32), "red")] * 3, ["x", "y", "z"])
    assert grid.size == (3 * 36 + 4, 32 + 14 + 8)
    assert grid.getpixel((4, 4)) == (255, 0, 0)


def test_runtime_failure_is_one_line_exit_1(monkeypatch, capsys, tmp_path):
    def boom(args):
        raise RuntimeError("the device went away")
    monkeypatch.setattr(cli.commands, "cmd_inspect", boom)
    assert cli.main(["inspect", str(tmp_path)]) == 1
    assert capsys.readouterr().err == ("diffquant: error: RuntimeError: the device went away; "
                                       "rerun with --debug for the traceback\n")
    with pytest.raises(RuntimeError, match="the device went away"):
        cli.main(["inspect", str(tmp_path), "--debug"])


# -- the real entry point -------------------------------------------------------------------
@pytest.mark.parametrize("command", [[], ["generate"], ["quantize"], ["inspect"], ["compare"]])
def test_help(command):
    out = dq(*command, "--help").stdout
    assert out.startswith("usage: diffquant")
    assert ("examples:" in out) if command else ("generate" in out and "compare" in out)


def test_usage_errors_are_one_line(tmp_path):
    assert dq(check=False).returncode == 2
    proc = dq("generate", check=False)
    assert proc.returncode == 2
    assert error_line(proc) == ("diffquant: error: the following arguments are required: --prompt; "
                                "see 'diffquant generate --help'")
    missing = tmp_path / "nope"
    proc = dq("inspect", missing, check=False)
    assert proc.returncode == 2
    assert error_line(proc) == (f"diffquant: error: {missing}: no such directory; give a pipeline "
                                "directory or a hub id like 'org/name'")
    proc = dq("generate", "--model", tmp_path, "--prompt", "x", check=False)
    assert proc.returncode == 2
    assert error_line(proc) == (f"diffquant: error: {tmp_path}: not a pipeline directory (no "
                                "model_index.json); give a directory written by save_pretrained "
                                "or 'diffquant quantize'")


def test_bad_spec_on_the_command_line(tiny, tmp_path):
    proc = dq("quantize", tiny, tmp_path / "q", "--quantize", "torchao:int9", check=False)
    assert proc.returncode == 2
    line = error_line(proc)
    assert line.startswith("diffquant: error: bad --quantize SPEC 'torchao:int9': unknown torchao "
                           "scheme 'int9'; write BACKEND:SCHEME[@COMPONENT,...]")
    assert "bitsandbytes/bnb (nf4, fp4, nf4-dq" in line
    assert not (tmp_path / "q").exists()


RUN = ["--prompt", TINY_PROMPT, "--steps", 2, "--seed", 3, "--max-sequence-length", 16, "--quiet"]


@contextlib.contextmanager
def cli_state():
    """Undo the process-wide settings cli.main makes for a command line (environment, logger
    levels and handlers, warning filters), so running it in-process leaves pytest as it was."""
    env = dict(os.environ)
    names = ["", "diffquant", "torchao", "torch", "transformers", "bitsandbytes", "optimum",
             "modelopt"]
    levels = {n: logging.getLogger(n).level for n in names}
    handlers = list(logging.getLogger().handlers)
    try:
        with warnings.catch_warnings():
            yield
    finally:
        os.environ.clear()
        os.environ.update(env)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        logging.getLogger().handlers[:] = handlers


def main_in_process(*args) -> int:
    """cli.main (the function the console script calls) in this process: no import cost."""
    with cli_state():
        return cli.main([str(a) for a in args])


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    """`diffquant quantize` output: the tiny pipeline with its transformer in GGUF Q4_0."""
    dst = tmp_path_factory.mktemp("cli") / "pipe-q4"
    assert main_in_process("quantize", tiny, dst, "--quantize", "gguf:q4_0", "--quiet") == 0
    return dst


def test_quantize_writes_a_self_describing_pipeline(tiny, saved, tmp_path, capsys):
    config = json.loads((saved / "transformer" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gguf"
    assert config["quantization_config"]["quant_type"] == "Q4_0"
    assert "quantization_config" not in json.loads((saved / "vae" / "config.json").read_text())
    proc = dq("quantize", tiny, saved, "--quantize", "gguf:q4_0", check=False)
    assert proc.returncode == 2
    assert error_line(proc) == (f"diffquant: error: {saved}: exists and is not empty; choose "
                                "another DST or pass --overwrite")
    capsys.readouterr()
    assert main_in_process("quantize", saved, tmp_path / "again", "--quantize", "gguf:q8_0") == 2
    assert capsys.readouterr().err == (f"diffquant: error: {saved}: component 'transformer' is "
                                       "already quantized (gguf); drop its --quantize SPEC, or "
                                       "quantize the original pipeline\n")
    # --overwrite replaces a non-empty DST; the summary says how to use the result
    dst = tmp_path / "copy"
    dst.mkdir()
    (dst / "old.txt").write_text("x")
    assert main_in_process("quantize", tiny, dst, "--quantize", "gguf:q8_0", "-q", "--overwrite") == 0
    config = json.loads((dst / "transformer" / "config.json").read_text())
    assert config["quantization_config"]["quant_type"] == "Q8_0"
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {dst} (quantized gguf:q8_0 in ")
    assert out.rstrip().endswith(f"diffquant generate --model {dst} --prompt ...")


def test_inspect(saved, capsys):
    capsys.readouterr()
    assert main_in_process("inspect", saved, "--quiet") == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["component", "class", "quantization", "parameters", "on", "disk",
                                "in", "memory"]
    rows = {line.split()[0]: line.split() for line in table[2:]}
    assert set(rows) == {"scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                         "transformer", "vae", "total"}  # feature_extractor/image_encoder are null
    assert rows["transformer"][1:4] == ["FluxTransformer2DModel", "gguf", "Q4_0"]
    assert rows["vae"][1:3] == ["AutoencoderKL", "-"]
    assert rows["text_encoder"][1:3] == ["CLIPTextModel", "-"]
    assert rows["scheduler"][1:3] == ["FlowMatchEulerDiscreteScheduler", "-"]


def test_generate_with_quanto_int4_text_encoders(tiny, tmp_path, capsys):
    """transformers puts optimum-quanto's own int4 layers in a quanto-quantized text encoder,
    and they fail under torch.inference_mode(), which the CLI used to run the pipeline in."""
    out = tmp_path / "te.png"
    capsys.readouterr()
    assert main_in_process("generate", "--model", tiny, *RUN, "--quantize",
                           "quanto:int4@text_encoder,text_encoder_2", "--out", out, "-q") == 0
    assert capsys.readouterr().out.startswith(f"wrote {out} (")


def test_generate_defaults_to_the_shipped_pipeline(tmp_path, capsys):
    """No --model: the shipped pipeline, at its own 64x64 (its VAE's sample_size)."""
    out = tmp_path / "shipped.png"
    capsys.readouterr()
    assert main_in_process("generate", "--prompt", TINY_PROMPT, "--steps", 1, "--out", out, "-q") == 0
    assert capsys.readouterr().out.startswith(f"wrote {out} (64x64, 1 step, seed 0, load ")
    assert Image.open(out).size == (64, 64)


def test_compare_and_generate_from_the_saved_copy(tiny, saved, tmp_path):
    """compare quantizes on load in a child; generate reloads the pre-quantized copy with no
    configuration: the same seed gives the same image."""
    grid = tmp_path / "grid.png"
    proc = dq("compare", "--model", tiny, *RUN, "--height", 32, "--width", 32, "--quantize",
              "gguf:q4_0", "--out", grid)
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("variant"))
    assert lines[header].split() == ["variant", "load", "s", "peak", "RSS", "weights", "s/step",
                                     "PSNR", "dB"]
    ref, q4 = lines[header + 2].split(), lines[header + 3].split()
    assert ref[0] == "unquantized" and ref[-1] == "ref"
    assert q4[0] == "gguf:q4_0" and 10 < float(q4[-1]) < 100
    assert Image.open(grid).size == (2 * (6 * len("unquantized") + 4) + 4, 32 + 14 + 8)
    assert lines[-1] == f"wrote {grid} (and each image as grid-N-VARIANT.png beside it)"
    reference = np.asarray(Image.open(tmp_path / "grid-0-unquantized.png"))
    on_load = np.asarray(Image.open(tmp_path / "grid-1-gguf-q4_0.png"))
    assert psnr(on_load, reference) == pytest.approx(float(q4[-1]), abs=0.01)

    image = tmp_path / "reloaded.png"  # no --height/--width: the VAE's sample_size, 32
    out = dq("generate", "--model", saved, *RUN, "--out", image).stdout
    assert out.startswith(f"wrote {image} (32x32, 2 steps, seed 3, load ")
    assert np.array_equal(np.asarray(Image.open(image)), on_load)
