"""LoRA adapters on diffquant's models, quantized or not, with diffusers' API.

``formats`` / ``kohya``: the files people share -> one internal form; ``layer``: the low-rank
branch beside a linear layer; ``fuse``: merging into a (quantized) weight and undoing it;
``model``: the model methods (``load_lora_adapter``, ``set_adapters``, ``fuse_lora`` ...);
``pipeline``: the pipeline methods (``load_lora_weights`` ...); ``text_encoder``: CLIP's
adapters through PEFT; ``files``: reading and writing LoRA files.
"""

from .formats import LoraWeight, convert, to_diffusers
from .model import LoraModelMixin, apply_lora_scale

__all__ = ["LoraModelMixin", "LoraWeight", "apply_lora_scale", "convert", "to_diffusers"]
