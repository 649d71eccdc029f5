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

Two schedulers, both built from the model's scheduler config (:func:`build_scheduler`):

- ``"ddim"``: diffusers' ``DDIMScheduler``; timesteps, ``alphas_cumprod`` and the previous-step
  rule are read from it. The posterior is DDIM's eq. 12/16 with ``eta^2 sigma_t^2`` (the
  released code writes ``eta sigma_t^2``; the two agree only at ``eta = 1``).
- ``"dpmsolver++"``: ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++",
  solver_order=2)``, what LEDITS++ uses. Its own ``step`` computes the mean (with zero noise)
  and the edit; the noise scale ``sigma_t sqrt(1 - exp(-2h))`` is computed in closed form from
  the same sigmas. Its noise level is fixed, so ``eta`` must be 1.

Both are built so that the last step still carries noise (``set_alpha_to_one=False`` for
DDIM, ``final_sigmas_type="sigma_min"`` for DPM-Solver: the last step lands on
``alphas_cumprod[0]``). Without that the last noise map would be multiplied by zero, could not
absorb the residual, and the reconstruction would not be exact.

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

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from pydantic import Field, model_validator

from editflow.errors import EditflowError
from editflow.stages.base import ArtifactType, Params, Port, StageContext, StageKind
from editflow.stages.diffusion import (
    NoisePredictor,
    encode_prompt_pair,
    guided_noise,
    unet_noise_predictor,
    vae_encode,
)

SchedulerName = Literal["ddim", "dpmsolver++"]
Scheduler = DDIMScheduler | DPMSolverMultistepScheduler
# Called once per step with {"i", "t", "x", "z"}: step index, timestep, x after the step, noise.
Callback = Callable[[dict[str, Any]], None]


# ------------------------------------------------------------------------------------------
# Schedulers


def build_scheduler(
    name: SchedulerName,
    config: Any,
    num_inference_steps: int,
    device: torch.device | str | None = None,
) -> Scheduler:
    """The reverse step (DDIM, Song et al. 2021; SDE-DPM-Solver++, Lu et al. 2022) from the model.

    Built from the MODEL's scheduler config, with its timesteps set.

    Overrides only what edit-friendly inversion needs: a noisy last step (see the module
    docstring) and, for ``"dpmsolver++"``, the SDE solver of order 2 that LEDITS++ uses.

    Args:
        name: ``"ddim"`` or ``"dpmsolver++"``.
        config: The model's scheduler config (any diffusers scheduler's).
        num_inference_steps: ``T``.
        device: Where the timesteps live.
    """
    if name == "ddim":
        scheduler = DDIMScheduler.from_config(config, set_alpha_to_one=False)
    elif name == "dpmsolver++":
        scheduler = DPMSolverMultistepScheduler.from_config(
            config,
            algorithm_type="sde-dpmsolver++",
            solver_order=2,
            final_sigmas_type="sigma_min",
        )
    else:
        raise ValueError(f"unknown scheduler {name!r}")
    scheduler.set_timesteps(num_inference_steps, device=device)
    return scheduler


def _ddim_prev_timestep(scheduler: DDIMScheduler, t: int) -> int:
    # Copied from diffusers.schedulers.scheduling_ddim.DDIMScheduler.step (step 1).
    return t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps


def _ddim_abar(scheduler: DDIMScheduler, t: int) -> torch.Tensor:
    return scheduler.alphas_cumprod[t] if t >= 0 else scheduler.final_alpha_cumprod


def level_scales(scheduler: Scheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """DDPM marginals (Ho et al. 2020, eq. 4) ``x_i = alpha_i x0 + sigma_i n`` per scheduler level.

    Args:
        scheduler: A scheduler after ``set_timesteps``.

    Returns:
        ``alpha`` and ``sigma``, each (T + 1,) float32 on the CPU: entries ``0 .. T-1`` are the
        levels of ``scheduler.timesteps``, entry ``T`` the level its last step lands on.
    """
    if isinstance(scheduler, DPMSolverMultistepScheduler):
        return scheduler._sigma_to_alpha_sigma_t(scheduler.sigmas.float())
    timesteps = [int(t) for t in scheduler.timesteps]
    last = _ddim_prev_timestep(scheduler, timesteps[-1])
    abar = torch.stack([_ddim_abar(scheduler, t) for t in [*timesteps, last]]).float().cpu()
    return abar.sqrt(), (1 - abar).sqrt()


def _split_model_output(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    prediction_type: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps_hat, x0_hat) from a model output of any diffusers prediction type."""
    if prediction_type == "epsilon":
        return model_output, (x_t - sigma * model_output) / alpha
    if prediction_type == "v_prediction":
        return alpha * model_output + sigma * x_t, alpha * x_t - sigma * model_output
    if prediction_type == "sample":
        return (x_t - alpha * model_output) / sigma, model_output
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def ddim_posterior(
    model_output: torch.Tensor,
    t: int,
    x_t: torch.Tensor,
    scheduler: DDIMScheduler,
    eta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DDIM reverse step (Song et al. 2021, eq. 12 and 16) split into mean and noise scale.

    ``x_prev = mu + eta sigma_t z`` with
    ``mu = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - eta^2 sigma_t^2) eps_hat`` and
    ``sigma_t^2 = (1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev)``. Same arithmetic as
    ``DDIMScheduler.step`` (including ``clip_sample``), so ``mu + scale z`` equals
    ``step(..., eta=eta, variance_noise=z)``.

    Args:
        model_output: (N, C, h, w) the (guided) model output at ``x_t``.
        t: The timestep.
        x_t: (N, C, h, w).
        scheduler: A ``DDIMScheduler`` after ``set_timesteps``.
        eta: The noise weight, 0 < eta <= 1 for noise maps to exist.

    Returns:
        ``mu`` (N, C, h, w), the noise scale ``eta sigma_t`` (0-d) and ``x0_hat`` (N, C, h, w).
    """
    prev_t = _ddim_prev_timestep(scheduler, t)
    abar_t, abar_prev = _ddim_abar(scheduler, t), _ddim_abar(scheduler, prev_t)
    eps_hat, x0_hat = _split_model_output(
        model_output, x_t, abar_t**0.5, (1 - abar_t) ** 0.5, scheduler.config.prediction_type
    )
    if scheduler.config.thresholding:
        raise ValueError("edit-friendly inversion does not support dynamic thresholding")
    if scheduler.config.clip_sample:
        limit = scheduler.config.clip_sample_range
        x0_hat = x0_hat.clamp(-limit, limit)
    variance = ((1 - abar_prev) / (1 - abar_t)) * (1 - abar_t / abar_prev)
    scale = eta * variance**0.5
    mu = abar_prev**0.5 * x0_hat + (1 - abar_prev - scale**2) ** 0.5 * eps_hat
    return mu, scale, x0_hat


def sde_dpmsolver_noise_scale(scheduler: DPMSolverMultistepScheduler) -> torch.Tensor:
    """Noise coefficient of the sde-dpmsolver++ update (Lu et al. 2022, DPM-Solver++ SDE).

    ``sigma_t sqrt(1 - exp(-2 h))`` with ``h = lambda_t - lambda_s`` and
    ``lambda = log(alpha) - log(sigma)``; the first- and second-order updates share it.
    Written with the same operations as diffusers' ``dpm_solver_first_order_update`` so the
    product with a noise map is bit-identical to the one inside ``step``.

    Args:
        scheduler: With ``step_index`` set to the step about to be taken.

    Returns:
        A 0-d float32 tensor on the CPU.
    """
    sigma_t, sigma_s = (
        scheduler.sigmas[scheduler.step_index + 1],
        scheduler.sigmas[scheduler.step_index],
    )
    alpha_t, sigma_t = scheduler._sigma_to_alpha_sigma_t(sigma_t)
    alpha_s, sigma_s = scheduler._sigma_to_alpha_sigma_t(sigma_s)
    h = (torch.log(alpha_t) - torch.log(sigma_t)) - (torch.log(alpha_s) - torch.log(sigma_s))
    return sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h))


class _DdimStep:
    """DDIM(eta) reverse steps; stateless, so the same object serves any start level."""

    multistep = False

    def __init__(self, scheduler: DDIMScheduler, eta: float) -> None:
        self.scheduler, self.eta = scheduler, eta

    def mean_and_scale(self, model_output, t, x_t):
        mu, scale, _ = ddim_posterior(model_output, int(t), x_t, self.scheduler, self.eta)
        return mu, scale

    def x0_hat(self, model_output, t, x_t):
        return ddim_posterior(model_output, int(t), x_t, self.scheduler, self.eta)[2]

    def step(self, model_output, t, x_t, z):
        mu, scale = self.mean_and_scale(model_output, t, x_t)
        return mu + scale * z


class _SdeDpmSolverStep:
    """sde-dpmsolver++ steps driven through the scheduler's own (stateful, multistep) ``step``."""

    multistep = True

    def __init__(self, scheduler: DPMSolverMultistepScheduler) -> None:
        self.scheduler = scheduler

    def _start(self, t) -> None:
        if self.scheduler.step_index is None:
            self.scheduler._init_step_index(t)

    def mean_and_scale(self, model_output, t, x_t):
        self._start(t)
        scale = sde_dpmsolver_noise_scale(self.scheduler)
        zero = torch.zeros_like(x_t)
        return self.scheduler.step(model_output, t, x_t, variance_noise=zero).prev_sample, scale

    def x0_hat(self, model_output, t, x_t):
        self._start(t)
        return self.scheduler.convert_model_output(model_output, sample=x_t)

    def step(self, model_output, t, x_t, z):
        return self.scheduler.step(model_output, t, x_t, variance_noise=z).prev_sample


def _reverse_step(scheduler: Scheduler, eta: float) -> _DdimStep | _SdeDpmSolverStep:
    """A private copy of the scheduler wrapped as a reverse step; the caller's is never mutated."""
    if not eta > 0:
        raise ValueError(f"eta must be > 0 for noise maps to exist, got {eta}")
    if isinstance(scheduler, DDIMScheduler):
        return _DdimStep(scheduler, eta)
    if (
        isinstance(scheduler, DPMSolverMultistepScheduler)
        and scheduler.config.algorithm_type == "sde-dpmsolver++"
        and scheduler.config.solver_order == 2
    ):
        if eta != 1.0:
            raise ValueError(f"sde-dpmsolver++ has a fixed noise level: eta must be 1, got {eta}")
        if scheduler.step_index is not None:
            raise ValueError("the scheduler has already stepped; call set_timesteps again")
        return _SdeDpmSolverStep(copy.deepcopy(scheduler))
    raise TypeError(
        "edit-friendly inversion supports DDIMScheduler and DPMSolverMultistepScheduler"
        f" (sde-dpmsolver++, order 2), got {type(scheduler).__name__}"
    )


# ------------------------------------------------------------------------------------------
# Inversion and edit


@dataclass(frozen=True)
class EditFriendlyInversion:
    """What the inversion produces (indexing: see the module docstring).

    Attributes:
        x_T: (N, C, h, w) the noisiest level, ``auxiliary_path[0]``.
        noise_maps: (T, N, C, h, w); ``noise_maps[i]`` is the noise of the step out of level i.
        auxiliary_path: (T + 1, N, C, h, w); level 0 is ``x_T``, level ``T`` is ``x0``.
        timesteps: (T,) the scheduler's timesteps, noisiest first.
    """

    x_T: torch.Tensor
    noise_maps: torch.Tensor
    auxiliary_path: torch.Tensor
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
    noise = torch.randn((len(alpha), *x0.shape), generator=generator, dtype=torch.float32)
    noise = noise.to(device=x0.device, dtype=x0.dtype)
    per_level = (-1,) + (1,) * x0.dim()
    alpha = alpha.to(device=x0.device, dtype=x0.dtype).view(per_level)
    sigma = sigma.to(device=x0.device, dtype=x0.dtype).view(per_level)
    return torch.cat([alpha * x0 + sigma * noise, x0[None]])


@torch.no_grad()
def edit_friendly_invert(
    predict: NoisePredictor,
    x0: torch.Tensor,
    scheduler: Scheduler,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    cfg_src: float,
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
        cfg_src: CFG scale on the source prompt.
        eta: DDIM eta, 0 < eta <= 1 (exactly 1 for sde-dpmsolver++).
        generator: CPU generator for the auxiliary path.
        callback: Called after every step with ``{"i", "t", "x", "z"}``.

    Returns:
        The :class:`EditFriendlyInversion`.
    """
    reverse_step = _reverse_step(scheduler, eta)
    timesteps = scheduler.timesteps
    num_steps = len(timesteps)
    alpha, sigma = level_scales(scheduler)
    path = auxiliary_path(x0, alpha[:num_steps], sigma[:num_steps], generator)  # (T+1, N, C, h, w)
    noise_maps = torch.zeros((num_steps, *x0.shape), device=x0.device, dtype=x0.dtype)
    for i, t in enumerate(timesteps):
        model_output = guided_noise(predict, path[i], t, cond, uncond, cfg_src)
        mu, scale = reverse_step.mean_and_scale(model_output, t, path[i])
        if scale > 0:
            noise_maps[i] = (path[i + 1] - mu) / scale
        path[i + 1] = mu + scale * noise_maps[i]
        if callback is not None:
            callback({"i": i, "t": t, "x": path[i + 1], "z": noise_maps[i]})
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


@torch.no_grad()
def edit_friendly_sample(
    predict: NoisePredictor,
    inversion: EditFriendlyInversion,
    scheduler: Scheduler,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    cfg_tar: float,
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
        cfg_tar: CFG scale on the target prompt.
        skip: Levels skipped, ``0 <= skip < T``.
        eta: DDIM eta, the inversion's.
        shift: ``(dy, dx)`` roll over the last two dims.
        colour: Optional colour manipulation.
        callback: Called after every step with ``{"i", "t", "x", "z"}``.

    Returns:
        (N, C, h, w) the edited clean latents.
    """
    reverse_step = _reverse_step(scheduler, eta)
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

    if reverse_step.multistep and skip > 0:
        t_warm, x_warm = timesteps[skip - 1], shifted(inversion.auxiliary_path[skip - 1])
        model_output = guided_noise(predict, x_warm, t_warm, cond, uncond, cfg_tar)
        reverse_step.mean_and_scale(model_output, t_warm, x_warm)

    x = shifted(inversion.auxiliary_path[skip])
    for i in range(skip, num_steps):
        t = timesteps[i]
        model_output = guided_noise(predict, x, t, cond, uncond, cfg_tar)
        z = shifted(inversion.noise_maps[i])
        if colour is not None and colour.active(i - skip):
            z = colour.apply(z, reverse_step.x0_hat(model_output, t, x))
        x = reverse_step.step(model_output, t, x, z)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "z": z})
    return x


# ------------------------------------------------------------------------------------------
# Stage kinds


class InvertEditFriendlyParams(Params):
    source_prompt: str = Field(
        "", description="Prompt describing the input image; empty means no CFG"
    )
    cfg_src: float = Field(
        3.5, ge=1.0, le=30.0, description="CFG scale on the source prompt during inversion"
    )
    num_inference_steps: int = Field(
        100, ge=1, le=1000, description="Reverse steps T; the edit must use the same"
    )
    eta: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="DDIM eta (1 = DDPM); > 0 for noise maps to exist, 1 for dpmsolver++",
    )
    scheduler: SchedulerName = Field(
        "ddim", description="Reverse step: DDIM(eta) or sde-dpmsolver++ order 2 (LEDITS++)"
    )

    @model_validator(mode="after")
    def _check(self) -> InvertEditFriendlyParams:
        _check_eta(self.scheduler, self.eta)
        return self


class SampleEditFriendlyParams(Params):
    target_prompt: str = Field(
        "", description="Prompt describing the edited image; empty means no CFG"
    )
    cfg_tar: float = Field(15.0, ge=1.0, le=30.0, description="CFG scale on the target prompt")
    skip: int = Field(
        36, ge=0, le=1000, description="Steps skipped: the edit starts at level T - skip"
    )
    num_inference_steps: int = Field(
        100, ge=1, le=1000, description="Reverse steps T; must be the inversion's"
    )
    eta: float = Field(
        1.0, gt=0.0, le=1.0, description="DDIM eta; must be the inversion's (1 for dpmsolver++)"
    )
    scheduler: SchedulerName = Field("ddim", description="Reverse step; must be the inversion's")
    shift: tuple[int, int] = Field(
        (0, 0), description="(dy, dx) latent pixels to roll the start and every noise map by"
    )
    colour_strength: float = Field(
        0.0, ge=0.0, le=10.0, description="Colour manipulation strength s (0 = off)"
    )
    colour_window: tuple[int, int] | None = Field(
        None,
        description="(start, end) edit steps with colour, counted from the first edit step,"
        " inclusive; leave out for every edit step",
    )

    @model_validator(mode="after")
    def _check(self) -> SampleEditFriendlyParams:
        _check_eta(self.scheduler, self.eta)
        if self.skip >= self.num_inference_steps:
            raise ValueError("skip must be < num_inference_steps")
        # The recipe's stage model adds the input references to these params.
        mask, image = getattr(self, "colour_mask", None), getattr(self, "colour_image", None)
        if (mask is None) != (image is None):
            missing = "colour_image" if image is None else "colour_mask"
            raise ValueError(f"colour_mask and colour_image go together: {missing} is missing")
        if self.colour_strength > 0 and mask is None and hasattr(self, "colour_mask"):
            raise ValueError("colour_strength > 0 needs the colour_mask and colour_image inputs")
        if self.colour_window is not None:
            start, end = self.colour_window
            if start < 0:
                raise ValueError("colour_window start must be >= 0")
            if start > end:
                raise ValueError("colour_window start must be <= end")
            if end >= self.num_inference_steps - self.skip:
                raise ValueError(
                    "colour_window end must be < num_inference_steps - skip"
                    " (the number of edit steps)"
                )
        return self


def _check_eta(scheduler: SchedulerName, eta: float) -> None:
    if scheduler == "dpmsolver++" and eta != 1.0:
        raise ValueError("eta must be 1 with scheduler 'dpmsolver++' (its noise level is fixed)")


class InvertEditFriendly(StageKind):
    """Edit-friendly DDPM inversion: noise maps that make the reverse process return x0."""

    kind = "invert.edit_friendly"
    version = "1"
    description = "Edit-friendly DDPM inversion x0 -> (x_T, noise maps) with independent noise"
    params = InvertEditFriendlyParams
    inputs = (Port("latents", ArtifactType.LATENT, "Clean latents x0 (VAE-encoded image)"),)
    outputs = (
        Port("x_T", ArtifactType.LATENT, "The noisiest level of the auxiliary path"),
        Port(
            "noise_maps", ArtifactType.NOISE_SEQUENCE, "(T, N, C, h, w) noise maps, noisiest first"
        ),
        Port(
            "auxiliary_path",
            ArtifactType.NOISE_SEQUENCE,
            "(T + 1, N, C, h, w) latents per level, x_T first and x0 last",
        ),
        Port("prompt_embeds", ArtifactType.EMBEDDING, "Source-prompt embeddings used"),
    )
    seeded = True
    components = frozenset({"unet", "text_encoder", "tokenizer"})

    def run(self, ctx: StageContext, params: Any, inputs: dict[str, Any]) -> dict[str, Any]:
        models = ctx.models
        x0 = inputs["latents"].to(ctx.device, ctx.dtype)
        cond, uncond = _prompt_embeddings(models, params.source_prompt, len(x0))
        scheduler = build_scheduler(
            params.scheduler, models.scheduler_config, params.num_inference_steps, ctx.device
        )
        inversion = edit_friendly_invert(
            unet_noise_predictor(models.get("unet")),
            x0,
            scheduler,
            cond,
            uncond,
            params.cfg_src,
            params.eta,
            ctx.generator(),
            callback=lambda info: ctx.progress(info["i"] + 1, params.num_inference_steps),
        )
        return {
            "x_T": inversion.x_T,
            "noise_maps": inversion.noise_maps,
            "auxiliary_path": inversion.auxiliary_path,
            "prompt_embeds": cond,
        }


class SampleEditFriendly(StageKind):
    """Edit with edit-friendly noise maps: target prompt, skip, shift, colour."""

    kind = "sample.edit_friendly"
    version = "1"
    description = "Reverse diffusion driven by stored edit-friendly noise maps (the edit)"
    params = SampleEditFriendlyParams
    inputs = (
        Port("noise_maps", ArtifactType.NOISE_SEQUENCE, "Noise maps from invert.edit_friendly"),
        Port(
            "auxiliary_path",
            ArtifactType.NOISE_SEQUENCE,
            "Auxiliary path from the same invert.edit_friendly stage",
        ),
        Port(
            "colour_mask",
            ArtifactType.MASK,
            "Where to apply the colour (image resolution)",
            optional=True,
        ),
        Port(
            "colour_image",
            ArtifactType.IMAGE,
            "Colour image M (image resolution)",
            optional=True,
        ),
    )
    outputs = (Port("latents", ArtifactType.LATENT, "Edited clean latents"),)
    # The vae is fetched (lazily) only when colour inputs are given.
    components = frozenset({"unet", "text_encoder", "tokenizer", "vae"})

    def run(self, ctx: StageContext, params: Any, inputs: dict[str, Any]) -> dict[str, Any]:
        models = ctx.models
        noise_maps = inputs["noise_maps"].to(ctx.device, ctx.dtype)
        path = inputs["auxiliary_path"].to(ctx.device, ctx.dtype)
        num_steps = len(noise_maps)
        hint = "use the num_inference_steps, eta and scheduler of the inversion stage"
        if num_steps != params.num_inference_steps:
            raise EditflowError(
                f"noise_maps has {num_steps} steps but num_inference_steps is"
                f" {params.num_inference_steps}",
                key=f"stages.{ctx.name}.num_inference_steps",
                hint=hint,
            )
        if len(path) != num_steps + 1:
            raise EditflowError(
                f"auxiliary_path has {len(path)} levels, expected {num_steps + 1}",
                key=f"stages.{ctx.name}.auxiliary_path",
                hint="connect noise_maps and auxiliary_path of the same inversion stage",
            )
        scheduler = build_scheduler(
            params.scheduler, models.scheduler_config, num_steps, ctx.device
        )
        inversion = EditFriendlyInversion(path[0], noise_maps, path, scheduler.timesteps)
        cond, uncond = _prompt_embeddings(models, params.target_prompt, path.shape[1])
        edit_steps = num_steps - params.skip
        latents = edit_friendly_sample(
            unet_noise_predictor(models.get("unet")),
            inversion,
            scheduler,
            cond,
            uncond,
            params.cfg_tar,
            params.skip,
            params.eta,
            shift=params.shift,
            colour=_colour_guidance(ctx, params, inputs, path.shape[-2:]),
            callback=lambda info: ctx.progress(info["i"] - params.skip + 1, edit_steps),
        )
        return {"latents": latents}


def _prompt_embeddings(
    models: Any, prompt: str, batch: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(cond, uncond) for N items; an empty prompt means no CFG (uncond None)."""
    return encode_prompt_pair(models, prompt, "", batch, guided=bool(prompt))


def _colour_guidance(
    ctx: StageContext, params: Any, inputs: dict[str, Any], latent_size: tuple[int, int]
) -> ColourGuidance | None:
    mask, image = inputs.get("colour_mask"), inputs.get("colour_image")
    if (mask is None) != (image is None):  # recipes are refused earlier, by the validator
        missing = "colour_image" if image is None else "colour_mask"
        raise EditflowError(
            "colour_mask and colour_image must be given together",
            key=f"stages.{ctx.name}.{missing}",
        )
    if mask is None:
        if params.colour_strength > 0:
            raise EditflowError(
                "colour_strength > 0 needs the colour_mask and colour_image inputs",
                key=f"stages.{ctx.name}.colour_strength",
                hint="add both inputs or set colour_strength = 0",
            )
        return None
    if params.colour_strength == 0:
        return None
    vae = ctx.models.get("vae")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    expected = (latent_size[0] * factor, latent_size[1] * factor)
    for name, value in (("colour_mask", mask), ("colour_image", image)):
        if tuple(value.shape[-2:]) != expected:
            raise EditflowError(
                f"{name} is {value.shape[-2]}x{value.shape[-1]} but the edited image is"
                f" {expected[0]}x{expected[1]}",
                key=f"stages.{ctx.name}.{name}",
                hint="give it the image's size with inputs.NAME.size",
            )
    colour_latent = vae_encode(vae, image).to(ctx.device, ctx.dtype)
    mask = mask.to(ctx.device, ctx.dtype)
    latent_mask = F.interpolate(mask, size=tuple(latent_size), mode="area")
    return ColourGuidance(latent_mask, colour_latent, params.colour_strength, params.colour_window)
