"""T5 encoders in GGUF files, as ComfyUI-GGUF and stable-diffusion.cpp users load them.

city96's ``t5-v1_1-xxl-encoder-gguf`` files and their kin are written by llama.cpp's converter:
architecture ``t5encoder`` (or ``t5``), llama.cpp's tensor names (``token_embd.weight``,
``enc.blk.N.attn_q.weight`` ... ``enc.blk.0.attn_rel_b.weight``, ``enc.blk.N.ffn_gate/ffn_up/
ffn_down.weight``, ``enc.output_norm.weight``) and the hyper-parameters as ``t5encoder.*``
metadata. ``load_t5_encoder_gguf`` builds transformers' ``T5EncoderModel`` from the file alone
(the config from that metadata, checked against the tensor shapes) and keeps every weight as the
file stores it, in diffquant's GGUF layers: ``GGUFLinear`` for the projections, ``GGUFEmbedding``
for the vocabulary (a lookup decodes only the rows it picks). transformers' own GGUF support
dequantizes everything to full size, and builds a gated-*ReLU* feed-forward for these files;
llama.cpp, ComfyUI and the T5 v1.1 checkpoints gate with GELU (tanh form, transformers'
``gelu_new``) whenever ``ffn_gate`` is present, and so does this loader.

``export_t5_gguf`` writes a T5 encoder the same way (llama.cpp's recipes: ``token_embd`` Q6_K,
``attn_v``/``ffn_down`` upgrades in the mixtures, ``attn_rel_b`` never quantized). GGUF has no key
for ``relative_attention_max_distance`` (llama.cpp uses 128, as T5 does); another value is
written as ``diffquant.t5.relative_attention_max_distance``, which only diffquant reads.

Example:
    >>> import torch
    >>> from diffquant import FluxPipeline, default_pipeline_path
    >>> from diffquant.t5_gguf import load_t5_encoder_gguf
    >>> t5 = load_t5_encoder_gguf("t5-v1_1-xxl-encoder-Q8_0.gguf",             # doctest: +SKIP
    ...                           torch_dtype=torch.bfloat16)
    >>> pipe = FluxPipeline.from_pretrained("flux-dir", text_encoder_2=t5)       # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError, ConfigError
from .gguf_file import GGUFFile

ARCHS = ("t5encoder", "t5")
MAX_DISTANCE_KEY = "diffquant.t5.relative_attention_max_distance"
LLAMA_MAX_DISTANCE = 128  # llama.cpp's fixed relative position range, T5's default too
# GGUF metadata (after "<arch>.") -> T5Config field; llama.cpp's T5 converter writes these
_CONFIG_KEYS = {"embedding_length": "d_model", "feed_forward_length": "d_ff",
                "block_count": "num_layers", "attention.head_count": "num_heads",
                "attention.key_length": "d_kv", "attention.relative_buckets_count":
                "relative_attention_num_buckets", "attention.layer_norm_epsilon": "layer_norm_epsilon",
                "attention.layer_norm_rms_epsilon": "layer_norm_epsilon",
                "context_length": "n_positions", "vocab_size": "vocab_size"}


def gguf_names(num_layers: int) -> dict[str, str]:
    """transformers' T5 encoder key -> llama.cpp's name, from gguf-py's own tensor map."""
    import gguf

    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, num_layers)
    stems = ["shared", "encoder.final_layer_norm"]
    for i in range(num_layers):
        b = f"encoder.block.{i}.layer."
        stems += [f"{b}0.SelfAttention.{p}" for p in "qkvo"] + [f"{b}0.layer_norm", f"{b}1.layer_norm"]
        stems += [f"{b}1.DenseReluDense.{p}" for p in ("wi", "wi_0", "wi_1", "wo")]
    stems.append("encoder.block.0.layer.0.SelfAttention.relative_attention_bias")
    return {f"{s}.weight": f"{table.get_name(s)}.weight" for s in stems if table.get_name(s)}


def is_t5_gguf(path) -> bool:
    """Whether ``path`` is a GGUF file of a T5 (encoder) model."""
    with GGUFFile(path) as f:
        return f.metadata.get("general.architecture") in ARCHS


def t5_config_from_gguf(f: GGUFFile):
    """transformers' T5Config of a llama.cpp-style T5 GGUF file: metadata first, then shapes."""
    from transformers import T5Config

    arch = f.metadata.get("general.architecture")
    if arch not in ARCHS:
        raise ConfigError(f"{f.path}: general.architecture is {arch!r}; a T5 encoder file has "
                          f"one of {list(ARCHS)}")
    meta = {field: f.metadata[f"{arch}.{key}"] for key, field in _CONFIG_KEYS.items()
            if f"{arch}.{key}" in f.metadata}

    def shape(name):
        if name not in f.tensors:
            raise CheckpointError(f"{f.path}: tensor {name!r} is missing; not a llama.cpp T5 encoder")
        return f.tensors[name].shape

    vocab, d_model = shape("token_embd.weight")
    buckets, heads = shape("enc.blk.0.attn_rel_b.weight")
    inferred = dict(vocab_size=vocab, d_model=d_model, relative_attention_num_buckets=buckets,
                    num_heads=heads, d_kv=shape("enc.blk.0.attn_q.weight")[0] // heads,
                    d_ff=shape("enc.blk.0.ffn_up.weight")[0],
                    num_layers=len({n.split(".")[2] for n in f.tensors if n.startswith("enc.blk.")}))
    for field, value in inferred.items():
        if field in meta and int(meta[field]) != value:
            raise CheckpointError(f"{f.path}: metadata says {field}={meta[field]} but the tensors "
                                  f"say {value}; the file is inconsistent")
    eps = float(f"{float(meta.get('layer_norm_epsilon', 1e-6)):.6g}")  # stored as float32
    gated = "enc.blk.0.ffn_gate.weight" in f.tensors
    return T5Config(**inferred, layer_norm_epsilon=eps, n_positions=int(meta.get("n_positions", 512)),
                    relative_attention_max_distance=int(f.metadata.get(MAX_DISTANCE_KEY,
                                                                       LLAMA_MAX_DISTANCE)),
                    feed_forward_proj="gated-gelu" if gated else "relu", is_encoder_decoder=False,
                    use_cache=False, architectures=["T5EncoderModel"])


def _patch_feed_forward(model: nn.Module) -> None:
    """T5's feed-forward without its cast of the activations to ``wo.weight.dtype`` (a GGUF
    layer's weight is uint8 blocks; the layer casts to its compute dtype itself)."""
    from transformers.models.t5.modeling_t5 import T5DenseActDense, T5DenseGatedActDense

    class GatedFF(T5DenseGatedActDense):
        def forward(self, hidden_states):
            hidden = self.act(self.wi_0(hidden_states)) * self.wi_1(hidden_states)
            return self.wo(self.dropout(hidden))

    class DenseFF(T5DenseActDense):
        def forward(self, hidden_states):
            return self.wo(self.dropout(self.act(self.wi(hidden_states))))

    for module in model.modules():
        if type(module) is T5DenseGatedActDense:
            module.__class__ = GatedFF
        elif type(module) is T5DenseActDense:
            module.__class__ = DenseFF


class T5GGUFState:
    """Stands in ``model.hf_quantizer`` of a GGUF T5 encoder: names the scheme, refuses
    transformers' save_pretrained (which cannot write GGUF layers) and dequantizes."""

    is_serializable = False

    def __init__(self, quantization_config):
        self.quantization_config = quantization_config

    def scheme_name(self) -> str:
        return "gguf (T5 encoder file)"

    def dequantize(self, model: nn.Module, dtype=None) -> nn.Module:
        from .quantizers.base import DiffusersQuantizer
        from .quantizers.gguf import GGUFEmbedding, GGUFQuantizer

        # the base swap (GGUFQuantizer's own reads a diffusers config for the dtype)
        DiffusersQuantizer.dequantize(GGUFQuantizer(self.quantization_config), model)
        emb = model.get_input_embeddings()
        if isinstance(emb, GGUFEmbedding):
            plain = nn.Embedding(emb.num_embeddings, emb.embedding_dim, device="meta")
            plain.weight = nn.Parameter(emb.dequantized_weight().to(dtype or model.dtype),
                                        requires_grad=False)
            model.set_input_embeddings(plain)
        model.hf_quantizer = None
        return model


def load_t5_encoder_gguf(path: str | os.PathLike, torch_dtype: torch.dtype = torch.float32,
                         compute_dtype: torch.dtype | None = None, dequantize: bool = False):
    """transformers' T5EncoderModel from a llama.cpp-style T5 GGUF file, no config needed.

    Weights stay as the file holds them (GGUF layers, ``compute_dtype``, default
    ``torch_dtype``); norms and the relative attention bias are ``torch_dtype``. With
    ``dequantize=True`` the result is a plain T5EncoderModel in ``torch_dtype``.

    Example:
        >>> t5 = load_t5_encoder_gguf("t5-Q8_0.gguf", torch_dtype=torch.bfloat16)   # doctest: +SKIP
    """
    from transformers import T5EncoderModel

    from .quantizers.gguf import GGUFEmbedding, GGUFQuantizationConfig, GGUFQuantizer

    compute_dtype = compute_dtype or torch_dtype
    with GGUFFile(path) as f:
        config = t5_config_from_gguf(f)
        with torch.device("meta"):
            model = T5EncoderModel(config)
        quant_config = GGUFQuantizationConfig(compute_dtype)
        GGUFQuantizer(quant_config).preprocess_model(model)
        _patch_feed_forward(model)
        with torch.device("meta"):
            model.set_input_embeddings(GGUFEmbedding(config.vocab_size, config.d_model, compute_dtype))
        _load_tensors(model, f, torch_dtype)
    if compute_dtype == torch.float16:  # transformers keeps T5's wo in float32 (fp16 overflows)
        for block in model.encoder.block:
            block.layer[1].DenseReluDense.wo.compute_dtype = torch.float32
    model.hf_quantizer = T5GGUFState(quant_config)
    if dequantize:
        model.hf_quantizer.dequantize(model, torch_dtype)
        model.to(torch_dtype)
    return model.eval()


def _load_tensors(model: nn.Module, f: GGUFFile, torch_dtype) -> None:
    from .quantizers.base import owner_of
    from .quantizers.gguf import GGUFEmbedding, GGUFLinear

    names = {g: h for h, g in gguf_names(model.config.num_layers).items()}
    unexpected = [n for n in f.tensors if n not in names]
    if unexpected:
        raise CheckpointError(f"{f.path}: tensors {unexpected[:5]} are not part of a T5 encoder "
                              f"with {model.config.num_layers} blocks")
    for name, info in f.tensors.items():
        key = names[name]
        module, leaf = owner_of(model, key)
        if isinstance(module, GGUFLinear):
            module.load_piece("weight", f.read(name), pre_quantized=True, dtype=None, device=None)
            module.load_piece("weight_qtype", torch.tensor(int(info.qtype), dtype=torch.int32),
                              pre_quantized=True, dtype=None, device=None)
            module.check_loaded(key.rpartition(".")[0])
            continue
        if isinstance(module, GGUFEmbedding):
            module.load_blocks(f.read(name), info.qtype)
            continue
        old = getattr(module, leaf)
        if tuple(old.shape) != info.shape:
            raise CheckpointError(f"{f.path}: tensor {name!r} has shape {list(info.shape)} but "
                                  f"{key} expects {list(old.shape)}")
        setattr(module, leaf, nn.Parameter(f.read_dequantized(name, torch_dtype), requires_grad=False))
    missing = [n for n, t in model.named_parameters() if t.is_meta]
    missing += [n for n, m in model.named_modules() if isinstance(m, (GGUFLinear, GGUFEmbedding))
                and m.qtype is None]
    if missing:
        raise CheckpointError(f"{f.path}: missing tensors for {missing[:10]}; not a complete T5 encoder")


def export_t5_gguf(model: nn.Module, path, qtype=None, *, recipe: str | None = None,
                   overrides=None, float_type="BF16", progress: bool = False) -> Path:
    """Write a transformers T5EncoderModel as a llama.cpp-style T5 encoder GGUF file.

    Arguments as ``gguf_export.export_gguf``; the recipes follow llama.cpp's T5 rules.

    Example:
        >>> export_t5_gguf(pipe.text_encoder_2, "t5-Q8_0.gguf", "Q8_0")          # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    from .gguf_export import GGUF_QUANT_VERSION, _encode, _shape, model_sources
    from .gguf_file import write_gguf
    from .gguf_recipes import plan_types, resolve_recipe

    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in ("t5", "umt5") or getattr(config, "is_decoder", False):
        raise ConfigError(f"export_t5_gguf: expected a T5 encoder, got {type(model).__name__}")
    chosen = resolve_recipe(qtype, recipe)
    names = gguf_names(config.num_layers)
    sources = {names[k]: s for k, s in model_sources(model).items() if k in names}
    entries = [(name, (hf,), _shape(sources[name])) for hf, name in names.items() if name in sources]
    types = plan_types(entries, chosen, "t5", overrides, float_type)
    tensors = {}
    for name, _, _ in tqdm(entries, desc="quantizing", unit="tensor", disable=not progress):
        tensors[name] = _encode(sources[name], types[name])
    arch = "t5encoder"
    metadata = {"general.quantization_version": GGUF_QUANT_VERSION,
                "general.file_type": chosen.file_type,
                f"{arch}.context_length": int(getattr(config, "n_positions", None) or 512),
                f"{arch}.embedding_length": config.d_model, f"{arch}.feed_forward_length": config.d_ff,
                f"{arch}.block_count": config.num_layers, f"{arch}.attention.head_count": config.num_heads,
                f"{arch}.attention.key_length": config.d_kv, f"{arch}.attention.value_length": config.d_kv,
                f"{arch}.attention.layer_norm_epsilon": float(config.layer_norm_epsilon),
                f"{arch}.attention.layer_norm_rms_epsilon": float(config.layer_norm_epsilon),
                f"{arch}.attention.relative_buckets_count": config.relative_attention_num_buckets,
                f"{arch}.vocab_size": config.vocab_size}
    if config.relative_attention_max_distance != LLAMA_MAX_DISTANCE:
        metadata[MAX_DISTANCE_KEY] = config.relative_attention_max_distance
    return write_gguf(path, tensors, arch=arch, metadata=metadata, progress=progress)


__all__ = ["export_t5_gguf", "gguf_names", "is_t5_gguf", "load_t5_encoder_gguf", "t5_config_from_gguf"]
