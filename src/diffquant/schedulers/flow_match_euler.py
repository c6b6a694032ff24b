"""FlowMatchEulerDiscreteScheduler: Euler steps along a rectified-flow path, as diffusers 0.42.1.

Sigmas and timesteps are computed with the same numpy/torch operations in the same order as
diffusers, so a schedule (and every step) is bit-identical. All of diffusers' config arguments
are accepted so its ``scheduler_config.json`` files load unchanged.

Example:
    >>> import torch
    >>> from diffquant import FlowMatchEulerDiscreteScheduler
    >>> s = FlowMatchEulerDiscreteScheduler(shift=3.0)
    >>> s.set_timesteps(4)
    >>> [round(float(t), 1) for t in s.timesteps]
    [1000.0, 857.7, 602.2, 8.9]
    >>> x = torch.zeros(1, 4, 8)
    >>> s.step(torch.ones_like(x), s.timesteps[0], x).prev_sample.shape
    torch.Size([1, 4, 8])
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..configuration import ConfigMixin, register_to_config
from ..errors import ConfigError
from ..outputs import BaseOutput


@dataclass
class FlowMatchEulerDiscreteSchedulerOutput(BaseOutput):
    """``prev_sample``: the sample at the next (less noisy) sigma, same shape as the input."""

    prev_sample: torch.Tensor


class FlowMatchEulerDiscreteScheduler(ConfigMixin):
    """Euler sampler for flow-matching models (Flux, SD3), with static or dynamic shifting."""

    config_name = "scheduler_config.json"
    order = 1
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0,
                 use_dynamic_shifting: bool = False, base_shift: float | None = 0.5,
                 max_shift: float | None = 1.15, base_image_seq_len: int = 256,
                 max_image_seq_len: int = 4096, invert_sigmas: bool = False,
                 shift_terminal: float | None = None, use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 time_shift_type: str = "exponential", stochastic_sampling: bool = False):
        if use_karras_sigmas + use_exponential_sigmas + use_beta_sigmas > 1:
            raise ConfigError("FlowMatchEulerDiscreteScheduler: only one of use_karras_sigmas, "
                              "use_exponential_sigmas, use_beta_sigmas can be true")
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) \
                or not 1 <= num_train_timesteps <= 1_000_000:  # an array of this length is built
            raise ConfigError(f"FlowMatchEulerDiscreteScheduler: num_train_timesteps="
                              f"{num_train_timesteps!r}; expected an int in [1, 1000000] (1000 in "
                              "diffusers' configs)")
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift):
            raise ConfigError(f"FlowMatchEulerDiscreteScheduler: shift={shift!r}; expected a finite "
                              "number")
        if time_shift_type not in ("exponential", "linear"):
            raise ConfigError(f"FlowMatchEulerDiscreteScheduler: time_shift_type={time_shift_type!r}; "
                              "expected 'exponential' or 'linear'")
        # float32 throughout, as diffusers: sigma_min/max below feed set_timesteps' linspace.
        t = torch.from_numpy(np.linspace(1, num_train_timesteps, num_train_timesteps,
                                         dtype=np.float32)[::-1].copy())
        sigmas = t / num_train_timesteps
        if not use_dynamic_shifting:
            sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        self.timesteps = sigmas * num_train_timesteps
        self.sigmas = sigmas
        self.sigma_min, self.sigma_max = self.sigmas[-1].item(), self.sigmas[0].item()
        self._shift, self._step_index, self._begin_index = shift, None, None
        self.num_inference_steps = None

    # -- state -------------------------------------------------------------------------------
    shift = property(lambda self: self._shift)
    step_index = property(lambda self: self._step_index)
    begin_index = property(lambda self: self._begin_index)

    def set_shift(self, shift: float) -> None:
        self._shift = shift

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # -- schedule ----------------------------------------------------------------------------
    def time_shift(self, mu: float, sigma: float, t):
        """Resolution-dependent shift: exponential exp(mu)/(exp(mu)+(1/t-1)^sigma) or linear."""
        if self.config.time_shift_type == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)
        return mu / (mu + (1 / t - 1) ** sigma)

    def set_timesteps(self, num_inference_steps: int | None = None, device=None,
                      sigmas: list[float] | None = None, mu: float | None = None,
                      timesteps: list[float] | None = None) -> None:
        """Compute ``self.sigmas`` (steps + 1, ending at 0) and ``self.timesteps`` (steps)."""
        cfg, n_train = self.config, self.config.num_train_timesteps
        if cfg.use_dynamic_shifting and mu is None:
            raise ConfigError("set_timesteps: mu is required when use_dynamic_shifting is true "
                              "(FluxPipeline computes it with calculate_shift)")
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise ValueError("set_timesteps: sigmas and timesteps should have the same length")
        if num_inference_steps is None:
            num_inference_steps = len(sigmas) if sigmas is not None else len(timesteps)
        elif any(x is not None and len(x) != num_inference_steps for x in (sigmas, timesteps)):
            raise ValueError("set_timesteps: sigmas/timesteps should have num_inference_steps entries")
        given_t = None if timesteps is None else np.array(timesteps).astype(np.float32)
        if sigmas is None:
            t = given_t if given_t is not None else np.linspace(
                self.sigma_max * n_train, self.sigma_min * n_train, num_inference_steps)
            sigmas = t / n_train
        else:
            sigmas = np.array(sigmas).astype(np.float32)
            num_inference_steps = len(sigmas)
        self.num_inference_steps = num_inference_steps
        if cfg.use_dynamic_shifting:
            sigmas = self.time_shift(mu, 1.0, sigmas)
        else:
            sigmas = self.shift * sigmas / (1 + (self.shift - 1) * sigmas)
        if cfg.shift_terminal:
            one_minus = 1 - sigmas
            sigmas = 1 - one_minus / (one_minus[-1] / (1 - cfg.shift_terminal))
        sigmas = self._respace(sigmas, num_inference_steps)
        sigmas = torch.from_numpy(sigmas).to(dtype=torch.float32, device=device)
        timesteps = sigmas * n_train if given_t is None else \
            torch.from_numpy(given_t).to(dtype=torch.float32, device=device)
        end = torch.zeros(1, device=sigmas.device)
        if cfg.invert_sigmas:
            sigmas = 1.0 - sigmas
            timesteps, end = sigmas * n_train, torch.ones(1, device=sigmas.device)
        self.timesteps, self.sigmas = timesteps, torch.cat([sigmas, end])
        self._step_index, self._begin_index = None, None

    def _respace(self, sigmas: np.ndarray, n: int) -> np.ndarray:
        """Karras / exponential / beta spacing between the schedule's end points, if configured."""
        cfg = self.config
        lo, hi = float(sigmas[-1]), float(sigmas[0])
        if cfg.use_karras_sigmas:
            rho = 7.0
            ramp = np.linspace(0, 1, n)
            return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        if cfg.use_exponential_sigmas:
            return np.exp(np.linspace(math.log(hi), math.log(lo), n))
        if cfg.use_beta_sigmas:
            import scipy.stats  # only this option needs scipy, as in diffusers

            ppf = [scipy.stats.beta.ppf(t, 0.6, 0.6) for t in 1 - np.linspace(0, 1, n)]
            return np.array([lo + p * (hi - lo) for p in ppf])
        return sigmas

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        """Position of ``timestep`` in the schedule (the second match if it repeats, as diffusers)."""
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        indices = (schedule == timestep).nonzero()
        return indices[1 if len(indices) > 1 else 0].item()

    def _current_index(self, timestep) -> int:
        if self._step_index is None:
            if self._begin_index is not None:
                self._step_index = self._begin_index
            else:
                if isinstance(timestep, torch.Tensor):
                    timestep = timestep.to(self.timesteps.device)
                self._step_index = self.index_for_timestep(timestep)
        return self._step_index

    # -- sampling ----------------------------------------------------------------------------
    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor) -> torch.Tensor:
        """Forward process: sigma * noise + (1 - sigma) * sample, sigma looked up per timestep."""
        sigmas = self.sigmas.to(device=sample.device, dtype=sample.dtype)
        schedule, timestep = self.timesteps.to(sample.device), timestep.to(sample.device)
        if self._begin_index is None:
            idx = [self.index_for_timestep(t, schedule) for t in timestep]
        else:
            idx = [self._step_index if self._step_index is not None else self._begin_index] * \
                timestep.shape[0]
        sigma = sigmas[idx].flatten()
        sigma = sigma.reshape(sigma.shape + (1,) * (sample.ndim - 1))  # [B, 1, ...]
        return sigma * noise + (1.0 - sigma) * sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True, **unused):
        """One Euler step x + (sigma_next - sigma) * v, computed in float32.

        ``timestep`` is an entry of ``self.timesteps`` (not an index). Extra diffusers arguments
        (s_churn, s_tmin, s_tmax, s_noise) do not affect this scheduler and are accepted.
        """
        if unused.get("per_token_timesteps") is not None:  # it would change the step: say so
            raise ValueError("FlowMatchEulerDiscreteScheduler.step: per_token_timesteps is not "
                             "supported (Flux steps every token at one timestep); drop it")
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor)
                                         and not timestep.is_floating_point()):
            raise ValueError("FlowMatchEulerDiscreteScheduler.step: pass one of scheduler.timesteps "
                             "as timestep, not an integer index")
        i = self._current_index(timestep)
        sample = sample.to(torch.float32)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        if self.config.stochastic_sampling:
            x0 = sample - sigma * model_output
            noise = torch.randn(sample.shape, generator=generator, dtype=sample.dtype,
                                device=generator.device if generator is not None else sample.device)
            prev = (1.0 - sigma_next) * x0 + sigma_next * noise.to(sample.device)
        else:
            prev = sample + (sigma_next - sigma) * model_output
        self._step_index += 1
        prev = prev.to(model_output.dtype)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    # -- files -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None, **kwargs):
        """Load ``scheduler_config.json`` from a directory or hub id.

        Example:
            >>> s = FlowMatchEulerDiscreteScheduler.from_pretrained("pipe", subfolder="scheduler")  # doctest: +SKIP
        """
        from ..hub import split_hub_kwargs

        config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder,
                                 **split_hub_kwargs(kwargs))
        try:
            return cls.from_config(config, **kwargs)
        except (ConfigError, TypeError, ValueError) as err:  # name the file it came from
            where = Path(os.fspath(pretrained_model_name_or_path), subfolder or "", cls.config_name)
            raise ConfigError(f"{where}: {err}") from None

    def save_pretrained(self, save_directory, **unused) -> None:
        """Write ``scheduler_config.json`` into ``save_directory``."""
        self.save_config(save_directory)
