"""Edit-friendly DDPM inversion: exactness, the eta fix, statistics, colour, and LEDITS++ as a peer.

Three layers: the math on small random tensors with a toy noise predictor; the stage kinds on
the tiny model; a differential test against diffusers' LEditsPPPipelineStableDiffusion.invert.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    UNet2DConditionModel,
)
from pydantic import ValidationError
from support import SD_CONFIG
from transformers import CLIPTextModel, CLIPTokenizer

from editflow.errors import EditflowError
from editflow.stages.base import StageContext
from editflow.stages.diffusion import encode_prompts, unet_noise_predictor, vae_encode
from editflow.stages.edit_friendly.inversion import (
    ColourGuidance,
    edit_friendly_invert,
    edit_friendly_sample,
)
from editflow.stages.edit_friendly.kinds import (
    InvertEditFriendly,
    InvertEditFriendlyParams,
    SampleEditFriendly,
    SampleEditFriendlyParams,
)
from editflow.stages.edit_friendly.reverse_steps import (
    build_scheduler,
    ddim_posterior,
    level_scales,
    sde_dpmsolver_noise_scale,
)
from editflow.stages.edit_friendly.statistics import (
    FigureNoiseStatistics,
    FigureNoiseStatisticsParams,
    native_ddpm_forward_noise,
    noise_map_statistics,
    plot_noise_statistics,
)

SCHEDULERS = ["ddim", "dpmsolver++"]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


class CircularConvPredictor:
    """A stand-in UNet: a fixed random 3x3 conv with circular padding, then tanh.

    It depends on the latent, the timestep and the text, and it commutes with torch.roll over
    the spatial dims (circular padding, no position input), which makes the shift test exact.
    """

    def __init__(self, seed: int = 0, channels: int = 4, kernel: int = 3) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(channels, channels, kernel, kernel, generator=generator) * 0.3
        self.pad = (kernel // 2,) * 4

    def __call__(self, x_t, t, embeds):
        h = F.conv2d(F.pad(x_t, self.pad, mode="circular"), self.weight)
        text = embeds.mean(dim=(1, 2))[:, None, None, None]
        return torch.tanh(h + 0.001 * float(t) + text)


@pytest.fixture
def toy():
    generator = torch.Generator().manual_seed(0)
    return {
        "predict": CircularConvPredictor(),
        "x0": torch.randn(1, 4, 8, 8, generator=generator),
        "source": torch.randn(1, 7, 16, generator=generator),
        "target": torch.randn(1, 7, 16, generator=generator),
        "uncond": torch.randn(1, 7, 16, generator=generator),
    }


def invert_toy(toy, name="ddim", steps=10, eta=1.0, seed=1, x0=None):
    scheduler = build_scheduler(name, SD_CONFIG, steps)
    inversion = edit_friendly_invert(
        toy["predict"],
        toy["x0"] if x0 is None else x0,
        scheduler,
        toy["source"],
        toy["uncond"],
        guidance_scale=3.5,
        eta=eta,
        generator=torch.Generator().manual_seed(seed),
    )
    return scheduler, inversion


# ------------------------------------------------------------------------------------------
# The math, on a toy predictor


@pytest.mark.parametrize(("name", "eta"), [("ddim", 1.0), ("ddim", 0.5), ("dpmsolver++", 1.0)])
def test_reconstruction_is_exact_with_a_toy_predictor(toy, name, eta):
    scheduler, inversion = invert_toy(toy, name, steps=15, eta=eta)
    assert inversion.noise_maps.shape == (15, 1, 4, 8, 8)
    assert inversion.auxiliary_path.shape == (16, 1, 4, 8, 8)
    assert torch.equal(inversion.x_T, inversion.auxiliary_path[0])

    edited = edit_friendly_sample(
        toy["predict"],
        inversion,
        scheduler,
        toy["source"],
        toy["uncond"],
        guidance_scale=3.5,
        skip=0,
        eta=eta,
    )
    assert relative_error(edited, toy["x0"]) < 1e-5  # measured 6e-10 (ddim), 5e-8 (dpm)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_reconstruction_from_a_skipped_level_is_exact(toy, name):
    # For the multistep DPM-Solver this holds because the edit refills the solver's history
    # from auxiliary_path[skip - 1] before its first step.
    scheduler, inversion = invert_toy(toy, name, steps=15)
    edited = edit_friendly_sample(
        toy["predict"],
        inversion,
        scheduler,
        toy["source"],
        toy["uncond"],
        guidance_scale=3.5,
        skip=6,
        eta=1.0,
    )
    assert relative_error(edited, toy["x0"]) < 1e-5


@pytest.mark.parametrize("name", SCHEDULERS)
def test_shift_reproduces_the_rolled_image_with_a_shift_equivariant_predictor(toy, name):
    # roll commutes with the circular conv, the posterior is pixel-wise and every noise map is
    # rolled with the start, so the whole trajectory is the rolled original one: exact.
    scheduler, inversion = invert_toy(toy, name, steps=15)
    edited = edit_friendly_sample(
        toy["predict"],
        inversion,
        scheduler,
        toy["source"],
        toy["uncond"],
        guidance_scale=3.5,
        skip=0,
        eta=1.0,
        shift=(2, -3),
    )
    assert relative_error(edited, toy["x0"].roll((2, -3), dims=(-2, -1))) < 1e-5


def test_eta_fix_diffusers_ddim_step_lands_on_the_auxiliary_path_but_the_released_formula_does_not(
    toy,
):
    eta = 0.5
    scheduler, inversion = invert_toy(toy, "ddim", steps=10, eta=eta)
    reference = DDIMScheduler.from_config(SD_CONFIG)
    reference.set_timesteps(10)
    path, released_errors = inversion.auxiliary_path, []
    for i, t in enumerate(reference.timesteps):
        x_t, z = path[i], inversion.noise_maps[i]
        eps_uncond, eps_cond = toy["predict"](
            torch.cat([x_t, x_t]), t, torch.cat([toy["uncond"], toy["source"]])
        ).chunk(2)
        eps = eps_uncond + 3.5 * (eps_cond - eps_uncond)
        landed = reference.step(eps, t, x_t, eta=eta, variance_noise=z).prev_sample
        torch.testing.assert_close(landed, path[i + 1], rtol=1e-5, atol=1e-5)

        # The released code: sqrt(1 - abar_prev - eta * sigma^2) in the mean, z by eta * sigma.
        prev_t = int(t) - 1000 // 10
        abar_t = reference.alphas_cumprod[int(t)]
        abar_prev = (
            reference.alphas_cumprod[prev_t] if prev_t >= 0 else reference.final_alpha_cumprod
        )
        variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
        x0_hat = (x_t - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()
        mu_released = abar_prev.sqrt() * x0_hat + (1 - abar_prev - eta * variance).sqrt() * eps
        z_released = (path[i + 1] - mu_released) / (eta * variance.sqrt())
        released = reference.step(eps, t, x_t, eta=eta, variance_noise=z_released).prev_sample
        released_errors.append(float((released - path[i + 1]).abs().max()))
    assert min(released_errors) > 5e-4  # measured 0.002 .. 0.09 per step (ours: exactly 0)


def test_ddim_posterior_is_diffusers_ddim_step(toy):
    scheduler = build_scheduler("ddim", SD_CONFIG, 10)
    x_t, z, eps = torch.randn(3, 1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    for t in scheduler.timesteps[[0, 5, 9]]:
        mu, scale, _ = ddim_posterior(eps, int(t), x_t, scheduler, 0.7)
        expected = scheduler.step(eps, t, x_t, eta=0.7, variance_noise=z).prev_sample
        assert torch.equal(mu + scale * z, expected)


def test_dpmsolver_noise_maps_drive_the_schedulers_own_step_onto_the_auxiliary_path(toy):
    scheduler, inversion = invert_toy(toy, "dpmsolver++", steps=15)
    reference = DPMSolverMultistepScheduler.from_config(
        SD_CONFIG, algorithm_type="sde-dpmsolver++", solver_order=2, final_sigmas_type="sigma_min"
    )
    reference.set_timesteps(15)
    x = inversion.x_T
    for i, t in enumerate(reference.timesteps):
        eps_uncond, eps_cond = toy["predict"](
            torch.cat([x, x]), t, torch.cat([toy["uncond"], toy["source"]])
        ).chunk(2)
        eps = eps_uncond + 3.5 * (eps_cond - eps_uncond)
        if i == 0:
            reference._init_step_index(t)
        scale = sde_dpmsolver_noise_scale(reference)
        x = reference.step(eps, t, x, variance_noise=inversion.noise_maps[i]).prev_sample
        assert scale > 0
        assert torch.equal(x, inversion.auxiliary_path[i + 1])  # bit for bit


def test_a_ddpm_style_grid_starting_at_timestep_0_gets_a_noisy_last_step():
    # Pixel DDPM configs (tiny-pixel, google/ddpm-*) have no steps_offset: their leading grid
    # would end on timestep 0, a step from level 0 to level 0 that carries no noise.
    from editflow.models.tiny import tiny_scheduler_config

    config = tiny_scheduler_config("tiny-pixel")
    assert config["steps_offset"] == 0 and config["timestep_spacing"] == "leading"
    ddim = build_scheduler("ddim", config, 10)
    assert [int(t) for t in ddim.timesteps] == list(range(901, 0, -100))
    _, scale, _ = ddim_posterior(torch.zeros(1, 3, 4, 4), 1, torch.zeros(1, 3, 4, 4), ddim, 1.0)
    assert float(scale) > 0
    assert build_scheduler("ddim", SD_CONFIG, 10).config.steps_offset == 1  # as it was


def test_level_scales_follow_the_schedulers_own_levels():
    ddim = build_scheduler("ddim", SD_CONFIG, 10)
    alpha, sigma = level_scales(ddim)
    assert [int(t) for t in ddim.timesteps] == list(range(901, 0, -100))
    torch.testing.assert_close(alpha[:10] ** 2, ddim.alphas_cumprod[ddim.timesteps])
    torch.testing.assert_close(alpha[10] ** 2, ddim.alphas_cumprod[0])  # not 1: a noisy last step
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(11))
    dpm = build_scheduler("dpmsolver++", SD_CONFIG, 10)
    alpha, _ = level_scales(dpm)
    torch.testing.assert_close(
        alpha[:10] ** 2, dpm.alphas_cumprod[dpm.timesteps], rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(alpha[10] ** 2, dpm.alphas_cumprod[0])


def test_noise_maps_have_variance_above_one_and_negative_consecutive_correlation(toy):
    x0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    _, inversion = invert_toy(toy, "ddim", steps=50, x0=x0)
    variance, correlation = noise_map_statistics(inversion.noise_maps)
    assert variance.shape == (50,) and correlation.shape == (49,)
    assert variance.mean() > 1  # measured 14.2
    assert correlation.mean() < -0.2  # measured -0.47


def test_native_ddpm_forward_noise_is_white():
    x0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    scheduler = build_scheduler("ddim", SD_CONFIG, 50)
    native = native_ddpm_forward_noise(x0, scheduler, torch.Generator().manual_seed(6))
    variance, correlation = noise_map_statistics(native)
    assert native.shape == (50, 1, 4, 16, 16)
    assert abs(float(variance.mean()) - 1) < 0.05  # measured 0.994
    assert abs(float(correlation.mean())) < 0.03  # measured 2e-4


def test_same_seed_gives_identical_maps_and_another_seed_a_different_edit(toy):
    scheduler, first = invert_toy(toy, "ddim", seed=1)
    _, again = invert_toy(toy, "ddim", seed=1)
    _, other = invert_toy(toy, "ddim", seed=2)
    assert torch.equal(first.noise_maps, again.noise_maps)
    assert torch.equal(first.auxiliary_path, again.auxiliary_path)
    assert not torch.allclose(first.noise_maps, other.noise_maps)

    def edit(inversion):
        args = (toy["predict"], inversion, scheduler, toy["target"], toy["uncond"])
        knobs = {"guidance_scale": 15.0, "skip": 3, "eta": 1.0}
        return edit_friendly_sample(*args, **knobs)

    assert torch.equal(edit(first), edit(again))
    assert relative_error(edit(first), edit(other)) > 1e-2  # measured 0.79


def colour_setup(x0: torch.Tensor, strength: float, window=None) -> ColourGuidance:
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1  # left half
    return ColourGuidance(mask, torch.full_like(x0, 3.0), strength, window)


def test_colour_strength_zero_equals_no_colour(toy):
    scheduler, inversion = invert_toy(toy, "ddim", steps=10)
    args = (toy["predict"], inversion, scheduler, toy["target"], toy["uncond"])
    knobs = {"guidance_scale": 7.5, "skip": 2, "eta": 1.0}
    plain = edit_friendly_sample(*args, **knobs)
    assert torch.equal(
        edit_friendly_sample(*args, **knobs, colour=colour_setup(toy["x0"], 0.0)), plain
    )


@pytest.mark.parametrize("name", SCHEDULERS)
def test_colour_moves_the_masked_region_toward_the_colour_only(toy, name):
    # A pixel-wise predictor (1x1 conv) mixes no pixels, so the colour term can reach the
    # outside of the mask only through the model; here it cannot, and outside stays equal.
    toy = {**toy, "predict": CircularConvPredictor(kernel=1)}
    scheduler, inversion = invert_toy(toy, name, steps=10)
    args = (toy["predict"], inversion, scheduler, toy["target"], toy["uncond"])
    knobs = {"guidance_scale": 7.5, "skip": 2, "eta": 1.0}
    plain = edit_friendly_sample(*args, **knobs)
    coloured = edit_friendly_sample(*args, **knobs, colour=colour_setup(toy["x0"], 0.2))
    assert torch.equal(coloured[..., 4:], plain[..., 4:])
    before, after = ((edit[..., :4] - 3.0).abs().mean() for edit in (plain, coloured))
    assert (
        after < 0.6 * before
    )  # measured distance to the colour: 7.2 -> 3.1 (ddim), 8.3 -> 2.5 (dpm)


def test_colour_window_counts_edit_steps_from_the_first_reverse_step(toy):
    scheduler, inversion = invert_toy(toy, "ddim", steps=10)
    used = []
    edit_friendly_sample(
        toy["predict"],
        inversion,
        scheduler,
        toy["target"],
        toy["uncond"],
        guidance_scale=7.5,
        skip=4,
        eta=1.0,
        colour=colour_setup(toy["x0"], 1.0, window=(1, 2)),
        callback=lambda info: used.append(info),
    )
    changed = [not torch.equal(info["z"], inversion.noise_maps[info["i"]]) for info in used]
    assert [info["i"] for info in used] == list(range(4, 10))
    assert changed == [False, True, True, False, False, False]  # schedule steps 5 and 6


def test_plot_is_deterministic_and_has_a_fixed_size(toy):
    _, inversion = invert_toy(toy, "ddim")
    native = native_ddpm_forward_noise(
        toy["x0"], build_scheduler("ddim", SD_CONFIG, 10), torch.Generator().manual_seed(0)
    )
    first = plot_noise_statistics(inversion.noise_maps, native, "title")
    assert first.size == (800, 300) and first.mode == "RGB"
    assert first.tobytes() == plot_noise_statistics(inversion.noise_maps, native, "title").tobytes()


def test_functions_reject_eta_they_cannot_invert(toy):
    with pytest.raises(ValueError, match="eta must be > 0"):
        invert_toy(toy, "ddim", eta=0.0)
    with pytest.raises(ValueError, match="eta must be 1"):
        invert_toy(toy, "dpmsolver++", eta=0.5)


# ------------------------------------------------------------------------------------------
# Parameters


@pytest.mark.parametrize(
    ("model", "values", "message"),
    [
        (
            SampleEditFriendlyParams,
            {"skip": 100, "num_inference_steps": 100},
            "skip must be < num_inference_steps",
        ),
        (
            SampleEditFriendlyParams,
            {"skip": 10, "num_inference_steps": 10},
            "skip must be < num_inference_steps",
        ),
        (SampleEditFriendlyParams, {"colour_window": (5, 2)}, "colour_window start must be <= end"),
        (SampleEditFriendlyParams, {"colour_window": (-1, 2)}, "colour_window start must be >= 0"),
        (
            SampleEditFriendlyParams,
            {"colour_window": (0, 64), "num_inference_steps": 100},
            "colour_window end must be < num_inference_steps - skip",
        ),
        (InvertEditFriendlyParams, {"eta": 0.0}, "Input should be greater than 0"),
        (InvertEditFriendlyParams, {"eta": 1.5}, "Input should be less than or equal to 1"),
        (
            InvertEditFriendlyParams,
            {"scheduler": "dpmsolver++", "eta": 0.5},
            "eta must be 1 with scheduler 'dpmsolver++'",
        ),
        (SampleEditFriendlyParams, {"cfg_tar": 31}, "Input should be less than or equal to 30"),
    ],
)
def test_params_reject_bad_values_with_exact_messages(model, values, message):
    with pytest.raises(ValidationError) as error:
        model(**values)
    assert message in str(error.value)


def test_params_defaults_follow_the_paper():
    invert, sample = InvertEditFriendlyParams(), SampleEditFriendlyParams()
    assert (invert.cfg_src, invert.num_inference_steps, invert.eta) == (3.5, 100, 1.0)
    assert (sample.cfg_tar, sample.skip, sample.shift, sample.colour_window) == (
        15,
        36,
        (0, 0),
        None,
    )
    assert SampleEditFriendlyParams(colour_window=(0, 63)).colour_window == (0, 63)


# ------------------------------------------------------------------------------------------
# The stages on the tiny model


class TinyModels:
    """The tiny model's components, loaded on first use through the real from_pretrained path."""

    loaders = {
        "unet": UNet2DConditionModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel,
        "tokenizer": CLIPTokenizer,
    }

    def __init__(self, folder: Path) -> None:
        self.folder, self.loaded = folder, {}

    def get(self, component: str):
        if component not in self.loaded:
            self.loaded[component] = self.loaders[component].from_pretrained(
                self.folder, subfolder=component
            )
        return self.loaded[component]

    @property
    def scheduler_config(self):
        return DDIMScheduler.load_config(self.folder, subfolder="scheduler")


@pytest.fixture(scope="module")
def tiny(tiny_folder) -> TinyModels:
    return TinyModels(tiny_folder)


@pytest.fixture(scope="module")
def astronaut(tiny) -> torch.Tensor:
    from skimage import data

    image = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(image, size=(64, 64), mode="area")  # (1, 3, 64, 64)


@pytest.fixture(scope="module")
def x0(tiny, astronaut) -> torch.Tensor:
    return vae_encode(tiny.get("vae"), astronaut)  # (1, 4, 8, 8)


def context(tiny, name="edit") -> StageContext:
    return StageContext(
        name=name, seed=0, device=torch.device("cpu"), dtype=torch.float32, models=tiny
    )


def run_invert(tiny, x0, **params):
    params = InvertEditFriendlyParams(**params)
    return InvertEditFriendly().call(context(tiny, "invert"), params, {"latents": x0})


def run_sample(tiny, inverted, **params):
    inputs = {name: inverted[name] for name in ("noise_maps", "auxiliary_path")}
    inputs.update(params.pop("inputs", {}))
    params = SampleEditFriendlyParams(**params)
    return SampleEditFriendly().call(context(tiny), params, inputs)["latents"]


@pytest.mark.parametrize("name", SCHEDULERS)
def test_reconstruction_is_exact_on_the_tiny_unet_through_the_stages(tiny, x0, name):
    prompt = "a photo of an astronaut"
    common = {"num_inference_steps": 10, "scheduler": name}
    inverted = run_invert(tiny, x0, source_prompt=prompt, cfg_src=3.5, **common)
    assert inverted["noise_maps"].shape == (10, 1, 4, 8, 8)
    assert inverted["prompt_embeds"].shape == (1, 77, 32)
    edited = run_sample(tiny, inverted, target_prompt=prompt, cfg_tar=3.5, skip=0, **common)
    assert relative_error(edited, x0) < 1e-5  # measured 3e-10 (ddim), 5e-9 (dpm)


def test_sample_stage_rejects_noise_maps_of_another_length(tiny, x0):
    inverted = run_invert(tiny, x0, num_inference_steps=10)
    with pytest.raises(EditflowError) as error:
        run_sample(tiny, inverted, num_inference_steps=12, skip=0)
    assert error.value.problems[0].key == "stages.edit.num_inference_steps"
    assert "noise_maps has 10 steps but num_inference_steps is 12" in str(error.value)


def test_colour_stage_encodes_the_colour_and_masks_at_latent_resolution(tiny, x0):
    # The tiny UNet is random, so what colour does to the picture is meaningless there; the
    # plumbing is not. With the window on the last edit step only, nothing after the colour
    # term mixes pixels, so the output may change inside the (downsampled) mask only.
    inverted = run_invert(tiny, x0, num_inference_steps=10)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :, :32] = 1  # left half: latent columns 0-3
    red = torch.zeros(1, 3, 64, 64)
    red[:, 0] = 1
    colour_inputs = {"colour_mask": mask, "colour_image": red}
    common = {"num_inference_steps": 10, "skip": 2, "target_prompt": "a photo", "cfg_tar": 7.5}
    plain = run_sample(tiny, inverted, **common)
    off = run_sample(tiny, inverted, colour_strength=0.0, inputs=colour_inputs, **common)
    last = run_sample(
        tiny, inverted, colour_strength=1.0, colour_window=(7, 7), inputs=colour_inputs, **common
    )
    assert torch.equal(off, plain)
    assert torch.equal(last[..., 4:], plain[..., 4:])
    assert (last[..., :4] - plain[..., :4]).abs().min() > 0
    with pytest.raises(
        EditflowError, match="colour_mask and colour_image go together: colour_image is missing"
    ):
        run_sample(tiny, inverted, colour_strength=1.0, inputs={"colour_mask": mask}, **common)
    with pytest.raises(EditflowError, match="colour_strength > 0 needs the colour_mask"):
        run_sample(tiny, inverted, colour_strength=1.0, **common)


def test_figure_stage_plots_maps_against_the_native_baseline(tiny, x0, toy):
    _, inversion = invert_toy(toy, "ddim", steps=10)
    stage, params = FigureNoiseStatistics(), FigureNoiseStatisticsParams()
    inputs = {"noise_maps": inversion.noise_maps, "latents": x0}
    image = stage.call(context(tiny, "figure"), params, inputs)["image"]
    again = stage.call(context(tiny, "figure"), params, inputs)["image"]
    assert image.shape == (1, 3, 300, 800) and 0 <= image.min() and image.max() <= 1
    assert torch.equal(image, again)


# ------------------------------------------------------------------------------------------
# LEDITS++ (diffusers) as a peer


@pytest.fixture(scope="module")
def ledits(tiny):
    from diffusers import LEditsPPPipelineStableDiffusion

    pipe = LEditsPPPipelineStableDiffusion.from_pretrained(
        tiny.folder, safety_checker=None, requires_safety_checker=False, feature_extractor=None
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ledits_invert(pipe, monkeypatch, image, noise, **kwargs):
    """Run pipe.invert with its auxiliary noise taken from ``noise`` (T, N, C, h, w).

    invert draws one randn_tensor per level from the least noisy level up, so it gets our
    noisiest-first draws in reverse.
    """
    import diffusers.pipelines.ledits_pp.pipeline_leditspp_stable_diffusion as module

    draws = iter(noise.flip(0))
    monkeypatch.setattr(module, "randn_tensor", lambda *args, **kw: next(draws).clone())
    pipe.invert(image, skip=0.0, **kwargs)
    return pipe.zs, pipe.init_latents


def our_invert(pipe, x0, scheduler, cond, uncond, seed):
    return edit_friendly_invert(
        unet_noise_predictor(pipe.unet), x0, scheduler, cond, uncond, guidance_scale=3.5,
        eta=1.0, generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip


def test_ledits_invert_with_ddim_fails_in_diffusers_0_42(ledits, astronaut):
    # invert() calls scheduler.add_noise(x0, noise, torch.Tensor([t])): a FLOAT timestep
    # tensor, which DDIMScheduler uses as an index into alphas_cumprod.
    ledits.scheduler = DDIMScheduler.from_config(ledits.scheduler.config)
    with pytest.raises(IndexError, match="tensors used as indices must be long"):
        ledits.invert(astronaut, source_prompt="", num_inversion_steps=10, skip=0.0)


def test_ledits_invert_matches_ours_with_dpmsolver_except_for_its_swapped_cfg(
    ledits, astronaut, monkeypatch
):
    """Same noise maps given the same auxiliary noise, once LEDITS++'s CFG swap is mirrored.

    Differences that are not bugs and are held equal here: LEDITS++'s skip drops steps before
    inverting (we use skip=0 there), it forces timestep_spacing="leading" (the tiny config
    already has it), it draws the auxiliary noise in another order (injected here), and it
    evaluates the two CFG branches in two UNet calls (we batch them: ~1e-6 differences).
    The bug: invert() unpacks encode_prompt's (editing, negative, n) as (uncond, text), so
    with a non-empty source prompt its guidance is eps_src + s (eps_empty - eps_src), away
    from the prompt. Our maps equal its maps only when we pass the roles swapped.
    Steps: 15 or more. Below 15 the scheduler's lower_order_final makes its own last step
    first order while invert() computes it to second order, so the last map would differ.
    """
    steps, seed, prompt = 15, 5, "a photo of an astronaut"
    # final_sigmas_type="sigma_min" as editflow builds it: see the next test for "zero".
    ledits.scheduler = DPMSolverMultistepScheduler.from_config(
        ledits.scheduler.config,
        algorithm_type="sde-dpmsolver++",
        solver_order=2,
        final_sigmas_type="sigma_min",
    )
    ours_scheduler = build_scheduler("dpmsolver++", ledits.scheduler.config, steps)
    x0, _ = ledits.encode_image(astronaut, dtype=torch.float32)
    noise = torch.randn((steps, *x0.shape), generator=torch.Generator().manual_seed(seed))
    zs, x_T = ledits_invert(
        ledits, monkeypatch, astronaut, noise,
        source_prompt=prompt, source_guidance_scale=3.5, num_inversion_steps=steps,
    )  # fmt: skip
    assert torch.equal(ledits.inversion_steps, ours_scheduler.timesteps)

    cond = encode_prompts(ledits.tokenizer, ledits.text_encoder, [prompt])
    uncond = encode_prompts(ledits.tokenizer, ledits.text_encoder, [""])
    swapped = our_invert(ledits, x0, ours_scheduler, uncond, cond, seed)
    torch.testing.assert_close(x_T, swapped.x_T)
    scale = swapped.noise_maps.abs().amax()
    torch.testing.assert_close(zs, swapped.noise_maps, rtol=0, atol=1e-5 * float(scale))

    correct = our_invert(ledits, x0, ours_scheduler, cond, uncond, seed)
    assert (zs - correct.noise_maps).abs().amax() > 0.1  # measured 1.6 (1.3% of max |z|)


def test_ledits_invert_with_a_zero_final_sigma_leaves_the_last_map_empty(
    ledits, astronaut, monkeypatch
):
    """With diffusers' default final_sigmas_type="zero" the last step carries no noise.

    LEDITS++ then stores a zero last map, and its inversion computes that step to second order
    while the scheduler's own step (lower_order_final) takes it to first order, so its
    reconstruction is not exact; every other map equals ours (empty prompt: no CFG swap).
    """
    steps, seed = 15, 7
    ledits.scheduler = DPMSolverMultistepScheduler.from_config(
        ledits.scheduler.config,
        algorithm_type="sde-dpmsolver++",
        solver_order=2,
        final_sigmas_type="zero",  # diffusers' default, spelled out: the config may say otherwise
    )
    ours_scheduler = build_scheduler("dpmsolver++", ledits.scheduler.config, steps)
    x0, _ = ledits.encode_image(astronaut, dtype=torch.float32)
    noise = torch.randn((steps, *x0.shape), generator=torch.Generator().manual_seed(seed))
    zs, _ = ledits_invert(
        ledits, monkeypatch, astronaut, noise, source_prompt="", num_inversion_steps=steps
    )
    empty = encode_prompts(ledits.tokenizer, ledits.text_encoder, [""])
    ours = our_invert(ledits, x0, ours_scheduler, empty, None, seed)
    scale = float(ours.noise_maps[:-1].abs().amax())
    torch.testing.assert_close(zs[:-1], ours.noise_maps[:-1], rtol=0, atol=1e-5 * scale)
    assert float(zs[-1].abs().max()) == 0.0
    assert float(ours.noise_maps[-1].abs().max()) > 0.1


def test_the_edit_runs_tuned_weights_mixed_by_ratio_and_leaves_the_model_alone(tiny, x0):
    common = {"num_inference_steps": 10, "target_prompt": "a photo of a dog", "skip": 2}
    inverted = run_invert(tiny, x0, source_prompt="a photo", num_inference_steps=10)
    unet = tiny.get("unet")
    generator = torch.Generator().manual_seed(0)
    tuned = {
        name: value + 0.01 * torch.randn(value.shape, generator=generator)
        for name, value in unet.state_dict().items()
    }
    plain = run_sample(tiny, inverted, **common)
    weights = {"weights": [tuned]}
    assert torch.equal(run_sample(tiny, inverted, ratio=0.0, inputs=weights, **common), plain)
    full = run_sample(tiny, inverted, ratio=1.0, inputs=dict(weights), **common)
    # r = 1 is the model with the tuned weights loaded, exactly; the loaded model is unchanged.
    copy = UNet2DConditionModel.from_config(unet.config).eval()
    copy.load_state_dict(tuned)
    tiny.loaded["unet"], original = copy, unet
    try:
        assert torch.equal(run_sample(tiny, inverted, **common), full)
    finally:
        tiny.loaded["unet"] = original
    assert not torch.equal(full, plain)
    assert torch.equal(run_sample(tiny, inverted, **common), plain)


# ------------------------------------------------------------------------------------------
# Text from other stages: prompt_embeds and a direction


def encode(tiny, prompt: str) -> torch.Tensor:
    return encode_prompts(tiny.get("tokenizer"), tiny.get("text_encoder"), [prompt])


def test_prompt_embeds_of_the_prompts_encoding_give_the_prompts_edit(tiny, x0):
    inverted = run_invert(tiny, x0, source_prompt="a photo", num_inference_steps=10)
    common = {"num_inference_steps": 10, "skip": 2, "cfg_tar": 7.5}
    by_prompt = run_sample(tiny, inverted, target_prompt="a photo of a dog", **common)
    embeds = {"prompt_embeds": encode(tiny, "a photo of a dog")}
    by_embeds = run_sample(tiny, inverted, inputs=embeds, **common)
    torch.testing.assert_close(by_embeds, by_prompt, rtol=1e-6, atol=1e-6)  # measured: equal


@pytest.mark.parametrize("prompt", ["a photo of a dog", ""])
def test_a_direction_is_added_to_the_target_embedding(tiny, x0, prompt):
    # An empty target prompt with a direction is still a target: CFG on cfg_tar applies.
    inverted = run_invert(tiny, x0, source_prompt="a photo", num_inference_steps=10)
    common = {"num_inference_steps": 10, "skip": 2, "cfg_tar": 7.5}
    generator = torch.Generator().manual_seed(3)
    direction = 0.5 * torch.randn(1, 77, 32, generator=generator)
    along = run_sample(
        tiny, inverted, target_prompt=prompt, inputs={"direction": direction}, **common
    )
    explicit = {"prompt_embeds": encode(tiny, prompt) + direction}
    torch.testing.assert_close(run_sample(tiny, inverted, inputs=explicit, **common), along,
                               rtol=1e-6, atol=1e-6)  # fmt: skip
    plain = run_sample(tiny, inverted, target_prompt=prompt or "a photo", **common)
    assert relative_error(along, plain) > 0.05  # measured 0.20 (dog), 0.52 (empty)


def test_one_embedding_serves_every_image_and_another_count_is_refused(tiny, x0):
    two = torch.cat([x0, x0.flip(-1)])
    inverted = run_invert(tiny, two, num_inference_steps=6)
    common = {"num_inference_steps": 6, "skip": 1, "cfg_tar": 3.0}
    one = encode(tiny, "a photo of a dog")
    shared = run_sample(tiny, inverted, inputs={"prompt_embeds": one}, **common)
    each = run_sample(tiny, inverted, inputs={"prompt_embeds": one.repeat(2, 1, 1)}, **common)
    assert shared.shape == two.shape
    torch.testing.assert_close(shared, each, rtol=1e-6, atol=1e-6)
    with pytest.raises(EditflowError) as error:
        run_sample(tiny, inverted, inputs={"direction": one.repeat(3, 1, 1)}, **common)
    assert str(error.value) == (
        "stages.edit.direction: direction holds 3 embeddings but the latents hold 2 images"
        " (give one embedding for all images or one per image)"
    )


def test_a_target_prompt_and_prompt_embeds_together_are_refused(tiny, x0):
    inverted = run_invert(tiny, x0, num_inference_steps=4)
    embeds = {"prompt_embeds": encode(tiny, "a dog")}
    with pytest.raises(EditflowError) as error:
        run_sample(tiny, inverted, num_inference_steps=4, skip=0, target_prompt="a dog",
                   inputs=embeds)  # fmt: skip
    assert str(error.value) == (
        "stages.edit.target_prompt: is 'a dog', but prompt_embeds is connected and replaces it"
        " (leave target_prompt empty or disconnect prompt_embeds)"
    )


# ------------------------------------------------------------------------------------------
# An unconditional pixel-space model (tiny-pixel)


@pytest.fixture(scope="module")
def pixel(models_dir):
    """tiny-pixel through the engine's own registry, as a stage sees it."""
    from editflow.models import RunModels, resolve_providers
    from editflow.models.section import ModelSection

    section = ModelSection(id="tiny-pixel")
    resolved = resolve_providers(section, ["model.id"], base_dir=models_dir, models_dir=models_dir)
    return RunModels(resolved, device=torch.device("cpu"), dtype=torch.float32,
                     models_dir=models_dir)  # fmt: skip


def pixel_context(pixel, kind, name):
    return StageContext(name, 0, torch.device("cpu"), torch.float32,
                        models=pixel.for_stage(kind.components))  # fmt: skip


@pytest.mark.parametrize("name", SCHEDULERS)
def test_reconstruction_is_exact_on_a_pixel_model_without_text(pixel, astronaut, name):
    x0 = F.interpolate(astronaut, size=(32, 32), mode="area") * 2 - 1  # encode.pixels
    common = {"num_inference_steps": 10, "scheduler": name}
    ctx = pixel_context(pixel, InvertEditFriendly, "invert")
    inverted = InvertEditFriendly().call(ctx, InvertEditFriendlyParams(**common), {"latents": x0})
    assert inverted["noise_maps"].shape == (10, 1, 3, 32, 32)
    assert inverted["prompt_embeds"].shape == (1, 0, 0)
    inputs = {name: inverted[name] for name in ("noise_maps", "auxiliary_path")}
    ctx = pixel_context(pixel, SampleEditFriendly, "edit")
    edited = SampleEditFriendly().call(ctx, SampleEditFriendlyParams(skip=0, **common), inputs)
    assert relative_error(edited["latents"], x0) < 1e-5
    assert "tokenizer" not in {load.split(":")[1] for load in pixel.loads}


def test_colour_on_a_pixel_model_pulls_towards_the_colour_in_pixel_space(pixel, astronaut):
    x0 = F.interpolate(astronaut, size=(32, 32), mode="area") * 2 - 1
    ctx = pixel_context(pixel, InvertEditFriendly, "invert")
    params = InvertEditFriendlyParams(num_inference_steps=10)
    inverted = InvertEditFriendly().call(ctx, params, {"latents": x0})
    red = torch.zeros(1, 3, 32, 32)
    red[:, 0] = 1
    inputs = {name: inverted[name] for name in ("noise_maps", "auxiliary_path")}
    inputs.update(colour_mask=torch.ones(1, 1, 32, 32), colour_image=red)
    ctx = pixel_context(pixel, SampleEditFriendly, "edit")

    def edit(strength: float) -> torch.Tensor:
        # Late steps only: early on DDPM's schedule the random UNet's x0_hat is far off.
        params = SampleEditFriendlyParams(
            num_inference_steps=10, skip=0, colour_strength=strength, colour_window=(6, 9)
        )
        return SampleEditFriendly().call(ctx, params, inputs)["latents"]

    target = red * 2 - 1  # the colour in the model's space, as encode.pixels scales it
    assert relative_error(edit(0.5), target) < relative_error(edit(0.0), target)


def test_text_on_a_pixel_model_is_refused_before_anything_runs(pixel, astronaut):
    x0 = F.interpolate(astronaut, size=(32, 32), mode="area") * 2 - 1
    ctx = pixel_context(pixel, InvertEditFriendly, "invert")
    with pytest.raises(EditflowError) as error:
        InvertEditFriendly().call(ctx, InvertEditFriendlyParams(source_prompt="a photo"),
                                  {"latents": x0})  # fmt: skip
    assert str(error.value) == (
        "stages.invert.source_prompt: is 'a photo', but the model has no text encoder (an"
        " unconditional UNet): the prompt would be ignored (leave source_prompt empty)"
    )
