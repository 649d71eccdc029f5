"""DDIM on the t0 grid through the common loops: the grid, the scheduler's steps, today's
numbers on an epsilon model, and diffusers' DDIM on v-prediction and sample models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, UNet2DModel

from editflow.models.tiny import ensure_tiny
from editflow.stages.ddim_loops import ddim_invert, ddim_sample
from editflow.stages.diffusion import unet_noise_predictor
from editflow.stages.grid_scheduler import GridScheduler, t0_grid

GRID = t0_grid(400, 41)  # 0, 10, ..., 400: diffusers' DDIM with a step ratio of 10 walks it
RATIO = 10


@pytest.fixture(scope="module")
def pixel(models_dir: Path) -> tuple[UNet2DModel, DDIMScheduler, torch.Tensor]:
    """The tiny pixel model (epsilon, DDPM betas, ``set_alpha_to_one``) and two images."""
    folder = ensure_tiny(models_dir, "tiny-pixel")
    unet = UNet2DModel.from_pretrained(folder / "unet").eval().requires_grad_(False)
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return unet, scheduler, images


def _config(scheduler: DDIMScheduler, prediction_type: str) -> dict:
    """The tiny pixel model's scheduler config read as another prediction type: its UNet is
    then a v-prediction (or x0-prediction) model as far as every sampler is concerned."""
    return {**scheduler.config, "prediction_type": prediction_type}


def _reference_step(
    eps: torch.Tensor,
    x: torch.Tensor,
    t: int,
    t_next: int,
    alphas_cumprod: torch.Tensor,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """The DDIM step (Song et al. 2021, eq. 12) of the epsilon-only t0 loops this scheduler
    replaced (``grid_step``, written out as it was), ``-1`` the clean image."""

    def alpha(level: int) -> torch.Tensor:
        value = alphas_cumprod[level] if level >= 0 else alphas_cumprod.new_tensor(1.0)
        return value.to(device=x.device, dtype=x.dtype)

    a_t, a_next = alpha(t), alpha(t_next)
    x0_hat = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    if eta == 0 or noise is None:
        return a_next.sqrt() * x0_hat + (1 - a_next).sqrt() * eps
    c1 = eta * ((1 - a_t / a_next) * (1 - a_next) / (1 - a_t)).sqrt()
    c2 = (1 - a_next - c1**2).sqrt()
    return a_next.sqrt() * x0_hat + c1 * noise + c2 * eps


def _close(ours: torch.Tensor, theirs: torch.Tensor, relative: float) -> None:
    """Equal within ``relative`` of the data's largest magnitude (float32 rounding of another
    order of sums; an x0-predicting model divides it by sigma ~ 0.01 near timestep 0)."""
    atol = relative * float(theirs.abs().max())
    torch.testing.assert_close(ours, theirs, rtol=0.0, atol=atol)


def test_the_time_grid_is_linspace_times_t0_truncated() -> None:
    assert t0_grid(400, 41) == list(range(0, 401, 10))
    grid = t0_grid(400, 40)
    assert grid[:4] == [0, 10, 20, 30] and grid[-1] == 400 and grid[13] == 133  # 133.33
    assert t0_grid(3, 7) == [0, 0, 1, 1, 2, 2, 3]  # repeats once n > t0 + 1


def test_generation_walks_the_grid_down_to_the_clean_image_and_inversion_up_from_0() -> None:
    alphas = torch.linspace(0.99, 0.01, 1000)
    down = GridScheduler(alphas, [0, 0, 5, 9])
    assert down.levels == [(9, 5), (5, 0), (0, 0), (0, -1)]
    assert down.timesteps.tolist() == [9, 5, 0, 0] and down.num_inference_steps == 4
    up = GridScheduler(alphas, [0, 0, 5, 9], inverse=True)
    assert up.levels == [(0, 0), (0, 5), (5, 9)]
    assert up.timesteps.tolist() == [0, 0, 5] and up.num_inference_steps == 3
    assert down.timesteps.dtype == torch.long and down.timesteps.device.type == "cpu"
    with pytest.raises(ValueError, match="ascending"):
        GridScheduler(alphas, [5, 0])


def test_step_is_the_pure_transition_of_the_next_index_and_starts_over_after_the_last() -> None:
    alphas = torch.linspace(0.99, 0.01, 1000)
    scheduler = GridScheduler(alphas, [0, 0, 5, 9], prediction_type="v_prediction")
    x, output = torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3)
    for index, t in enumerate(scheduler.timesteps):
        expected = scheduler.transition(index, output, x)
        assert torch.equal(scheduler.transition(index, output, x).prev_sample, expected[0])
        stepped = scheduler.step(output, t, x)
        assert torch.equal(stepped.prev_sample, expected.prev_sample)
        assert torch.equal(stepped.pred_original_sample, expected.pred_original_sample)
    assert scheduler.step_index == 0  # a second loop runs the grid again
    scheduler.step(output, 9, x)
    with pytest.raises(ValueError, match="step 1 of the grid is at timestep 5, not 9"):
        scheduler.step(output, 9, x)
    scheduler.set_timesteps()
    scheduler.step(output, 9, x)


def test_a_repeated_timestep_is_a_step_that_stays_put(pixel) -> None:
    unet, scheduler, images = pixel
    predict = unet_noise_predictor(unet)
    repeated = GridScheduler.from_scheduler(scheduler, t0_grid(30, 61), inverse=True)
    distinct = GridScheduler.from_scheduler(scheduler, sorted(set(t0_grid(30, 61))), inverse=True)
    assert repeated.num_inference_steps == 60 and distinct.num_inference_steps == 30
    x_repeated, _ = ddim_invert(predict, images, repeated, None)
    x_distinct, _ = ddim_invert(predict, images, distinct, None)
    _close(x_repeated, x_distinct, 1e-5)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_epsilon_numbers_are_those_of_the_loops_the_scheduler_replaced(pixel, eta: float) -> None:
    unet, scheduler, images = pixel
    predict, alphas = unet_noise_predictor(unet), scheduler.alphas_cumprod
    grid = t0_grid(300, 7)  # 0, 50, ..., 300
    x_t0, trajectory = ddim_invert(
        predict, images, GridScheduler.from_scheduler(scheduler, grid, inverse=True), None
    )
    expected = images
    with torch.no_grad():
        for t, t_next in zip(grid[:-1], grid[1:], strict=True):
            expected = _reference_step(predict(expected, torch.tensor(t), None), expected,
                                       t, t_next, alphas)  # fmt: skip
    assert trajectory.shape == (len(grid), *images.shape)
    _close(x_t0, expected, 1e-5)

    sampled = ddim_sample(
        predict, x_t0, GridScheduler.from_scheduler(scheduler, grid), None,
        eta=eta, generator=torch.Generator().manual_seed(7),
    )  # fmt: skip
    expected, generator = x_t0, torch.Generator().manual_seed(7)
    with torch.no_grad():
        for t, t_next in zip(reversed(grid), reversed([-1, *grid[:-1]]), strict=True):
            noise = torch.randn(x_t0.shape, generator=generator) if eta > 0 else None
            eps = predict(expected, torch.tensor(t), None)
            expected = _reference_step(eps, expected, t, t_next, alphas, eta, noise)
    _close(sampled, expected, 1e-5)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_inversion_on_the_grid_equals_diffusers_inverse_ddim(pixel, prediction_type: str) -> None:
    unet, scheduler, images = pixel
    config = _config(scheduler, prediction_type)
    ours, _ = ddim_invert(
        unet_noise_predictor(unet),
        images,
        GridScheduler.from_scheduler(DDIMScheduler.from_config(config), GRID, inverse=True),
        None,
    )
    # diffusers' inverse step to t comes from t - RATIO: the model is called at the level the
    # step starts from, as on the grid (its own loops call it at t).
    peer = DDIMInverseScheduler.from_config(config)
    peer.set_timesteps(1000 // RATIO)
    theirs = images
    with torch.no_grad():
        for t in GRID[:-1]:
            theirs = peer.step(unet(theirs, t).sample, t + RATIO, theirs).prev_sample
    _close(ours, theirs, 1e-4)


@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_generation_on_the_grid_equals_diffusers_ddim(
    pixel, prediction_type: str, eta: float
) -> None:
    unet, scheduler, _ = pixel
    config = _config(scheduler, prediction_type)
    assert config["set_alpha_to_one"]  # diffusers' last step then lands on the clean image
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ours = ddim_sample(
        unet_noise_predictor(unet), x,
        GridScheduler.from_scheduler(DDIMScheduler.from_config(config), GRID), None,
        eta=eta, generator=torch.Generator().manual_seed(2),
    )  # fmt: skip
    peer = DDIMScheduler.from_config(config)
    peer.set_timesteps(1000 // RATIO)
    theirs, generator = x, torch.Generator().manual_seed(2)
    with torch.no_grad():
        for t in reversed(GRID):
            noise = torch.randn(x.shape, generator=generator) if eta > 0 else None
            output = unet(theirs, t).sample
            theirs = peer.step(output, t, theirs, eta=eta, variance_noise=noise).prev_sample
    _close(ours, theirs, 1e-4)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_the_grid_never_reads_the_device(eta: float) -> None:
    meta = torch.device("meta")  # any host read of a value raises there

    def predict(x_t: torch.Tensor, t: torch.Tensor, embeds: None) -> torch.Tensor:
        return 0.5 * x_t

    alphas = DDIMScheduler(prediction_type="v_prediction").alphas_cumprod
    x = torch.empty(1, 3, 8, 8, device=meta)
    up = GridScheduler(alphas, t0_grid(400, 6), inverse=True, prediction_type="v_prediction")
    x_t0, _ = ddim_invert(predict, x, up, None)
    down = GridScheduler(alphas, t0_grid(400, 6), prediction_type="v_prediction")
    out = ddim_sample(predict, x_t0, down, None, eta=eta, generator=torch.Generator())
    assert out.device == meta
