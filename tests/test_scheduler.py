"""FlowMatchEulerDiscreteScheduler against diffusers 0.42.1: schedules, steps, config files."""

import json

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler as RefScheduler

from diffquant import ConfigError, FlowMatchEulerDiscreteScheduler

SETTINGS = [
    ({}, {"num_inference_steps": 4}),
    ({"shift": 3.0}, {"num_inference_steps": 7}),
    ({"use_dynamic_shifting": True, "shift": 3.0}, {"num_inference_steps": 4, "mu": 0.83}),
    ({"use_dynamic_shifting": True}, {"sigmas": list(np.linspace(1.0, 1 / 5, 5)), "mu": 1.1}),
    ({"use_dynamic_shifting": True, "time_shift_type": "linear"},
     {"num_inference_steps": 3, "mu": 0.9}),
    ({"shift": 2.0}, {"timesteps": [900.0, 500.0, 100.0]}),
    ({"shift": 2.0}, {"sigmas": [1.0, 0.6, 0.2], "timesteps": [999.0, 555.0, 111.0]}),
    ({"shift_terminal": 0.1, "shift": 3.0}, {"num_inference_steps": 6}),
    ({"invert_sigmas": True}, {"num_inference_steps": 5}),
    ({"use_karras_sigmas": True, "shift": 3.0}, {"num_inference_steps": 6}),
    ({"use_exponential_sigmas": True, "shift": 3.0}, {"num_inference_steps": 6}),
    ({"use_beta_sigmas": True, "shift": 3.0}, {"num_inference_steps": 6}),
]


@pytest.mark.parametrize("config,call", SETTINGS)
def test_schedule_equals_diffusers(config, call):
    ours, ref = FlowMatchEulerDiscreteScheduler(**config), RefScheduler(**config)
    assert torch.equal(ours.sigmas, ref.sigmas) and torch.equal(ours.timesteps, ref.timesteps)
    ours.set_timesteps(**call)
    ref.set_timesteps(**call)
    assert ours.num_inference_steps == ref.num_inference_steps
    torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=0, atol=0)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=0)


@pytest.mark.parametrize("config,call", SETTINGS[:4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("begin_index", [None, 0])
def test_steps_equal_diffusers(config, call, dtype, begin_index):
    ours, ref = FlowMatchEulerDiscreteScheduler(**config), RefScheduler(**config)
    ours.set_timesteps(**call)
    ref.set_timesteps(**call)
    if begin_index is not None:
        ours.set_begin_index(begin_index)
        ref.set_begin_index(begin_index)
    g = torch.Generator().manual_seed(0)
    x = y = torch.randn(2, 16, 8, generator=g).to(dtype)
    for t in ours.timesteps:
        v = torch.randn(2, 16, 8, generator=g).to(dtype)
        x = ours.step(v, t, x).prev_sample
        y = ref.step(v, t, y, return_dict=False)[0]
        assert x.dtype == y.dtype == dtype
        assert torch.equal(x, y)
    assert ours.step_index == ref.step_index


def test_stochastic_step_equals_diffusers():
    ours = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True, shift=3.0)
    ref = RefScheduler(stochastic_sampling=True, shift=3.0)
    ours.set_timesteps(3)
    ref.set_timesteps(3)
    x = y = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(1))
    for t in ours.timesteps:
        v = torch.ones_like(x)
        x = ours.step(v, t, x, generator=torch.Generator().manual_seed(2))[0]
        y = ref.step(v, t, y, generator=torch.Generator().manual_seed(2))[0]
        assert torch.equal(x, y)


def test_scale_noise_equals_diffusers():
    ours, ref = FlowMatchEulerDiscreteScheduler(shift=3.0), RefScheduler(shift=3.0)
    ours.set_timesteps(5)
    ref.set_timesteps(5)
    sample, noise = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    t = ours.timesteps[[1, 3]]
    assert torch.equal(ours.scale_noise(sample, t, noise), ref.scale_noise(sample, t, noise))


def test_step_refuses_integer_index():
    s = FlowMatchEulerDiscreteScheduler()
    s.set_timesteps(2)
    with pytest.raises(ValueError, match="not an integer index"):
        s.step(torch.zeros(1), 0, torch.zeros(1))


def test_step_takes_diffusers_extra_arguments_and_refuses_per_token_timesteps():
    s = FlowMatchEulerDiscreteScheduler()
    s.set_timesteps(2)
    t = s.timesteps[0]
    plain = s.step(torch.ones(3), t, torch.zeros(3), return_dict=False)[0]
    s.set_timesteps(2)
    extra = s.step(torch.ones(3), t, torch.zeros(3), s_churn=0.5, s_noise=2.0,
                   return_dict=False)[0]                 # no effect on this scheduler (diffusers')
    assert torch.equal(plain, extra)
    with pytest.raises(ValueError, match="per_token_timesteps is not supported"):
        s.step(torch.ones(3), s.timesteps[1], torch.zeros(3), per_token_timesteps=torch.ones(3))


def test_dynamic_shifting_needs_mu():
    with pytest.raises(ConfigError, match="mu is required"):
        FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).set_timesteps(4)


def test_bad_config_is_refused():
    with pytest.raises(ConfigError, match="time_shift_type='cubic'"):
        FlowMatchEulerDiscreteScheduler(time_shift_type="cubic")
    with pytest.raises(ConfigError, match="only one of"):
        FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True, use_beta_sigmas=True)


def test_config_files_move_both_ways(tmp_path):
    flux = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096,
            "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
            "use_dynamic_shifting": True}
    RefScheduler(**flux).save_pretrained(tmp_path / "ref" / "scheduler")
    ours = FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path / "ref", subfolder="scheduler")
    assert {k: ours.config[k] for k in flux} == flux
    ours.save_pretrained(tmp_path / "ours")
    data = json.loads((tmp_path / "ours" / "scheduler_config.json").read_text())
    assert data["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    back = RefScheduler.from_pretrained(tmp_path / "ours")
    public = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731
    assert public(back.config) == public(RefScheduler(**flux).config)
    ours.set_timesteps(3, mu=0.7)
    back.set_timesteps(3, mu=0.7)
    assert torch.equal(ours.sigmas, back.sigmas)
