"""Specification of the flow-matching schedule Stand-In samples with."""

import numpy as np
import pytest
import torch

from standin.errors import InvalidRequestError
from standin.scheduler import FlowMatchSchedule


def reference_sigmas(num_steps: int, shift: float, strength: float = 1.0) -> np.ndarray:
    """The schedule written out plainly in float64: num_steps + 1 levels ending at 0."""
    sigmas = []
    for i in range(num_steps + 1):
        u = strength * (1.0 - i / num_steps)  # evenly spaced from strength down to 0
        sigmas.append(shift * u / (1.0 + (shift - 1.0) * u))
    return np.array(sigmas, dtype=np.float64)


@pytest.mark.parametrize("num_steps", [1, 2, 4, 20, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 0.5])
def test_sigmas_and_timesteps_follow_the_shifted_linear_schedule(num_steps, shift):
    schedule = FlowMatchSchedule(num_steps, shift=shift, dtype=torch.float64)
    expected = reference_sigmas(num_steps, shift)
    assert schedule.sigmas.shape == (num_steps + 1,)
    assert schedule.timesteps.shape == (num_steps,)
    np.testing.assert_allclose(schedule.sigmas.numpy(), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(schedule.timesteps.numpy(), 1000.0 * expected[:-1], rtol=0, atol=1e-9)


def test_default_float32_schedule_is_close_to_float64():
    schedule = FlowMatchSchedule(20)
    assert schedule.sigmas.dtype == torch.float32
    np.testing.assert_allclose(
        schedule.timesteps.numpy(), 1000.0 * reference_sigmas(20, 5.0)[:-1], rtol=0, atol=1e-4
    )


def test_stand_in_default_schedule_known_values():
    # 20 steps, shift 5: u = 1, 0.95, ... ; s = 5u / (1 + 4u)
    schedule = FlowMatchSchedule(20, shift=5.0)
    assert schedule.timesteps[0].item() == 1000.0
    assert schedule.timesteps[1].item() == pytest.approx(1000 * 4.75 / 4.8, abs=1e-4)
    assert schedule.timesteps[-1].item() == pytest.approx(1000 * 0.25 / 1.2, abs=1e-4)
    assert schedule.sigmas[-1].item() == 0.0


def test_sigmas_decrease_strictly_to_zero():
    schedule = FlowMatchSchedule(50, shift=5.0)
    assert bool((schedule.sigmas[1:] < schedule.sigmas[:-1]).all())
    assert schedule.sigmas[0].item() == 1.0
    assert schedule.sigmas[-1].item() == 0.0


@pytest.mark.parametrize("strength", [0.3, 0.75])
def test_denoising_strength_starts_lower(strength):
    schedule = FlowMatchSchedule(10, shift=5.0, denoising_strength=strength, dtype=torch.float64)
    np.testing.assert_allclose(
        schedule.sigmas.numpy(), reference_sigmas(10, 5.0, strength), rtol=0, atol=1e-12
    )
    assert schedule.sigmas[0].item() < 1.0


def test_euler_step_matches_hand_computation():
    schedule = FlowMatchSchedule(4, shift=1.0, dtype=torch.float64)
    # shift 1 leaves the linear spacing: sigmas = 1, .75, .5, .25, 0
    latents = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)
    velocity = torch.tensor([[4.0, 8.0], [-4.0, 0.0]], dtype=torch.float64)
    out = schedule.step(velocity, 1, latents)  # sigma .75 -> .5: x - 0.25 v
    expected = torch.tensor([[0.0, -4.0], [1.5, 3.0]], dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)


def test_last_step_lands_on_sigma_zero():
    schedule = FlowMatchSchedule(3, shift=5.0, dtype=torch.float64)
    latents = torch.ones(3)
    velocity = torch.full((3,), 2.0)
    sigma_last = 5 * (1 / 3) / (1 + 4 * (1 / 3))
    out = schedule.step(velocity.double(), 2, latents.double())
    torch.testing.assert_close(out, 1.0 - 2.0 * sigma_last * torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("num_steps,shift", [(1, 5.0), (7, 5.0), (20, 3.0), (50, 5.0)])
def test_integrating_the_exact_velocity_reaches_the_clean_sample(num_steps, shift):
    # On the straight path x_s = (1 - s) x0 + s n the velocity is constant (n - x0), so Euler
    # is exact for any schedule and must end on x0.
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 16, 3, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(2, 16, 3, 4, 4, generator=g, dtype=torch.float64)
    schedule = FlowMatchSchedule(num_steps, shift=shift, dtype=torch.float64)
    x = noise.clone()
    for i in range(len(schedule)):
        x = schedule.step(noise - x0, i, x)
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-12)


def test_add_noise_then_integrating_reaches_the_clean_sample():
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(4, 5, generator=g, dtype=torch.float64)
    noise = torch.randn(4, 5, generator=g, dtype=torch.float64)
    schedule = FlowMatchSchedule(6, denoising_strength=0.6, dtype=torch.float64)
    x = schedule.add_noise(x0, noise)
    s0 = schedule.sigmas[0].item()
    torch.testing.assert_close(x, (1 - s0) * x0 + s0 * noise)
    for i in range(len(schedule)):
        x = schedule.step(noise - x0, i, x)
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-12)


def test_step_keeps_bfloat16_latents_in_bfloat16():
    schedule = FlowMatchSchedule(5)
    latents = torch.randn(1, 16, 2, 4, 4).to(torch.bfloat16)
    out = schedule.step(torch.randn_like(latents), 0, latents)
    assert out.dtype == torch.bfloat16


def test_timestep_is_a_one_element_tensor():
    schedule = FlowMatchSchedule(20)
    t = schedule.timestep(3)
    assert t.shape == (1,)
    assert t.item() == schedule.timesteps[3].item()


def test_schedules_are_independent_objects():
    a = FlowMatchSchedule(10, shift=5.0)
    b = FlowMatchSchedule(30, shift=2.0)
    assert len(a) == 10 and len(b) == 30
    torch.testing.assert_close(a.sigmas, FlowMatchSchedule(10, shift=5.0).sigmas)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_steps": 0},
        {"num_steps": -3},
        {"num_steps": 2.5},
        {"num_steps": True},
        {"num_steps": 10, "shift": 0.0},
        {"num_steps": 10, "shift": -1.0},
        {"num_steps": 10, "shift": float("nan")},
        {"num_steps": 10, "shift": float("inf")},
        {"num_steps": 10, "denoising_strength": 0.0},
        {"num_steps": 10, "denoising_strength": 1.5},
        {"num_steps": 10, "num_train_timesteps": 0},
        {"num_steps": 10, "dtype": torch.int64},
    ],
)
def test_invalid_parameters_raise_invalid_request(kwargs):
    with pytest.raises(InvalidRequestError):
        FlowMatchSchedule(**kwargs)


def test_bad_step_arguments_raise_invalid_request():
    schedule = FlowMatchSchedule(4)
    x = torch.zeros(2, 3)
    with pytest.raises(InvalidRequestError):
        schedule.step(x, 4, x)
    with pytest.raises(InvalidRequestError):
        schedule.step(x, -1, x)
    with pytest.raises(InvalidRequestError):
        schedule.step(torch.zeros(3, 2), 0, x)
    with pytest.raises(InvalidRequestError):
        schedule.add_noise(x, torch.zeros(3))
