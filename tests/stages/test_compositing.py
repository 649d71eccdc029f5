"""Cross-domain compositing: local ILVR invariants (METHODS.md §3), RePaint, peers."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler
from support import SD_CONFIG

from editflow.stages.base import StageContext
from editflow.stages.compositing.kinds import (
    ComposePaste,
    LocalIlvrParams,
    PasteParams,
    SampleLocalIlvr,
    paste,
)
from editflow.stages.compositing.local_ilvr import (
    LocalIlvr,
    grow_mask,
    local_ilvr_sample,
    low_pass,
    repaint_schedule,
)
from editflow.stages.ddim_loops import ddim_sample

STEPS = 10


class CountingPredictor:
    """A latent-dependent toy noise predictor that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x, t, embeds):
        self.calls += 1
        return 0.3 * torch.tanh(x) + 0.01 * embeds.mean()


def scheduler(steps: int = STEPS) -> DDIMScheduler:
    ddim = DDIMScheduler.from_config(SD_CONFIG)
    ddim.set_timesteps(steps)
    return ddim


@pytest.fixture
def setup():
    generator = torch.Generator().manual_seed(0)
    x_T = torch.randn(1, 4, 8, 8, generator=generator)
    reference = torch.randn(1, 4, 8, 8, generator=generator)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1
    cond = torch.randn(1, 5, 16, generator=generator)
    return x_T, reference, mask, cond


def sample(setup, guidance, **knobs):
    x_T, _, _, cond = setup
    return local_ilvr_sample(
        CountingPredictor(), x_T, scheduler(), cond, guidance=guidance,
        generator=torch.Generator().manual_seed(1), **knobs,
    )  # fmt: skip


@pytest.mark.parametrize("space", ["xt", "x0"])
def test_full_guidance_without_filtering_returns_the_reference(setup, space):
    _, reference, mask, _ = setup
    guidance = LocalIlvr(reference, mask, 1, 1, 1.0, 1.0, space)
    result = sample(setup, guidance)
    assert torch.allclose(result, reference, atol=1e-5)


def test_guidance_outside_only_keeps_the_outsides_low_frequencies(setup):
    _, reference, mask, _ = setup
    guided = sample(setup, LocalIlvr(reference, mask, 1, 2, t_in=0.0, t_out=1.0))
    free = sample(setup, None)

    def outside(x):  # low-passed difference to the reference, outside the mask
        return (low_pass(x - reference, 2) * (1 - mask)).norm()

    def inside(x):
        return ((x - reference) * mask).norm()

    assert outside(guided) < 0.2 * outside(free)  # measured 6.4 vs 43
    assert inside(guided) > 0.5 * inside(free)  # the inside is left free


def test_blend_pix_zero_is_hard_and_a_ramp_lies_strictly_between():
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 6:10, 6:10] = 1
    assert torch.equal(grow_mask(mask, 0), mask)
    ramp = grow_mask(mask, 3)
    assert torch.equal(ramp[mask == 1], torch.ones(16))
    band = (ramp > 0) & (ramp < 1)
    assert band.sum() > 0 and band[..., 4:12, 4:12].sum() == band.sum()  # 2 px around the edge
    assert torch.allclose(ramp[..., 5, 8], torch.tensor([2 / 3])) and ramp[..., 0, 0] == 0


def test_repaint_calls_the_unet_as_often_as_its_schedule_implies(setup):
    _, reference, mask, cond = setup
    levels = repaint_schedule(STEPS, 0.6, jump=2, resamples=3)
    downs = sum(after > level for level, after in pairwise(levels))
    assert levels[0] == 0 and levels[-1] == STEPS and downs == STEPS + 2 * 2 * 3
    predictor = CountingPredictor()
    local_ilvr_sample(
        predictor, setup[0], scheduler(), cond, guidance=LocalIlvr(reference, mask),
        repaint_start=0.6, repaint_jump=2, repaint_resamples=3,
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    assert predictor.calls == downs


def test_resampling_off_reproduces_the_plain_run_exactly(setup):
    _, reference, mask, _ = setup
    guidance = LocalIlvr(reference, mask, 2, 1, 0.5, 1.0)
    plain = sample(setup, guidance)
    off = sample(setup, guidance, repaint_start=0.8, repaint_jump=2, repaint_resamples=1)
    assert torch.equal(off, plain)
    on = sample(setup, guidance, repaint_start=0.8, repaint_jump=2, repaint_resamples=2)
    assert not torch.equal(on, plain)


def test_without_guidance_it_is_plain_ddim(setup):
    x_T, _, _, cond = setup
    uncond = torch.zeros_like(cond)
    ours = local_ilvr_sample(
        CountingPredictor(), x_T, scheduler(), cond, uncond, guidance=None, guidance_scale=5.0
    )
    theirs = ddim_sample(CountingPredictor(), x_T, scheduler(), cond, uncond, guidance_scale=5.0)
    assert torch.equal(ours, theirs)


# ------------------------------------------------------------------------------------------
# The stages on the tiny models


def test_paste_places_the_scaled_object_and_its_mask():
    background = torch.zeros(1, 3, 16, 16)
    obj = torch.ones(1, 3, 4, 4)
    disc = torch.ones(1, 1, 4, 4)
    composite, mask = paste(background, obj, disc, (2, 6), 2.0)
    assert mask.sum() == 64 and torch.equal(mask[..., 2:10, 6:14], torch.ones(1, 1, 8, 8))
    assert torch.equal(composite, mask.expand(-1, 3, -1, -1))
    out = ComposePaste().call(
        StageContext("paste", 0, torch.device("cpu"), torch.float32),
        PasteParams(position=(2, 6), scale=2.0),
        {"background": background, "object": obj, "object_mask": disc},
    )
    assert torch.equal(out["masked"][mask.expand(-1, 3, -1, -1) == 0], torch.full((576,), 0.5))


def _context(folder: Path, name: str = "generate") -> StageContext:
    from editflow.models import ModelRegistry, ModelSpec, resolve_model

    resolved = resolve_model(
        ModelSpec(folder.name), base_dir=folder.parent, models_dir=folder.parent, hash_memo=None
    )
    models = ModelRegistry(
        resolved, device=torch.device("cpu"), dtype=torch.float32, models_dir=folder.parent
    )
    return StageContext(name, 0, torch.device("cpu"), torch.float32, models=models)


def test_unguided_local_ilvr_on_tiny_inpaint_equals_diffusers_inpaint_pipeline(models_dir):
    from diffusers import StableDiffusionInpaintPipeline

    from editflow.models.tiny import ensure_tiny

    folder = ensure_tiny(models_dir, "tiny-inpaint")
    ctx = _context(folder)
    generator = torch.Generator().manual_seed(3)
    reference = torch.randn(1, 4, 8, 8, generator=generator)
    masked = torch.randn(1, 4, 8, 8, generator=generator)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1
    params = LocalIlvrParams(prompt="a photo", t_in=0.0, t_out=0.0, num_inference_steps=5)
    ours = SampleLocalIlvr().call(
        ctx, params, {"reference": reference, "mask": mask, "masked_reference": masked}
    )["latents"]

    pipe = StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None)
    x_T = torch.randn(1, 4, 8, 8, generator=ctx.generator())  # the stage's first draw
    theirs = pipe(
        "a photo", image=torch.zeros(1, 3, 64, 64), mask_image=1 - mask, masked_image_latents=masked,
        latents=x_T, num_inference_steps=5, guidance_scale=5.0, eta=0.0, output_type="latent",
        height=64, width=64,
    ).images  # fmt: skip
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_background_preset_on_a_4_channel_unet_is_refused(tiny_folder: Path):
    from editflow.errors import EditflowError

    ctx = _context(tiny_folder)
    params = LocalIlvrParams(preset="background", num_inference_steps=2)
    with pytest.raises(EditflowError) as error:
        SampleLocalIlvr().call(
            ctx,
            params,
            {
                "reference": torch.zeros(1, 4, 8, 8),
                "mask": torch.zeros(1, 1, 64, 64),
                "masked_reference": torch.zeros(1, 4, 8, 8),
            },  # fmt: skip
        )
    assert str(error.value) == (
        "stages.generate.preset: preset 'background' needs an inpainting UNet (9 input "
        "channels); this model's UNet takes 4 (set model.id to an inpainting model such as "
        "'tiny-inpaint')"
    )


def test_presets_fill_what_the_recipe_leaves_out():
    immersion = LocalIlvrParams(preset="immersion", n_in=4)
    assert (immersion.t_in, immersion.t_out, immersion.n_in, immersion.repaint_start) == (
        0.5, 1.0, 4, 0.2,
    )  # fmt: skip
    assert LocalIlvrParams(preset="background").t_out == 0.5


def _repaint_reference(steps: int, start: float, jump: int, resamples: int) -> list[int]:
    """RePaint's jump schedule as its paper's code writes it (Lugmayr et al. 2022): ``t`` is
    the number of steps left, ``-1`` the clean image; jumps at every ``jump``-th ``t`` from
    the clean end, only where ``t <= start_resampling - jump``. Returned as our levels
    (``steps - 1 - t``)."""
    jumps = {t: resamples - 1 for t in range(0, steps - jump, jump)}
    start_resampling = int(start * steps)
    t, ts = steps, []
    while t >= 1:
        t -= 1
        ts.append(t)
        if jumps.get(t, 0) > 0 and t <= start_resampling - jump:
            jumps[t] -= 1
            for _ in range(jump):
                t += 1
                ts.append(t)
    ts.append(-1)
    return [steps - 1 - t for t in ts]


@pytest.mark.parametrize(
    "steps, start, jump, resamples",
    [(50, 0.2, 10, 10), (20, 0.2, 2, 2), (10, 0.6, 2, 3), (50, 0.8, 10, 3), (30, 1.0, 5, 4),
     (50, 0.1, 10, 10), (7, 0.5, 3, 2)],
)  # fmt: skip
def test_repaint_jumps_follow_repaints_schedule_from_the_clean_end(steps, start, jump, resamples):
    ours = repaint_schedule(steps, start, jump, resamples)
    assert ours == _repaint_reference(steps, start, jump, resamples)
    if (steps, start, jump) == (50, 0.2, 10):
        # The immersion preset resamples the last 20 % of the steps: levels 40 to 50.
        resampled = {level for level, after in pairwise(ours) if after < level}
        assert min(resampled) == 40 and max(resampled) == 49 and ours[-2:] == [49, 50]


def _resample_1d(x, size: int, kernel: str, axis: int):
    """float64 resampling along ``axis`` with half-pixel centres (what each method's formula
    says): ``linear`` interpolation (source index clamped at 0), or cubic convolution
    (Keys 1981, a = -0.75) with edge samples repeated."""
    import numpy as np

    x = np.moveaxis(x, axis, -1)
    length = x.shape[-1]
    out = np.empty((*x.shape[:-1], size))
    for j in range(size):
        src = (j + 0.5) * length / size - 0.5
        if kernel == "linear":
            src = max(src, 0.0)
            i0 = int(np.floor(src))
            i1, w = min(i0 + 1, length - 1), src - i0
            out[..., j] = (1 - w) * x[..., i0] + w * x[..., i1]
        else:
            a, i0 = -0.75, int(np.floor(src))
            t = src - i0
            total = 0.0
            for k in range(-1, 3):
                d = abs(k - t)
                weight = ((a + 2) * d**3 - (a + 3) * d**2 + 1 if d <= 1
                          else a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a)  # fmt: skip
                total = total + weight * x[..., min(max(i0 + k, 0), length - 1)]
            out[..., j] = total
    return np.moveaxis(out, -1, axis)


@pytest.mark.parametrize("factor", [2, 4])
def test_the_low_pass_filters_follow_their_formulas(factor):
    import numpy as np
    from PIL import Image

    x = torch.randn(1, 2, 16, 24, generator=torch.Generator().manual_seed(3))
    values = x.double().numpy()
    h, w = 16 // factor, 24 // factor
    scale = float(x.abs().max())
    # bilinear both ways (the paper)
    down = _resample_1d(_resample_1d(values, h, "linear", 2), w, "linear", 3)
    bilinear = _resample_1d(_resample_1d(down, 16, "linear", 2), 24, "linear", 3)
    assert np.abs(low_pass(x, factor, "bilinear").double().numpy() - bilinear).max() < 1e-5 * scale
    # editflow's default: block means, then cubic convolution back
    blocks = values.reshape(1, 2, h, factor, w, factor).mean(axis=(3, 5))
    area_bicubic = _resample_1d(_resample_1d(blocks, 16, "cubic", 2), 24, "cubic", 3)
    ours = low_pass(x, factor, "area-bicubic").double().numpy()
    assert np.abs(ours - area_bicubic).max() < 1e-5 * scale
    # the released code's antialiased cubic, against PIL's (the same a = -0.5 kernel, widened)
    peer = np.stack([
        np.asarray(Image.fromarray(channel.astype(np.float32), "F")
                   .resize((w, h), Image.BICUBIC).resize((24, 16), Image.BICUBIC))
        for channel in values[0]
    ])[None]  # fmt: skip
    antialiased = low_pass(x, factor, "antialiased-cubic").double().numpy()
    assert np.abs(antialiased - peer).max() < 1e-4 * scale
    # Three different filters: the choice matters.
    assert np.abs(bilinear - area_bicubic).max() > 1e-2 * scale
    assert np.abs(antialiased - area_bicubic).max() > 1e-2 * scale


@pytest.mark.parametrize(
    "t_in, t_out, transitions",
    [(0.0, 0.5, 20), (0.4, 1.0, 10), (0.3, 0.7, 10), (0.5, 1.0, 23), (1 / 3, 0.0, 9)],
)
def test_both_windows_close_exactly_where_no_pixel_is_guided_any_more(t_in, t_out, transitions):
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1
    guidance = LocalIlvr(torch.zeros(1, 4, 8, 8), mask, t_in=t_in, t_out=t_out, blend_pix=2)
    end = guidance.window_end(transitions)
    for index in range(transitions):
        assert bool(guidance.active(index, transitions).any()) == (index < end), index
    # The released code's test on each transition, in float64: i >= T_out and i >= T_in.
    closed = [i >= t_out * transitions and i >= t_in * transitions for i in range(transitions)]
    assert closed == [index >= end for index in range(transitions)]


@pytest.mark.parametrize("repaint", [False, True], ids=["plain", "repaint"])
@pytest.mark.parametrize("after", ["keep", "generate"])
def test_the_inpainting_unet_is_told_to_generate_everything_only_when_asked(
    models_dir, after, repaint
):
    """What the 9-channel UNet receives at each call, against a hand-written reference: the
    guiding conditioning [1 - M, masked latent], or (generate) mask 1 and masked latent 0
    from the first transition, RePaint's included, at which both windows have closed."""
    from editflow.models.tiny import ensure_tiny

    ctx = _context(ensure_tiny(models_dir, "tiny-inpaint"))
    unet = ctx.models.get("unet")
    seen = []
    hook = unet.register_forward_pre_hook(lambda module, args: seen.append(args[0][:, 4:]))
    generator = torch.Generator().manual_seed(3)
    reference = torch.randn(1, 4, 8, 8, generator=generator)
    masked = torch.randn(1, 4, 8, 8, generator=generator)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:40] = 1
    knobs = {"repaint_start": 0.5, "repaint_jump": 2, "repaint_resamples": 2} if repaint else {}
    params = LocalIlvrParams(prompt="a photo", preset="background", num_inference_steps=8,
                             inpaint_after_window=after, **knobs)  # fmt: skip
    try:
        SampleLocalIlvr().call(
            ctx, params, {"reference": reference, "mask": mask, "masked_reference": masked}
        )
    finally:
        hook.remove()

    levels = repaint_schedule(8, params.repaint_start, 2, 2)
    transitions = len(levels) - 1  # 8, or 16 with two jumps of 2 levels up and down
    small = mask[..., ::8, ::8]  # nearest down-sampling to the 8x8 latent
    guiding = torch.cat([1 - small, masked], dim=1)
    everything = torch.cat([torch.ones_like(small), torch.zeros_like(masked)], dim=1)
    expected = [
        everything if after == "generate" and i >= 0.5 * transitions and i >= 0.0 else guiding
        for i, (level, following) in enumerate(pairwise(levels))
        if following > level  # the UNet runs on denoising transitions only
    ]
    assert len(seen) == len(expected) == 8 + 4 * repaint
    for got, want in zip(seen, expected, strict=True):
        assert torch.equal(got, want.expand(2, -1, -1, -1))  # both halves of CFG alike
    switched = sum(want is everything for want in expected)
    assert switched == {"keep": 0, "generate": 4 if not repaint else 6}[after]


def test_local_ilvr_on_the_pixel_model_puts_the_guided_region_at_the_references_level(
    models_dir,
):
    """METHODS.md's invariant on tiny-pixel (an unconditional UNet2DModel on the image in
    [-1, 1]): with no filtering outside (n_out 1) and t_out 1, after every step the outside is
    the reference noised to the level just reached, with the loop's own draws replayed in
    float64, and the clean reference after the last; the inside is left free."""
    from editflow.models.tiny import ensure_tiny
    from editflow.stages.diffusion import unet_noise_predictor

    ctx = _context(ensure_tiny(models_dir, "tiny-pixel"))
    ddim = DDIMScheduler.from_config(ctx.models.scheduler_config)
    ddim.set_timesteps(5)
    generator = torch.Generator().manual_seed(0)
    reference = torch.rand(1, 3, 32, 32, generator=generator) * 2 - 1
    x_T = torch.randn(1, 3, 32, 32, generator=generator)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    steps = []
    local_ilvr_sample(
        unet_noise_predictor(ctx.models.get("unet")), x_T, ddim, None,
        guidance=LocalIlvr(reference, mask, n_in=2, n_out=1, t_in=0.0, t_out=1.0),
        guidance_scale=1.0, generator=torch.Generator().manual_seed(1),
        callback=lambda info: steps.append(info["x"]),
    )  # fmt: skip
    replay = torch.Generator().manual_seed(1)  # eta 0: the reference's noise is every draw
    outside, inside = (mask == 0).expand(-1, 3, -1, -1), (mask == 1).expand(-1, 3, -1, -1)
    for i, x in enumerate(steps):
        target = reference.double()
        if i + 1 < len(steps):
            abar = ddim.alphas_cumprod[int(ddim.timesteps[i + 1])].double()
            noise = torch.randn(reference.shape, generator=replay).double()
            target = abar.sqrt() * target + (1 - abar).sqrt() * noise
        assert (x.double() - target)[outside].abs().max() < 1e-5, i
        assert (x.double() - target)[inside].abs().max() > 1e-2, i


@pytest.mark.parametrize("space", ["xt", "x0"])
def test_full_guidance_on_the_pixel_model_returns_the_reference(models_dir, space):
    from editflow.models.tiny import ensure_tiny

    ctx = _context(ensure_tiny(models_dir, "tiny-pixel"))
    reference = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    params = LocalIlvrParams(t_in=1.0, t_out=1.0, space=space, num_inference_steps=4)
    out = SampleLocalIlvr().call(ctx, params, {"reference": reference, "mask": mask})["latents"]
    assert out.shape == reference.shape and torch.allclose(out, reference, atol=1e-5)
