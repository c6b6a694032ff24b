"""The command line on pipelines diffquant runs through diffusers (a tiny SD3 and Wan 2.1):
generate at the pipeline's own default size, a video as an animated file or a folder of frames,
quantize, inspect, and compare (its children run in this process here, to spare the imports)."""

import json
import subprocess

import numpy as np
import pytest
from PIL import Image

from diffquant import cli
from diffquant.cli.media import load_frames
from tests.test_cli import main_in_process
from tests.tiny_pipeline import TINY_PROMPT

WAN = ("--prompt", TINY_PROMPT, "--steps", 2, "--height", 16, "--width", 16, "--frames", 5,
       "--max-sequence-length", 16, "-q")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)


def test_generate_an_image_at_the_pipelines_own_size(sd3_dir, tmp_path, capsys):
    """No --height/--width: SD3's own default (its transformer's sample_size x the VAE's scale)."""
    out = tmp_path / "sd3.png"
    capsys.readouterr()
    assert main_in_process("generate", "--model", sd3_dir, "--prompt", TINY_PROMPT, "--steps", 1,
                           "--quantize", "torchao:int8wo", "--out", out, "-q") == 0
    assert capsys.readouterr().out.startswith(f"wrote {out} (8x8, 1 step, seed 0, load ")
    assert Image.open(out).size == (8, 8)


def test_generate_a_video_as_an_animated_file_or_a_folder(wan_dir, tmp_path, capsys):
    capsys.readouterr()
    assert main_in_process("generate", "--model", wan_dir, *WAN, "--out", tmp_path / "clip.webp") == 0
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'clip.webp'} (webp, 5 frames, "
                                              "16x16, 2 steps, seed 0, load ")
    assert main_in_process("generate", "--model", wan_dir, *WAN, "--out", tmp_path / "frames") == 0
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'frames'} (folder, 5 frames, ")
    webp, folder = load_frames(tmp_path / "clip.webp"), load_frames(tmp_path / "frames")
    assert len(webp) == len(folder) == 5 and webp[0].size == (16, 16)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(webp, folder))
    assert main_in_process("generate", "--model", wan_dir, *WAN, "--out", tmp_path / "x.mp4") == 2
    assert "Pillow cannot write '.mp4' files" in capsys.readouterr().err


def test_quantize_and_inspect(wan_dir, tmp_path, capsys):
    dst = tmp_path / "wan-int8"
    assert main_in_process("quantize", wan_dir, dst, "--quantize", "torchao:int8wo", "-q") == 0
    index = json.loads((dst / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    assert index["transformer"] == ["diffusers", "WanTransformer3DModel"]
    config = json.loads((dst / "transformer" / "config.json").read_text())
    assert config["quantization_config"]["quant_type"]["default"]["_type"] == "Int8WeightOnlyConfig"
    capsys.readouterr()
    assert main_in_process("inspect", dst, "-q") == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["transformer"][1:4] == ["WanTransformer3DModel", "torchao", "int8wo"]
    assert rows["vae"][1:3] == ["AutoencoderKLWan", "-"]
    assert rows["text_encoder"][1:3] == ["UMT5EncoderModel", "-"]
    assert "transformer_2" not in rows  # [null, null]: a component this pipeline does not have


def test_compare_a_video_pipeline(wan_dir, tmp_path, monkeypatch, capsys):
    def in_process(cmd, *args, **kwargs):  # `python -m diffquant generate ...`, here
        return subprocess.CompletedProcess(cmd, cli.main(cmd[3:]))

    monkeypatch.setattr(subprocess, "run", in_process)
    grid = tmp_path / "grid.png"
    capsys.readouterr()
    assert main_in_process("compare", "--model", wan_dir, *WAN, "--quantize", "gguf:q8_0",
                           "--out", grid) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("variant"))
    ref, q8 = lines[header + 2].split(), lines[header + 3].split()
    assert ref[0] == "unquantized" and q8[0] == "gguf:q8_0" and 15 < float(q8[-1]) < 100
    assert Image.open(grid).size[1] == 16 + 14 + 8  # the first frames, labelled
    assert len(load_frames(tmp_path / "grid-1-gguf-q8_0.png")) == 5  # each variant's whole video
