"""torchao backend: config JSON as diffusers writes it, numerics against torchao's own
quantize_, checkpoints written by diffusers 0.42.1 with torchao, and a tiny Flux transformer."""

import copy
import json

import pytest
import torch
from torch import nn

import diffusers
import torchao.quantization as tq
from torchao.quantization import quant_primitives as qp
from diffquant import FluxTransformer2DModel, TorchAoConfig
from diffquant.errors import CheckpointError, ConfigError, QuantizationError
from diffquant.ops.formats import torchao as iq
from diffquant.quantizers.base import QuantizedLinear
from diffquant.quantizers.torchao import LAYERS
from tests.toy import DiffusersToyModel, ToyModel, save_toy, toy_input


# -- config ------------------------------------------------------------------------------------
def test_string_config_json_is_diffusers_037_form():
    c = TorchAoConfig("int4wo", group_size=64)
    # what diffusers 0.37's TorchAoConfig("int4wo", group_size=64).to_dict() holds
    assert c.to_dict() == {"quant_method": "torchao", "quant_type": "int4wo",
                           "modules_to_not_convert": None, "quant_type_kwargs": {"group_size": 64}}
    again = TorchAoConfig.from_dict(json.loads(c.to_json_string()))
    assert again == c and again.quant_type_kwargs == {"group_size": 64}
    assert TorchAoConfig("int4wo", quant_type_kwargs={"group_size": 64}) == c
    assert TorchAoConfig("int4wo") != c


@pytest.mark.parametrize("make", [lambda: tq.Int8WeightOnlyConfig(),
                                  lambda: tq.Int8DynamicActivationInt8WeightConfig(),
                                  lambda: tq.Float8WeightOnlyConfig(weight_dtype=torch.float8_e5m2),
                                  lambda: tq.Int4WeightOnlyConfig(group_size=64)])
def test_object_config_json_matches_diffusers_042(make):
    ours = TorchAoConfig(make(), modules_to_not_convert=["proj_out"])
    theirs = diffusers.TorchAoConfig(make(), modules_to_not_convert=["proj_out"])
    assert json.loads(ours.to_json_string()) == json.loads(json.dumps(theirs.to_dict()))
    assert TorchAoConfig.from_dict(theirs.to_dict()) == ours
    assert diffusers.TorchAoConfig.from_dict(ours.to_dict()).to_dict() == theirs.to_dict()


def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match=r"TorchAoConfig\('int8wo'\): unknown keyword argument\(s\) "
                                          r"\['group_size'\]; accepted: \['set_inductor_config'\]"):
        TorchAoConfig("int8wo", group_size=32)
    with pytest.raises(ConfigError, match=r"unknown quant_type 'int9wo'; expected one of \["):
        TorchAoConfig("int9wo")
    with pytest.raises(ConfigError, match=r"group_size=100; expected one of \(32, 64, 128, 256\)"):
        TorchAoConfig("int4wo", group_size=100)
    with pytest.raises(QuantizationError, match=r"quant_type 'float8dq_e4m3_row' cannot run with "
                                                r"diffquant's torchao backend; runnable quant types: "
                                                r"\['float8_weight_only', .*'int8wo'\]"):
        TorchAoConfig("float8dq_e4m3_row")
    with pytest.raises(QuantizationError, match=r"TorchAoConfig\(IntxWeightOnlyConfig\): this "
                                                r"torchao config is not implemented; diffquant runs"):
        TorchAoConfig(tq.IntxWeightOnlyConfig())
    with pytest.raises(ConfigError, match=r"'float8_e4m3fn' or 'float8_e5m2'"):
        TorchAoConfig("float8wo", weight_dtype="int8")


def test_float8_names_follow_diffusers():
    assert TorchAoConfig("float8wo").scheme() == ("float8wo", {"weight_dtype": torch.float8_e5m2})
    assert TorchAoConfig("float8_weight_only").scheme()[1]["weight_dtype"] is torch.float8_e4m3fn
    c = TorchAoConfig("float8_weight_only", weight_dtype=torch.float8_e5m2)
    assert c.quant_type_kwargs == {"weight_dtype": "float8_e5m2"}
    assert c.scheme()[1]["weight_dtype"] is torch.float8_e5m2
    assert c == TorchAoConfig(tq.Float8WeightOnlyConfig(weight_dtype=torch.float8_e5m2))


# -- numerics against torchao's quantize_ -------------------------------------------------------
def _linear_pair(config, out_f=96, in_f=256, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f).to(torch.bfloat16)
    theirs = copy.deepcopy(lin)
    tq.quantize_(theirs, config)
    return lin, theirs


def _ours(lin, kind, **params):
    layer = LAYERS[kind](lin.in_features, lin.out_features, True, **params)
    layer.load_piece("weight", lin.weight.detach(), pre_quantized=False, dtype=torch.bfloat16, device=None)
    layer.bias = nn.Parameter(lin.bias.detach(), requires_grad=False)
    return layer


@pytest.mark.parametrize("kind,config", [("int8wo", tq.Int8WeightOnlyConfig()),
                                         ("int8dq", tq.Int8DynamicActivationInt8WeightConfig())])
def test_int8_matches_torchao(kind, config):
    lin, theirs = _linear_pair(config)
    ours = _ours(lin, kind)
    assert torch.equal(ours.weight, theirs.weight.qdata)
    assert torch.equal(ours.weight_scale, theirs.weight.scale)
    x = torch.randn(2, 5, 256).to(torch.bfloat16)
    assert torch.equal(ours(x), theirs(x))  # same ops in the same order: bit-identical
    assert torch.equal(ours.dequantized_weight(), theirs.weight.dequantize())


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_weight_only_matches_torchao(fp8):
    lin, theirs = _linear_pair(tq.Float8WeightOnlyConfig(weight_dtype=fp8))
    ours = _ours(lin, "float8wo", weight_dtype=fp8)
    assert torch.equal(ours.weight.view(torch.uint8), theirs.weight.qdata.view(torch.uint8))
    assert torch.equal(ours.weight_scale, theirs.weight.scale)
    x = torch.randn(3, 256).to(torch.bfloat16)
    assert torch.equal(ours(x), theirs(x))


def test_int4_matches_torchao_tinygemm_primitives_and_torch_cpu_kernel():
    # torchao's Int4WeightOnlyConfig cannot run here (its packings need mslk or CUDA), so compare
    # with the primitives Int4TilePackedTo4dTensor.from_hp calls, and with torch's CPU int4 kernel.
    torch.manual_seed(0)
    w = torch.randn(64, 256).to(torch.bfloat16)
    packed, scale, zero = iq.int4_quantize_groupwise(w, 64)
    args = dict(block_size=(1, 64), quant_min=0, quant_max=15)
    ref_s, ref_z = qp._choose_qparams_affine_tinygemm(w, qp.MappingType.ASYMMETRIC, target_dtype=torch.int32,
                                                      scale_dtype=w.dtype, zero_point_dtype=w.dtype, **args)
    ref_q = qp._quantize_affine_tinygemm(w, scale=ref_s, zero_point=ref_z, output_dtype=torch.int32, **args)
    assert torch.equal(scale, ref_s.reshape(64, 4)) and torch.equal(zero, ref_z.reshape(64, 4))
    assert torch.equal(iq.int4_unpack(packed).to(torch.int32), ref_q)
    deq = iq.int4_dequantize(packed, scale, zero, torch.bfloat16)
    ref_deq = qp._dequantize_affine_tinygemm(ref_q, list(args["block_size"]), ref_s, ref_z, torch.int32,
                                             0, 15, output_dtype=torch.bfloat16)
    assert torch.equal(deq, ref_deq)
    x = torch.randn(5, 256).to(torch.bfloat16)
    kernel_w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(ref_q, 8)
    scales_zeros = torch.stack([scale.t(), zero.t()], dim=-1).contiguous()  # [K/g, N, 2]
    kernel_y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, kernel_w, 64, scales_zeros)
    torch.testing.assert_close(x @ deq.t(), kernel_y, atol=0.06, rtol=0.02)  # bf16 accumulation


def test_int8_dynamic_linear_is_exact_integer_math():
    torch.manual_seed(0)
    q, s = iq.int8_quantize_per_channel(torch.randn(24, 40))
    x = torch.randn(3, 40)
    xq, xs = iq.int8_quantize_per_token(x)
    want = ((xq.double() @ q.double().t()) * xs.double() * s.double().t()).float()
    torch.testing.assert_close(iq.int8_dynamic_linear(x, q, s), want, atol=1e-5, rtol=1e-5)


def test_float8_all_zero_row_stays_zero():
    q, s = iq.float8_quantize_per_channel(torch.zeros(2, 8, dtype=torch.bfloat16))
    assert not iq.float8_dequantize(q, s, torch.bfloat16).isnan().any()


# -- checkpoints written by diffusers 0.42.1 with torchao ------------------------------------------
DiffusersToy = DiffusersToyModel


@pytest.mark.parametrize("make,safe", [(tq.Int8WeightOnlyConfig, True), (tq.Int8WeightOnlyConfig, False),
                                       (tq.Int8DynamicActivationInt8WeightConfig, True),
                                       (tq.Float8WeightOnlyConfig, True)])
def test_loads_checkpoint_diffusers_wrote_with_torchao(tmp_path, make, safe):
    save_toy(tmp_path / "bf16")
    theirs = DiffusersToy.from_pretrained(tmp_path / "bf16", torch_dtype=torch.bfloat16,
                                          quantization_config=diffusers.TorchAoConfig(make()))
    theirs.save_pretrained(tmp_path / "ao", safe_serialization=safe)
    written = sorted(p.name for p in (tmp_path / "ao").iterdir())
    assert written == ["config.json", "diffusion_pytorch_model." + ("safetensors" if safe else "bin")]
    ours = ToyModel.from_pretrained(tmp_path / "ao")  # pre-quantized: config.json says torchao
    assert ours.hf_quantizer.pre_quantized and isinstance(ours.blocks[0], QuantizedLinear)
    x = toy_input()
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
    # and it saves in diffquant's own layout, which reloads to the same numbers
    ours.save_pretrained(tmp_path / "dq")
    again = ToyModel.from_pretrained(tmp_path / "dq")
    assert torch.equal(again(x), ours(x))
    assert again.config["quantization_config"] == ours.config["quantization_config"]


def test_foreign_checkpoint_must_match_its_config(tmp_path):
    save_toy(tmp_path / "bf16")
    f8 = diffusers.TorchAoConfig(tq.Float8WeightOnlyConfig())
    theirs = DiffusersToy.from_pretrained(tmp_path / "bf16", torch_dtype=torch.bfloat16,
                                          quantization_config=f8)
    theirs.save_pretrained(tmp_path / "ao")
    cfg_path = tmp_path / "ao" / "config.json"
    config = json.loads(cfg_path.read_text())
    config["quantization_config"] = TorchAoConfig(tq.Int8WeightOnlyConfig()).to_dict()
    cfg_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model.safetensors: blocks.0._weight_"
                                              r"\w+: torchao saved this weight as 'Float8Tensor', but "
                                              r"the quantization_config asks for int8wo"):
        ToyModel.from_pretrained(tmp_path / "ao")


def test_aobaseconfig_quantizes_on_load_like_the_string(tmp_path):
    save_toy(tmp_path)
    x = toy_input()
    a = ToyModel.from_pretrained(tmp_path, quantization_config=TorchAoConfig(tq.Int8WeightOnlyConfig()))
    b = ToyModel.from_pretrained(tmp_path, quantization_config=TorchAoConfig("int8_weight_only"))
    assert torch.equal(a(x), b(x))
    written = a.config["quantization_config"].to_dict()
    assert written["quant_type"]["default"]["_type"] == "Int8WeightOnlyConfig"


# -- a tiny Flux transformer, saved by diffusers in bf16 ----------------------------------------------
TINY_FLUX = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=32,
                 num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=64,
                 axes_dims_rope=(8, 12, 12), guidance_embeds=True)
FLUX_TOL = 0.08  # relative L2 error of int8 vs bf16 output (weights ~N(0, 0.2): a hard case)


def _flux_inputs(height=3, width=4, text=5, batch=2):
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(height, width, 3)
    ids[..., 1], ids[..., 2] = torch.arange(height)[:, None], torch.arange(width)[None, :]

    def bf16(*shape):
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    return dict(hidden_states=bf16(batch, height * width, 16), encoder_hidden_states=bf16(batch, text, 64),
                pooled_projections=bf16(batch, 64), timestep=torch.tensor([0.25, 0.8]).to(torch.bfloat16),
                img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(text, 3),
                guidance=torch.tensor([3.5, 1.0]).to(torch.bfloat16))


def save_random_flux(directory):
    """Save a random tiny Flux transformer (weights ~N(0, 0.2)) with diffusers in bf16."""
    ref = diffusers.FluxTransformer2DModel(**TINY_FLUX)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    ref.to(torch.bfloat16).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """(checkpoint dir, inputs, bf16 output) of a random tiny Flux transformer saved by diffusers."""
    directory = save_random_flux(tmp_path_factory.mktemp("flux"))
    base = FluxTransformer2DModel.from_pretrained(directory, torch_dtype=torch.bfloat16)
    inputs = _flux_inputs()
    with torch.no_grad():
        return directory, inputs, base(**inputs).sample, base.get_memory_footprint()


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


@pytest.mark.parametrize("quant_type", ["int8wo", "int8dq"])
def test_flux_quantized_on_load(flux, tmp_path, quant_type):
    directory, inputs, ref, ref_bytes = flux
    model = FluxTransformer2DModel.from_pretrained(directory, torch_dtype=torch.bfloat16,
                                                   quantization_config=TorchAoConfig(quant_type))
    assert isinstance(model.single_transformer_blocks[0].proj_out, QuantizedLinear)
    y = _run(model, inputs)
    assert ((y.float() - ref.float()).norm() / ref.float().norm()).item() < FLUX_TOL
    assert model.get_memory_footprint() <= 0.6 * ref_bytes
    model.save_pretrained(tmp_path / "one")
    assert torch.equal(_run(FluxTransformer2DModel.from_pretrained(tmp_path / "one"), inputs), y)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    assert torch.equal(_run(FluxTransformer2DModel.from_pretrained(tmp_path / "sharded"), inputs), y)


def test_flux_int8wo_matches_diffusers_torchao(flux, tmp_path):
    directory, inputs, _, _ = flux
    int8wo = diffusers.TorchAoConfig(tq.Int8WeightOnlyConfig())
    theirs = diffusers.FluxTransformer2DModel.from_pretrained(directory, torch_dtype=torch.bfloat16,
                                                              quantization_config=int8wo)
    ours = FluxTransformer2DModel.from_pretrained(directory, torch_dtype=torch.bfloat16,
                                                  quantization_config=TorchAoConfig("int8wo"))
    y = _run(theirs, inputs)
    assert torch.equal(_run(ours, inputs), y)  # same integers, same scales, same ops
    theirs.save_pretrained(tmp_path)  # and diffusers' own torchao checkpoint loads to the same numbers
    assert torch.equal(_run(FluxTransformer2DModel.from_pretrained(tmp_path), inputs), y)
