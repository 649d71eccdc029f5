"""DDIM sampling and inversion: exact round trips and equality with hand-written diffusers loops."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler
from support import SD_CONFIG

from editflow.stages.ddim_loops import ddim_invert, ddim_sample


def schedulers(steps: int) -> tuple[DDIMScheduler, DDIMInverseScheduler]:
    scheduler = DDIMScheduler.from_config(SD_CONFIG)
    inverse = DDIMInverseScheduler.from_config(scheduler.config)
    scheduler.set_timesteps(steps)
    inverse.set_timesteps(steps)
    return scheduler, inverse


def latent_free_predictor(noise: torch.Tensor):
    """A predictor whose output depends on the timestep and the text but not on x_t.

    DDIM inversion evaluates the noise at the level it leaves while sampling evaluates it at
    the level it arrives at; the two agree only when the prediction does not depend on x_t,
    so for this predictor a round trip must return x0 to float precision.
    """

    def predict(x_t, t, embeds):
        return noise * (1 + float(t) / 1000) + embeds.mean()

    return predict


def toy_predictor(x_t, t, embeds):
    """A nonlinear stand-in for a UNet that depends on the latent, the timestep and the text."""
    text = embeds.mean(dim=(1, 2))[:, None, None, None]
    return torch.tanh(x_t * (1 + float(t) / 1000) + text) - 0.3 * x_t.roll(1, dims=-1)


def test_ddim_round_trip_is_exact_when_the_noise_does_not_depend_on_the_latent():
    torch.manual_seed(0)
    x0, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    scheduler, inverse = schedulers(10)
    predict = latent_free_predictor(noise)
    cond = torch.zeros(1, 77, 32)

    x_T, trajectory = ddim_invert(predict, x0, inverse, cond)
    assert trajectory.shape == (11, 1, 4, 8, 8)
    assert torch.equal(trajectory[0], x0) and torch.equal(trajectory[-1], x_T)

    reconstruction = ddim_sample(predict, x_T, scheduler, cond)
    relative_error = (reconstruction - x0).norm() / x0.norm()
    assert relative_error < 1e-5


def test_ddim_inversion_ends_at_the_last_inverse_timestep():
    # With a constant eps = c every DDIM level is x_t = sqrt(abar_t) z + sqrt(1 - abar_t) c,
    # z fixed by x0 at the first level (abar = alphas_cumprod[0], set_alpha_to_one False), so
    # x_T must sit exactly at abar_901 for 10 steps: no off-by-one level.
    torch.manual_seed(0)
    x0, c = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    scheduler, inverse = schedulers(10)
    x_T, _ = ddim_invert(lambda x_t, t, embeds: c, x0, inverse, torch.zeros(1, 77, 32))

    abar = scheduler.alphas_cumprod
    z = (x0 - (1 - abar[0]).sqrt() * c) / abar[0].sqrt()
    assert int(inverse.timesteps[-1]) == 901
    expected = abar[901].sqrt() * z + (1 - abar[901]).sqrt() * c
    torch.testing.assert_close(x_T, expected, rtol=1e-5, atol=1e-5)


def test_ddim_round_trip_error_shrinks_with_more_steps_for_a_latent_dependent_model():
    torch.manual_seed(0)
    x0, cond = torch.randn(1, 4, 8, 8), torch.zeros(1, 77, 32)
    errors = []
    for steps in (5, 20, 50):
        scheduler, inverse = schedulers(steps)
        x_T, _ = ddim_invert(toy_predictor, x0, inverse, cond)
        reconstruction = ddim_sample(toy_predictor, x_T, scheduler, cond)
        errors.append(float((reconstruction - x0).norm() / x0.norm()))
    assert errors[0] > errors[1] > errors[2]


def test_ddim_invert_equals_a_hand_written_diffusers_loop_with_cfg():
    torch.manual_seed(1)
    x0 = torch.randn(2, 4, 8, 8)
    cond, uncond = torch.randn(2, 77, 32), torch.randn(2, 77, 32)
    _, inverse = schedulers(7)

    ours, trajectory = ddim_invert(toy_predictor, x0, inverse, cond, uncond, guidance_scale=3.0)

    reference = DDIMInverseScheduler.from_config(SD_CONFIG)
    reference.set_timesteps(7)
    x = x0
    for t in reference.timesteps:
        eps_uncond, eps_cond = toy_predictor(torch.cat([x, x]), t, torch.cat([uncond, cond])).chunk(
            2
        )
        x = reference.step(eps_uncond + 3.0 * (eps_cond - eps_uncond), t, x).prev_sample
    assert torch.equal(ours, x)
    assert len(trajectory) == 8


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_sample_equals_a_hand_written_diffusers_loop(eta):
    torch.manual_seed(2)
    x_T = torch.randn(1, 4, 8, 8)
    cond, uncond = torch.randn(1, 77, 32), torch.randn(1, 77, 32)
    scheduler, _ = schedulers(6)
    steps = []

    ours = ddim_sample(
        toy_predictor,
        x_T,
        scheduler,
        cond,
        uncond,
        guidance_scale=5.0,
        eta=eta,
        generator=torch.Generator().manual_seed(3),
        callback=steps.append,
    )

    reference = DDIMScheduler.from_config(SD_CONFIG)
    reference.set_timesteps(6)
    generator = torch.Generator().manual_seed(3)
    x = x_T
    for t in reference.timesteps:
        eps_uncond, eps_cond = toy_predictor(torch.cat([x, x]), t, torch.cat([uncond, cond])).chunk(
            2
        )
        eps = eps_uncond + 5.0 * (eps_cond - eps_uncond)
        x = reference.step(eps, t, x, eta=eta, generator=generator).prev_sample
    assert torch.equal(ours, x)
    assert [step["i"] for step in steps] == list(range(6))
    assert torch.equal(steps[-1]["x"], ours)


def test_ddim_sample_with_eta_zero_never_touches_the_generator():
    scheduler, _ = schedulers(4)
    generator = torch.Generator().manual_seed(5)
    state = generator.get_state()
    ddim_sample(
        toy_predictor,
        torch.randn(1, 4, 8, 8),
        scheduler,
        torch.randn(1, 77, 32),
        generator=generator,
    )
    assert torch.equal(generator.get_state(), state)


def test_ddim_sample_with_eta_is_reproducible_from_the_seed():
    scheduler, _ = schedulers(4)
    x_T, cond = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)

    def run(seed):
        return ddim_sample(
            toy_predictor,
            x_T,
            scheduler,
            cond,
            eta=1.0,
            generator=torch.Generator().manual_seed(seed),
        )

    assert torch.equal(run(9), run(9))
    assert not torch.equal(run(9), run(10))


def test_ddim_loops_refuse_a_scheduler_without_timesteps():
    scheduler = DDIMScheduler.from_config(SD_CONFIG)
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_sample(toy_predictor, torch.randn(1, 4, 8, 8), scheduler, torch.randn(1, 77, 32))
