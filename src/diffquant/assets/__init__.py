"""The small trained pipeline shipped with diffquant, so examples and tests run real weights offline.

``default/`` is a Flux-architecture pipeline in diffusers' layout (FluxTransformer2DModel,
AutoencoderKL with 16 latent channels, CLIP and T5 text encoders with their own tiny tokenizers,
FlowMatchEulerDiscreteScheduler), about 11 MB in float32. It draws one or two coloured circles,
squares or triangles at 64x64 from prompts such as "a red circle above a blue square" or
"a green triangle on a yellow background" (colours: red, orange, yellow, green, blue, purple,
white, black; relations: above, below, left of, right of). It was trained at 64x64 with
prompts of at most 16 tokens, so pass ``height=64, width=64, max_sequence_length=16``.
scripts/train_default.py rebuilds it; docs/samples.png shows what it draws.

Example:
    >>> import torch
    >>> from diffquant import FluxPipeline, default_pipeline_path
    >>> pipe = FluxPipeline.from_pretrained(default_pipeline_path())        # doctest: +SKIP
    >>> image = pipe("a red circle above a blue square", height=64, width=64,  # doctest: +SKIP
    ...              max_sequence_length=16, generator=torch.Generator().manual_seed(0)).images[0]
"""

from __future__ import annotations

import pathlib

from ..errors import CheckpointError

_DEFAULT = pathlib.Path(__file__).resolve().parent / "default"


def default_pipeline_path() -> pathlib.Path:
    """Directory of the shipped default pipeline (holds ``model_index.json``).

    Example:
        >>> from diffquant import default_pipeline_path
        >>> (default_pipeline_path() / "model_index.json").is_file()
        True
    """
    if not (_DEFAULT / "model_index.json").is_file():
        raise CheckpointError(f"{_DEFAULT}: the shipped default pipeline is missing (no model_index.json); "
                              "reinstall diffquant or rebuild it with scripts/train_default.py")
    return _DEFAULT
