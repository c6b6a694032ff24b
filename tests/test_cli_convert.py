"""`diffquant convert` in each direction, and `default` naming the shipped pipeline, through
cli.main in-process (the console script's function) on the shipped pipeline."""

import json

import gguf
import pytest
import torch
from safetensors.torch import save_file

from diffquant import FluxTransformer2DModel, default_pipeline_path
from diffquant.quantizers.gguf import GGUFLinear
from tests.gguf_spec import check_gguf_file
from tests.test_cli import dq, main_in_process

SHIPPED = default_pipeline_path()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    assert main_in_process("convert", "default", root / "flux.gguf", "--recipe", "Q4_K_M",
                           "--override", "double_blocks.*.img_mlp.0.weight=Q4_0", "--quiet") == 0
    return root


def test_default_to_gguf_is_the_community_layout(files, capsys):
    path = files / "flux.gguf"
    meta = {k: v for k, (_, v) in check_gguf_file(path)["metadata"].items()}
    assert meta["general.architecture"] == "flux" and meta["general.file_type"] == 15
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["double_blocks.0.img_mlp.0.weight"] == "Q4_0"       # the override
    assert types["img_in.weight"] == "BF16" and types["double_blocks.0.img_attn.qkv.bias"] == "F32"
    assert types["single_blocks.0.linear2.weight"] == "BF16"   # rows of 640: no K block fits
    assert main_in_process("convert", "default", path, "--quiet") == 2
    assert "flux.gguf: exists; choose another DST or pass --overwrite" in capsys.readouterr().err
    stamp = path.stat().st_mtime_ns
    assert main_in_process("convert", "default", path, "--type", "Q8_0", "--overwrite", "--quiet") == 0
    assert path.stat().st_mtime_ns != stamp
    assert {t.tensor_type.name for t in gguf.GGUFReader(path).tensors} == {"F32", "BF16", "Q8_0"}
    assert not [p for p in files.iterdir() if p.name.startswith(".")]   # nothing left beside it
    main_in_process("convert", "default", files / "q4km.gguf", "--recipe", "Q4_K_M", "--quiet")


def test_gguf_to_folder_kept_quantized_or_dequantized(files, tmp_path):
    src = files / "q4km.gguf"
    assert main_in_process("convert", src, tmp_path / "kept", "--config", "default", "--quiet") == 0
    kept = FluxTransformer2DModel.from_pretrained(tmp_path / "kept")      # no configuration
    assert isinstance(kept.transformer_blocks[0].attn.to_q, GGUFLinear)
    assert main_in_process("convert", src, tmp_path / "bf16", "--config", "default",
                           "--dtype", "bfloat16", "--quiet") == 0
    plain = FluxTransformer2DModel.from_pretrained(tmp_path / "bf16", torch_dtype="auto")
    assert type(plain.transformer_blocks[0].attn.to_q) is torch.nn.Linear
    assert plain.dtype == torch.bfloat16 and "quantization_config" not in plain.config
    torch.testing.assert_close(plain.transformer_blocks[0].attn.to_q.weight,
                               kept.transformer_blocks[0].attn.to_q.dequantized_weight().bfloat16())


def test_gguf_to_gguf_changes_only_the_layout(files, tmp_path, capsys):
    src = files / "q4km.gguf"
    assert main_in_process("convert", src, tmp_path / "d.gguf", "--layout", "diffusers", "--quiet") == 0
    names = {t.name for t in gguf.GGUFReader(tmp_path / "d.gguf").tensors}
    assert "transformer_blocks.0.attn.to_q.weight" in names
    assert main_in_process("convert", tmp_path / "d.gguf", tmp_path / "c.gguf", "--quiet") == 0
    assert (tmp_path / "c.gguf").read_bytes() == src.read_bytes()
    capsys.readouterr()
    assert main_in_process("convert", src, tmp_path / "x.gguf", "--type", "Q8_0") == 2
    assert "a .gguf converts to a .gguf with its tensors as they are" in capsys.readouterr().err


def test_text_encoder_2_to_gguf_and_back(tmp_path):
    t5 = tmp_path / "t5.gguf"
    assert main_in_process("convert", "default", t5, "--component", "text_encoder_2", "--quiet") == 0
    assert gguf.GGUFReader(t5).tensors[0].name == "token_embd.weight"
    assert main_in_process("convert", t5, tmp_path / "te", "--quiet") == 2   # needs --dtype
    assert main_in_process("convert", t5, tmp_path / "te", "--dtype", "float32", "--quiet") == 0
    config = json.loads((tmp_path / "te" / "config.json").read_text())
    assert config["architectures"] == ["T5EncoderModel"] and config["relative_attention_max_distance"] == 32


def test_original_safetensors_to_folder(tmp_path):
    """An original-layout (BFL) checkpoint, as Black Forest Labs ship flux1-dev.safetensors."""
    from diffquant.gguf_export import community_sources, model_sources

    plain = FluxTransformer2DModel.from_pretrained(SHIPPED, subfolder="transformer")
    fused, _ = community_sources(model_sources(plain))
    assert "single_blocks.3.linear1.weight" in fused
    save_file({k: v.value.contiguous() for k, v in fused.items()}, tmp_path / "flux.safetensors")
    assert main_in_process("convert", tmp_path / "flux.safetensors", tmp_path / "out",
                           "--config", "default", "--quiet") == 0
    again = FluxTransformer2DModel.from_pretrained(tmp_path / "out")
    a, b = plain.state_dict(), again.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert main_in_process("convert", tmp_path / "flux.safetensors", tmp_path / "q8",
                           "--config", "default", "--type", "Q8_0", "--quiet") == 0
    q8 = FluxTransformer2DModel.from_pretrained(tmp_path / "q8")
    assert q8.transformer_blocks[0].attn.to_q.qtype.name == "Q8_0"


def test_default_names_the_shipped_pipeline_everywhere(tmp_path, capsys):
    assert main_in_process("inspect", "default", "--quiet") == 0
    assert "transformer" in capsys.readouterr().out
    assert main_in_process("quantize", "default", tmp_path / "q", "--quantize", "gguf:q8_0",
                           "--quiet") == 0
    assert json.loads((tmp_path / "q" / "transformer" / "config.json").read_text())[
        "quantization_config"]["quant_type"] == "Q8_0"
    for command in ("generate", "quantize", "inspect", "compare", "convert"):
        assert "'default' (the pipeline shipped with diffquant" in " ".join(
            dq(command, "--help").stdout.split())


def test_convert_usage_errors(tmp_path, capsys):
    assert main_in_process("convert", "default", tmp_path / "dir") == 2
    assert capsys.readouterr().err == (f"diffquant: error: {tmp_path / 'dir'}: converting a folder "
                                       "writes a .gguf file; to quantize a pipeline into a folder "
                                       "use 'diffquant quantize'\n")
    assert main_in_process("convert", "default", tmp_path / "x.gguf", "--recipe", "Q9_K") == 2
    assert "unknown recipe 'Q9_K'" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()
