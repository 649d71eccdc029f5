"""Edit-friendly DDPM inversion (Huberman-Spiegelglas, Kulikov, Michaeli; CVPR 2024).

The method, as editflow runs it (METHODS.md section 1; reference code inbarhub/DDPM_inversion):

1. Auxiliary path. Draw one standard normal ``n_i`` per noise level, independently, and set
   ``x_i = alpha_i x0 + sigma_i n_i`` (``alpha_i = sqrt(abar_i)``, ``sigma_i = sqrt(1 - abar_i)``)
   for the ``T`` levels the scheduler visits; the last level is the clean ``x0`` itself, as in
   the released code.
2. Inversion. Walk from the noisiest level down. At each step compute ``eps_hat`` at ``x_i``
   (CFG on the source prompt), the posterior mean ``mu_i`` of the scheduler's reverse step and
   the scale of its noise term, and solve for the noise map
   ``z_i = (x_{i+1} - mu_i) / scale_i``. Then overwrite ``x_{i+1} = mu_i + scale_i z_i`` so
   rounding cannot accumulate (the edit then retraces the inversion bit for bit).
3. Edit. Start from the auxiliary ``x`` at level ``skip`` and run the same reverse steps with
   CFG on the target prompt, adding the stored ``z_i`` instead of fresh noise.

Indexing (all sequences are noisiest first, the order the edit consumes them):

- ``timesteps[i]``: the scheduler's i-th timestep, ``i = 0 .. T-1``.
- ``auxiliary_path[i]``, ``i = 0 .. T``: the latent at level ``i``; ``auxiliary_path[0]`` is
  ``x_T`` and ``auxiliary_path[T]`` is ``x0`` (both after the error guard).
- ``noise_maps[i]``: the noise of the step from level ``i`` to level ``i + 1``.
- ``skip``: the edit starts at level ``skip`` (the paper's ``T - skip``), so it runs the
  ``T - skip`` steps ``i = skip .. T-1`` and uses ``noise_maps[skip:]``.

The reverse steps (DDIM with ``eta^2 sigma_t^2``, or SDE DPM-Solver++ of order 2 as in
LEDITS++) live in :mod:`editflow.stages.edit_friendly.reverse_steps`. The last noise map is kept (the
released code zeroes it): it absorbs the last step's residual, which is what makes the
reconstruction exact.

Colour manipulation (described in the paper, absent from its code; this form is editflow's):
for each edit step inside the window, the noise map is replaced by
``z_i + s * B * (M_latent - x0_hat)`` before it is used, where

- everything is in LATENT space: ``M_latent`` is the colour image encoded by the VAE
  (posterior mean times the scaling factor, like the input image) and ``B`` is the mask
  area-averaged down to the latent grid (soft values at its edge);
- ``x0_hat`` is the clean latent predicted at the current ``x_i`` from the same guided
  (target prompt, ``cfg_tar``) noise estimate the step uses;
- the window ``(start, end)`` counts edit steps from the first reverse step the edit runs
  (step 0 is the step out of level ``skip``), inclusive at both ends; ``None`` means every
  edit step.

Why this form: it is the paper's rule, applied where editflow can apply it cheaply. The term
enters ``x_{i+1}`` multiplied by the step's noise scale, so it moves the next prediction of the
clean latent by about ``s * scale_i / alpha_{i+1}`` of the remaining gap to the colour: several
times ``s`` at the noisiest steps (about ``4 s`` on the first of 100 DDIM steps), a few tenths
of ``s`` midway and nothing at the end, so colour and layout follow the target while the last
steps, outside a late window, restore texture. Later steps correct an early overshoot, so
strengths of about 0.05 to 1 are useful. ``B`` confines the pull to the mask (the model may
still carry it across the mask's edge). Latent space costs one VAE encoding per edit instead of
a decode and an encode per step.
"""

from __future__ import annotations

from dataclasses import dataclass

from editflow.lazy import lazy, no_grad
from editflow.stages.base import StepSequence
from editflow.stages.diffusion import Callback, NoisePredictor, cpu_randn, guided_noise
from editflow.stages.edit_friendly.reverse_steps import Scheduler, level_scales, reverse_step

torch = lazy("torch")


@dataclass(frozen=True)
class EditFriendlyInversion:
    """What the inversion produces (indexing: see the module docstring).

    Attributes:
        x_T: (N, C, h, w) the noisiest level, ``auxiliary_path[0]``.
        noise_maps: (T, N, C, h, w); ``noise_maps[i]`` is the noise of the step out of level i.
        auxiliary_path: (T + 1, N, C, h, w); level 0 is ``x_T``, level ``T`` is ``x0``.
            The edit reads both a step at a time (any step sequence of tensors).
        timesteps: (T,) the scheduler's timesteps, noisiest first.
    """

    x_T: torch.Tensor
    noise_maps: StepSequence
    auxiliary_path: StepSequence
    timesteps: torch.Tensor


def auxiliary_path(
    x0: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Edit-friendly auxiliary path (Huberman-Spiegelglas et al. 2024, Alg. 1, first loop).

    ``x_i = alpha_i x0 + sigma_i n_i`` with every ``n_i`` an INDEPENDENT standard normal draw
    (one (T, N, C, h, w) draw from ``generator``, on the CPU so results do not depend on the
    device), and the last level the clean ``x0``.

    Args:
        x0: (N, C, h, w) clean latents.
        alpha: (T,) the levels' ``sqrt(abar)``.
        sigma: (T,) the levels' ``sqrt(1 - abar)``.
        generator: A CPU generator.

    Returns:
        (T + 1, N, C, h, w) in ``x0``'s dtype and device.
    """
    noise = cpu_randn((len(alpha), *x0.shape), generator, like=x0)
    per_level = (-1,) + (1,) * x0.dim()
    alpha = alpha.to(device=x0.device, dtype=x0.dtype).view(per_level)
    sigma = sigma.to(device=x0.device, dtype=x0.dtype).view(per_level)
    return torch.cat([alpha * x0 + sigma * noise, x0[None]])


@no_grad
def edit_friendly_invert(
    predict: NoisePredictor,
    x0: torch.Tensor,
    scheduler: Scheduler,
    cond: torch.Tensor,
    uncond: torch.Tensor | None = None,
    *,
    guidance_scale: float,
    eta: float,
    generator: torch.Generator,
    callback: Callback | None = None,
) -> EditFriendlyInversion:
    """Edit-friendly DDPM inversion (Huberman-Spiegelglas et al. 2024, Alg. 1).

    For each level ``i`` (noisiest first): ``eps_hat`` at ``x_i`` with CFG, the step's mean
    ``mu_i`` and noise scale, ``z_i = (x_{i+1} - mu_i) / scale_i``, then the error guard
    ``x_{i+1} = mu_i + scale_i z_i``. A step without noise (scale 0) gets ``z_i = 0``.

    Args:
        predict: The noise predictor ``(x, t, embeds) -> model output``.
        x0: (N, C, h, w) clean latents.
        scheduler: From :func:`build_scheduler` (or any DDIM / sde-dpmsolver++ order-2
            scheduler after ``set_timesteps`` that has not stepped); copied, never mutated.
        cond: (N, tokens, D) source-prompt embeddings.
        uncond: (N, tokens, D) unconditional embeddings, or ``None`` for no CFG (what an empty
            source prompt means).
        guidance_scale: CFG scale on the source prompt (the paper's ``cfg_src``).
        eta: DDIM eta, 0 < eta <= 1 (exactly 1 for sde-dpmsolver++).
        generator: CPU generator for the auxiliary path.
        callback: Called after every step with a ``StepInfo`` (``z`` is the noise map,
            ``x_in`` and ``x`` the path's levels ``i`` and ``i + 1``).

    Returns:
        The :class:`EditFriendlyInversion`.
    """
    step = reverse_step(scheduler, eta)
    timesteps = scheduler.timesteps
    num_steps = len(timesteps)
    alpha, sigma = level_scales(scheduler)
    path = auxiliary_path(x0, alpha[:num_steps], sigma[:num_steps], generator)  # (T+1, N, C, h, w)
    noise_maps = torch.zeros((num_steps, *x0.shape), device=x0.device, dtype=x0.dtype)
    for i, t in enumerate(timesteps):
        model_output = guided_noise(predict, path[i], t, cond, uncond, guidance_scale)
        if callback is not None:
            denoised = step.x0_hat(model_output, t, path[i])
        mu, scale = step.mean_and_scale(model_output, t, path[i])
        # A step without noise keeps z = 0; torch.where, not `if`, so the loop never waits
        # for the device to tell the scale's sign.
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        noise_maps[i] = torch.where(scale > 0, (path[i + 1] - mu) / safe, noise_maps[i])
        path[i + 1] = mu + scale * noise_maps[i]
        if callback is not None:
            x, z = path[i + 1], noise_maps[i]
            callback({"i": i, "t": t, "x": x, "x_in": path[i], "denoised": denoised, "z": z})
    return EditFriendlyInversion(path[0], noise_maps, path, timesteps)


@dataclass(frozen=True)
class ColourGuidance:
    """Colour manipulation (Huberman-Spiegelglas et al. 2024), in editflow's own latent form.

    Inside the window each noise map becomes ``z + strength * mask * (colour_latent - x0_hat)``
    (see the module docstring for what each term is and why).

    Attributes:
        mask: (N, 1, h, w) ``B`` at latent resolution, in [0, 1].
        colour_latent: (N, C, h, w) ``M_latent``, the VAE encoding of the colour image.
        strength: ``s`` >= 0.
        window: ``(start, end)`` edit steps counted from the edit's first reverse step,
            inclusive; ``None`` for every edit step.
    """

    mask: torch.Tensor
    colour_latent: torch.Tensor
    strength: float
    window: tuple[int, int] | None = None

    def active(self, edit_step: int) -> bool:
        return self.window is None or self.window[0] <= edit_step <= self.window[1]

    def apply(self, z: torch.Tensor, x0_hat: torch.Tensor) -> torch.Tensor:
        return z + self.strength * self.mask * (self.colour_latent - x0_hat)


@no_grad
def edit_friendly_sample(
    predict: NoisePredictor,
    inversion: EditFriendlyInversion,
    scheduler: Scheduler,
    cond: torch.Tensor,
    uncond: torch.Tensor | None = None,
    *,
    guidance_scale: float,
    skip: int,
    eta: float,
    shift: tuple[int, int] = (0, 0),
    colour: ColourGuidance | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DDPM sampling driven by stored edit-friendly noise maps (Huberman-Spiegelglas et al. 2024).

    Start from ``auxiliary_path[skip]`` and run the reverse steps ``skip .. T-1`` with CFG on the
    target prompt, adding the stored ``noise_maps[i]`` instead of fresh noise. ``shift`` rolls
    the start and every noise map by ``(dy, dx)`` latent pixels (the paper's image shift).
    With ``skip = 0``, the source prompt, ``cfg_tar = cfg_src`` and no shift this retraces the
    inversion exactly.

    For the multistep sde-dpmsolver++ with ``skip > 0`` the solver's history is first filled by
    one step out of ``auxiliary_path[skip - 1]`` (output discarded), so the first edit step is
    second order like the inversion's step there: one extra model call.

    Args:
        predict: The noise predictor.
        inversion: From :func:`edit_friendly_invert` with the same scheduler settings.
        scheduler: Built like the inversion's (same kind, steps and eta); never mutated.
        cond: (N, tokens, D) target-prompt embeddings.
        uncond: (N, tokens, D) unconditional embeddings, or ``None`` for no CFG.
        guidance_scale: CFG scale on the target prompt (the paper's ``cfg_tar``).
        skip: Levels skipped, ``0 <= skip < T``.
        eta: DDIM eta, the inversion's.
        shift: ``(dy, dx)`` roll over the last two dims.
        colour: Optional colour manipulation.
        callback: Called after every step with a ``StepInfo`` (``z`` is the noise map used).

    Returns:
        (N, C, h, w) the edited clean latents.
    """
    step = reverse_step(scheduler, eta)
    timesteps = scheduler.timesteps
    num_steps = len(timesteps)
    if len(inversion.noise_maps) != num_steps or len(inversion.auxiliary_path) != num_steps + 1:
        raise ValueError(
            f"the inversion has {len(inversion.noise_maps)} steps, the scheduler {num_steps}"
        )
    if not torch.equal(inversion.timesteps.cpu(), timesteps.cpu()):
        raise ValueError("the inversion was made with other timesteps than this scheduler's")
    if not 0 <= skip < num_steps:
        raise ValueError(f"skip must be in [0, {num_steps}), got {skip}")

    def shifted(x: torch.Tensor) -> torch.Tensor:
        return torch.roll(x, shifts=tuple(shift), dims=(-2, -1)) if any(shift) else x

    if step.multistep and skip > 0:
        t_warm, x_warm = timesteps[skip - 1], shifted(inversion.auxiliary_path[skip - 1])
        model_output = guided_noise(predict, x_warm, t_warm, cond, uncond, guidance_scale)
        step.mean_and_scale(model_output, t_warm, x_warm)

    x = shifted(inversion.auxiliary_path[skip])
    for i in range(skip, num_steps):
        t = timesteps[i]
        model_output = guided_noise(predict, x, t, cond, uncond, guidance_scale)
        z = shifted(inversion.noise_maps[i])
        colour_on = colour is not None and colour.active(i - skip)
        denoised = step.x0_hat(model_output, t, x) if colour_on or callback else None
        if colour_on:
            z = colour.apply(z, denoised)
        x = step.step(model_output, t, x, z)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": denoised, "z": z})
    return x
