"""Components resident only while their phase runs, under a memory budget.

``FluxPipeline.from_pretrained(path, max_memory="16GB")`` attaches a ``Residency``: the text
encoders are loaded for encoding, the transformer for denoising, each (re)loaded from its
folder by the pipeline's own loader the first time the pipeline touches it, after the
components of the other phases are dropped and their memory handed back. The VAE stays; its
decode is tiled when the whole image's activations would not fit what is left of the budget.
A pre-quantized folder reloads at the loader's speed; the same weights give the same bits, so
a run under a budget equals an always-resident one.

Example:
    >>> from diffquant import FluxPipeline
    >>> pipe = FluxPipeline.from_pretrained("pipe-q4/", max_memory="8GB")   # doctest: +SKIP
    >>> image = pipe("a cat", num_inference_steps=2).images[0]            # doctest: +SKIP
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

from ..errors import ConfigError
from . import memory
from .memory import gb

logger = logging.getLogger(__name__)

TILES = (512, 256, 128)  # pixel tiles tried, largest first, when a whole decode does not fit


def phase_of(name: str) -> str | None:
    """The phase a component is needed for, None for one that stays resident."""
    if name.startswith("text_encoder"):
        return "encode"
    if name.startswith(("transformer", "unet")):
        return "denoise"
    return None


class Residency:
    """Loads a pipeline's phase components on first touch and drops the other phases' first.

    ``loader(name)`` loads one component from its folder; ``folders`` and ``dtypes`` size them
    (memory.loaded_bytes) so a component that cannot fit the budget is refused before loading.
    """

    def __init__(self, pipe, budget: int, loader: Callable[[str], torch.nn.Module],
                 folders: dict[str, Path], dtypes: dict[str, torch.dtype | None]):
        self.pipe, self.budget, self.loader = pipe, budget, loader
        self.names = [n for n in folders if phase_of(n) is not None]
        self.sizes = {n: memory.loaded_bytes(folders[n], dtypes.get(n))[0] for n in self.names}
        self.loads = {n: 0 for n in self.names}  # how often each was (re)loaded

    def resident(self) -> list[str]:
        return [n for n in self.names if self.pipe.__dict__.get(n) is not None]

    def load(self, name: str) -> torch.nn.Module:
        """``name`` loaded (the other phases' components dropped first)."""
        self._leave_all_but(phase_of(name))
        free = self.budget - memory.resident_bytes()
        if self.sizes[name] > free:
            raise ConfigError(
                f"max_memory={gb(self.budget)}: component {name!r} takes {gb(self.sizes[name])} "
                f"loaded and only {gb(max(free, 0))} of the budget is free; quantize it "
                "(diffquant plan SRC --max-memory ... picks schemes that fit) or raise max_memory")
        logger.info("budget: loading %s (%s)", name, gb(self.sizes[name]))
        module = self.loader(name)
        self.pipe.__dict__[name] = module
        self.loads[name] += 1
        return module

    def enter(self, module: torch.nn.Module) -> None:
        """The pipeline is about to run ``module``: drop the components other phases need."""
        name = next((n for n, m in self.pipe.__dict__.items() if m is module), None)
        if name is not None and name not in self.names:
            self._leave_all_but("decode" if name == "vae" else None)
        elif name is not None:
            self._leave_all_but(phase_of(name))

    def _leave_all_but(self, phase: str | None) -> None:
        dropped = [n for n in self.resident() if phase_of(n) != phase]
        for n in dropped:
            logger.info("budget: dropping %s", n)
            del self.pipe.__dict__[n]
        if dropped:
            memory.release_memory()

    # -- the VAE -------------------------------------------------------------------------------
    def guard_decode(self, vae, vae_folder: Path, dtype: torch.dtype | None) -> None:
        """Wrap ``vae.decode``: before each decode, tile it when the whole image would not fit."""
        original = vae.decode
        itemsize = torch.empty((), dtype=dtype or torch.float32).element_size()
        scale = 2 ** (len(vae.config.block_out_channels) - 1)

        def decode(z, *args, **kwargs):
            batch, _, h, w = z.shape
            self._choose_tiles(vae, vae_folder, batch if not vae.use_slicing else 1,
                               h * scale, w * scale, itemsize)
            return original(z, *args, **kwargs)

        vae.decode = decode

    def _choose_tiles(self, vae, folder, batch, height, width, itemsize) -> None:
        self._leave_all_but("decode")
        free = self.budget - memory.resident_bytes()
        if memory.decode_activations(folder, height, width, batch, itemsize) <= free:
            return
        for tile in TILES:
            if memory.decode_activations(folder, height, width, batch, itemsize, tile) <= free \
                    or tile == TILES[-1]:
                break
        logger.info("budget: VAE decode of %dx%d tiled in %d px tiles", height, width, tile)
        vae.enable_tiling()
        vae.tile_sample_min_size = tile
        vae.tile_latent_min_size = tile // (2 ** (len(vae.config.block_out_channels) - 1))


def attach(pipe, max_memory, loader: Callable[[str], torch.nn.Module], folders: dict[str, Path],
           dtypes: dict[str, torch.dtype | None]) -> Residency:
    """Put ``pipe``'s phase components under ``max_memory``; returns the Residency.

    The phase components must not be loaded yet (their attributes are None or absent). On an
    accelerator the components are placed as ``enable_model_cpu_offload`` places them instead.
    """
    budget = memory.parse_memory(max_memory)
    residency = Residency(pipe, budget, loader, folders, dtypes)
    base = memory.resident_bytes()
    for name, size in residency.sizes.items():
        if base + size > budget:
            need = base + max(residency.sizes.values())
            raise ConfigError(
                f"max_memory={gb(budget)}: component {name!r} alone takes {gb(size)} loaded, "
                f"beyond the budget with this process's {gb(base)}; these folders need at least "
                f"{gb(need)} (plus activations): quantize them (diffquant plan SRC --max-memory "
                f"{gb(budget).replace(' ', '')} picks schemes that fit) or raise max_memory")
    for name in residency.names:
        pipe.__dict__.pop(name, None)
    if getattr(pipe, "vae", None) is not None and "vae" in folders:
        residency.guard_decode(pipe.vae, folders["vae"], dtypes.get("vae"))
    pipe._residency = residency
    return residency


def _accelerator():
    return torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None


def deferred_components(classes: dict) -> set[str]:
    """The components a budget loads on first need (none on an accelerator: there the host
    keeps them all and model CPU offload moves one at a time)."""
    if _accelerator() is not None:
        return set()
    return {n for n, c in classes.items()
            if c is not None and issubclass(c, torch.nn.Module) and phase_of(n) is not None}


def attach_to_pipeline(pipe, max_memory, root: Path, index_path: Path, classes: dict,
                       deferred: set[str], load_kwargs: dict):
    """from_pretrained's ``max_memory``: a Residency loading ``deferred`` components through
    the pipeline's own loader (pipeline_components.load_component), or, on an accelerator,
    ``enable_model_cpu_offload``."""
    from ..hub import resolve_dir
    from ..pipeline_components import component_dtype, load_component

    memory.parse_memory(max_memory)  # a bad value fails the same everywhere
    if not deferred:
        pipe.enable_model_cpu_offload()
        return None

    def loader(name: str):  # by the pipeline's name: the load's root is a handle closed since
        return load_component(resolve_dir(pipe.name_or_path), index_path, name, classes[name],
                              load_kwargs)

    folders = {n: Path(root) / n for n in deferred}
    if "vae" in classes and (Path(root) / "vae").is_dir():
        folders["vae"] = Path(root) / "vae"
    dtypes = {n: component_dtype(load_kwargs["torch_dtype"], n) for n in folders}
    return attach(pipe, max_memory, loader, folders, dtypes)
