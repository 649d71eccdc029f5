"""Cross-domain compositing (Hachnochi et al. 2023): local ILVR guidance with RePaint.

The user pastes an object into a background (a photo into a painting, scribbles into a
photo); sampling is pulled towards that reference composite ``y`` with its own low-pass
filter and its own time window inside and outside the object mask ``M`` (METHODS.md §3):

- After every denoising step (the last included), the reference is brought to the level the
  latent is now at (fresh seeded noise; the clean reference after the last step), and
  ``diff = y_t - x_t`` is low-passed twice, by ``n_in`` and by ``n_out`` (down-sample by
  area averaging, up-sample bicubically; 1 = no filtering). The two are blended by ``M``
  and added where the pixel's guidance window is still open: a pixel is guided while the
  transition index is below ``t_out + (t_in - t_out) * M`` times the number of transitions.
- ``space = "x0"``: the difference is taken between the clean reference and the model's
  ``x0_hat``; the corrected ``x0_hat`` is re-noised to the current level (no filtering of
  noise).
- ``blend_pix > 0`` grows a linear ramp outward from the mask by repeated 3x3 dilation (in
  latent pixels), so the two regions meet without a seam; the guidance window is ramped the
  same way.
- RePaint (Lugmayr et al. 2022): in the last ``repaint_start`` fraction of the schedule,
  at the jump points of RePaint's schedule (every ``jump`` levels counted from the CLEAN
  end, the last one just before the final step) the sampler goes back up ``jump`` levels
  (re-noising the latest ``x0_hat``, fresh noise per transition) and denoises again,
  ``resamples - 1`` times, so ``repaint_start = 0.2`` resamples the last 20 % of the steps.
  The guidance windows count these extra transitions. (Implemented from RePaint's published
  schedule; the compositing authors' scheduler file is under a non-commercial licence and was
  not used.)

- An inpainting UNet's conditioning may change once both windows have closed
  (``predict_after_window``): the released code then tells the model to generate everything
  (mask 1, masked latent 0); the stage keeps ``[1 - M, masked latent]`` unless asked.

Differences from the released code, on purpose: the reference is noised to the level the
latent has AFTER the step (the released code uses the level before it, one step noisier),
and the last step's guidance uses the clean reference, so with no filtering and full
windows the result is the reference's latent exactly.

The loop is the same on a pixel-space model: there ``x`` is the image in [-1, 1] and every
"latent pixel" above is an image pixel.

The loop follows the contract of :mod:`editflow.stages.diffusion`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from editflow.lazy import lazy, no_grad
from editflow.stages.diffusion import Callback, NoisePredictor, cpu_randn, guided_noise

torch = lazy("torch")
F = lazy("torch.nn.functional")


# How the low-pass filter resamples, down then up (``lowpass``):
# - "area-bicubic" (editflow's default): the mean of each factor x factor block, then bicubic
#   (a = -0.75) back; the block mean is the exact low-pass of the down-sampling step.
# - "bilinear": bilinear both ways (half-pixel centres), as the paper describes it.
# - "antialiased-cubic": cubic (a = -0.5) with its kernel widened by the factor both ways,
#   antialiased like PIL and ResizeRight, as the authors' released code resamples.
LowPass = Literal["area-bicubic", "bilinear", "antialiased-cubic"]


def low_pass(x: torch.Tensor, factor: int, kind: LowPass = "area-bicubic") -> torch.Tensor:
    """ILVR's low-pass filter (Choi et al. 2021): down-sample by ``factor``, up-sample back.

    Args:
        x: (N, C, h, w) with ``h`` and ``w`` divisible by ``factor``.
        factor: 1 returns ``x`` itself.
        kind: The resampling, down and up (:data:`LowPass`).
    """
    if factor == 1:
        return x
    height, width = x.shape[-2:]
    small = (height // factor, width // factor)
    if kind == "bilinear":
        down = F.interpolate(x, size=small, mode="bilinear", align_corners=False)
        return F.interpolate(down, size=(height, width), mode="bilinear", align_corners=False)
    if kind == "antialiased-cubic":
        down = F.interpolate(x, size=small, mode="bicubic", align_corners=False, antialias=True)
        return F.interpolate(
            down, size=(height, width), mode="bicubic", align_corners=False, antialias=True
        )
    down = F.interpolate(x, size=small, mode="area")
    return F.interpolate(down, size=(height, width), mode="bicubic", align_corners=False)


def grow_mask(mask: torch.Tensor, blend_pix: int) -> torch.Tensor:
    """A linear ramp grown outward from a mask by repeated 3x3 dilation (mask smoothing).

    ``sum_{i < n} dilate^i(mask) / n``: 1 inside the mask, ``(n - d) / n`` at chessboard
    distance ``d < n`` outside it, 0 beyond.

    Args:
        mask: (N, 1, h, w) in [0, 1].
        blend_pix: Ramp width ``n`` in pixels; 0 returns the mask unchanged (hard).
    """
    if blend_pix == 0:
        return mask
    ramp = torch.zeros_like(mask)
    grown = mask
    for _ in range(blend_pix):
        ramp = ramp + grown / blend_pix
        grown = F.max_pool2d(grown, kernel_size=3, stride=1, padding=1)
    return ramp


def repaint_schedule(num_steps: int, start: float, jump: int, resamples: int) -> list[int]:
    """The levels RePaint visits (Lugmayr et al. 2022, the jump schedule), in order.

    Levels are positions in the scheduler's timesteps: 0 is the noisiest, ``num_steps`` the
    clean latent. Without resampling this is ``0, 1, ..., num_steps``. With it, RePaint's
    schedule counts from the clean end: with ``r = num_steps - 1 - p`` the steps left after
    level ``p``, arriving at a level with ``r`` a multiple of ``jump`` (``r = 0`` is the level
    just before the final step), ``r + jump < num_steps`` and ``r + jump`` within the last
    ``int(start * num_steps)`` steps goes back up ``jump`` levels and down again,
    ``resamples - 1`` times.

    Args:
        num_steps: Denoising steps of the plain schedule.
        start: Fraction of the schedule, counted from its clean end, where jumps happen
            (0 = never).
        jump: Levels per jump.
        resamples: Passes through each jumped section (1 = no resampling).
    """
    if start <= 0 or resamples <= 1:
        return list(range(num_steps + 1))
    window = int(start * num_steps)
    remaining = {
        num_steps - 1 - left: resamples - 1
        for left in range(0, num_steps - jump, jump)
        if left + jump <= window
    }
    levels, level = [0], 0
    while level < num_steps:
        if remaining.get(level, 0) > 0:
            remaining[level] -= 1
            for _ in range(jump):
                level -= 1
                levels.append(level)
        level += 1
        levels.append(level)
    return levels


@dataclass(frozen=True)
class LocalIlvr:
    """The guidance of one sampling run (see the module docstring).

    Attributes:
        reference: (N, C, h, w) the composite's clean latent ``y``.
        mask: (N, 1, h, w) 1 inside the object, hard (0 or 1), at latent resolution.
        n_in: Low-pass factor inside the mask.
        n_out: Low-pass factor outside.
        t_in: Fraction of the transitions with guidance inside.
        t_out: Fraction outside.
        space: ``"xt"`` or ``"x0"``.
        blend_pix: Mask smoothing ramp in latent pixels (0 = hard).
    """

    reference: torch.Tensor
    mask: torch.Tensor
    n_in: int = 1
    n_out: int = 1
    t_in: float = 0.0
    t_out: float = 1.0
    space: str = "xt"
    blend_pix: int = 0
    lowpass: LowPass = "area-bicubic"

    def correction(self, target: torch.Tensor, current: torch.Tensor, active: torch.Tensor):
        """``active * (M_b LP_in(target - current) + (1 - M_b) LP_out(target - current))``."""
        diff = target - current
        soft = grow_mask(self.mask, self.blend_pix)
        inside, outside = (
            low_pass(diff, self.n_in, self.lowpass),
            low_pass(diff, self.n_out, self.lowpass),
        )
        blended = soft * inside + (1 - soft) * outside
        return active * blended

    def active(self, transition: int, transitions: int) -> torch.Tensor:
        """(N, 1, h, w) where guidance is on at this transition (ramped like the mask)."""
        thresholds = (self.t_out + (self.t_in - self.t_out) * self.mask) * transitions
        return grow_mask((transition < thresholds).to(self.mask.dtype), self.blend_pix)

    def window_end(self, transitions: int) -> float:
        """The first transition index at which neither window is open, inside or outside.

        The released code's test ``i >= T_out and i >= T_in``. Computed with :meth:`active`'s
        arithmetic in the mask's dtype at M = 0 and M = 1, so that "closed" never disagrees
        with a pixel still guided; on a CPU tensor, so the loop never waits for the device.
        """
        corners = torch.tensor([0.0, 1.0], dtype=self.mask.dtype)
        thresholds = (self.t_out + (self.t_in - self.t_out) * corners) * transitions
        return float(thresholds.max())


def noise_to(
    x0: torch.Tensor, abar: torch.Tensor | float, generator: torch.Generator | None
) -> torch.Tensor:
    """DDPM forward marginal (Ho et al. 2020, eq. 4): ``sqrt(abar) x0 + sqrt(1 - abar) eps``,
    with ``eps`` drawn on the CPU from ``generator`` (device-independent numbers)."""
    noise = cpu_randn(x0.shape, generator, like=x0)
    return abar**0.5 * x0 + (1 - abar) ** 0.5 * noise


@no_grad
def local_ilvr_sample(
    predict: NoisePredictor,
    x: torch.Tensor,
    scheduler,
    cond: torch.Tensor,
    uncond: torch.Tensor | None = None,
    *,
    guidance: LocalIlvr | None,
    predict_after_window: NoisePredictor | None = None,
    guidance_scale: float = 5.0,
    eta: float = 0.0,
    start: int = 0,
    repaint_start: float = 0.0,
    repaint_jump: int = 10,
    repaint_resamples: int = 10,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DDIM sampling with local ILVR guidance and RePaint resampling (Hachnochi et al. 2023).

    Args:
        predict: Noise predictor (an inpainting UNet wrapped with its extra channels).
        x: (N, C, h, w) the latent at level ``start``.
        scheduler: A ``DDIMScheduler`` from the model's config, ``set_timesteps`` called.
        cond: (N, tokens, D) prompt embeddings, or ``None`` for an unconditional model.
        uncond: (N, tokens, D) negative embeddings, or ``None`` for no CFG.
        guidance: The local ILVR guidance, or ``None`` for plain DDIM.
        predict_after_window: The noise predictor from the first transition at which both
            guidance windows are closed (:meth:`LocalIlvr.window_end`; from the start without
            guidance), or ``None`` to keep ``predict`` throughout. The released code switches
            an inpainting UNet to "generate everything" there.
        guidance_scale: CFG scale.
        eta: DDIM eta (noise drawn from ``generator``).
        start: Level the sampling starts at (``strength`` < 1 skips the noisiest levels).
        repaint_start: Fraction of the schedule, from its clean end, with RePaint jumps.
        repaint_jump: Levels per jump.
        repaint_resamples: Passes through each jumped section.
        generator: CPU generator for every draw (reference noise, re-noising, eta).
        callback: Called after every denoising transition with a ``StepInfo``.

    Returns:
        (N, C, h, w) the sampled clean latents.
    """
    from editflow.stages.ddim_loops import ddim_step

    timesteps = scheduler.timesteps
    num_steps = len(timesteps)
    levels = repaint_schedule(num_steps - start, repaint_start, repaint_jump, repaint_resamples)
    levels = [start + level for level in levels]
    transitions = len(levels) - 1
    alphas = scheduler.alphas_cumprod.to(x.device)
    window_end = guidance.window_end(transitions) if guidance is not None else 0.0

    def abar(level: int) -> torch.Tensor:
        return alphas[int(timesteps[level])].to(x.dtype)

    denoised = x
    for index, (level, after) in enumerate(zip(levels[:-1], levels[1:], strict=True)):
        if after < level:  # RePaint: back up one level from the latest clean estimate
            x = noise_to(denoised, abar(after), generator)
            continue
        t = timesteps[level]
        closed = predict_after_window is not None and index >= window_end
        model = predict_after_window if closed else predict
        model_input = scheduler.scale_model_input(x, t)
        eps = guided_noise(model, model_input, t, cond, uncond, guidance_scale)
        step = ddim_step(scheduler, eps, t, x, eta, generator)
        x, denoised = step.prev_sample, step.pred_original_sample
        if guidance is not None:
            active = guidance.active(index, transitions)
            clean = after == num_steps
            if guidance.space == "x0":
                corrected = denoised + guidance.correction(guidance.reference, denoised, active)
                x = corrected if clean else noise_to(corrected, abar(after), generator)
            else:
                target = guidance.reference
                if not clean:
                    target = noise_to(guidance.reference, abar(after), generator)
                x = x + guidance.correction(target, x, active)
        if callback is not None:
            callback({"i": index, "t": t, "x": x, "denoised": denoised, "eps": eps})
    return x
