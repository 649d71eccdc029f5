"""Reverse diffusion steps split into mean and noise scale, for loops that store their noise.

Edit-friendly inversion needs each reverse step as ``x_prev = mu + scale * z`` so that it can
solve for ``z``. Two schedulers, both built from the model's scheduler config
(:func:`build_scheduler`):

- ``"ddim"``: diffusers' ``DDIMScheduler``; timesteps, ``alphas_cumprod`` and the previous-step
  rule are read from it. The posterior is DDIM's eq. 12/16 with ``eta^2 sigma_t^2`` (the
  released edit-friendly code writes ``eta sigma_t^2``; the two agree only at ``eta = 1``).
- ``"dpmsolver++"``: ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++",
  solver_order=2)``, what LEDITS++ uses. Its own ``step`` computes the mean (with zero noise)
  and the edit; the noise scale ``sigma_t sqrt(1 - exp(-2h))`` is computed in closed form from
  the same sigmas. Its noise level is fixed, so ``eta`` must be 1.

Both are built so that the last step still carries noise (``set_alpha_to_one=False`` for
DDIM, ``final_sigmas_type="sigma_min"`` for DPM-Solver: the last step lands on
``alphas_cumprod[0]``; and for DDIM on a DDPM-style config, whose "leading" grid starts at
timestep 0, ``steps_offset=1`` as Stable Diffusion has, so the last step leaves timestep 1).
Without that the last noise map would be multiplied by zero, could not absorb the residual,
and reconstruction would not be exact.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Literal

from editflow.lazy import lazy
from editflow.stages.diffusion import ddim_posterior_variance, split_model_output

torch = lazy("torch")

if TYPE_CHECKING:
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
diffusers = lazy("diffusers")

SchedulerName = Literal["ddim", "dpmsolver++"]
Scheduler = Any  # a DDIMScheduler or DPMSolverMultistepScheduler


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
        overrides: dict[str, Any] = {"set_alpha_to_one": False}
        if config.get("timestep_spacing", "leading") == "leading" and not config.get(
            "steps_offset"
        ):
            # DDPM-style configs (pixel models) start the leading grid at 0, so the last step
            # would go from level 0 to level 0 with no noise; one timestep of offset (Stable
            # Diffusion's) makes it land on level 0 from level 1, a step with noise.
            overrides["steps_offset"] = 1
        scheduler = diffusers.DDIMScheduler.from_config(config, **overrides)
    elif name == "dpmsolver++":
        scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
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
    if isinstance(scheduler, diffusers.DPMSolverMultistepScheduler):
        return scheduler._sigma_to_alpha_sigma_t(scheduler.sigmas.float())
    timesteps = [int(t) for t in scheduler.timesteps]
    last = _ddim_prev_timestep(scheduler, timesteps[-1])
    abar = torch.stack([_ddim_abar(scheduler, t) for t in [*timesteps, last]]).float().cpu()
    return abar.sqrt(), (1 - abar).sqrt()


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
    eps_hat, x0_hat = split_model_output(
        model_output, x_t, abar_t**0.5, (1 - abar_t) ** 0.5, scheduler.config.prediction_type
    )
    if scheduler.config.thresholding:
        raise ValueError("edit-friendly inversion does not support dynamic thresholding")
    if scheduler.config.clip_sample:
        limit = scheduler.config.clip_sample_range
        x0_hat = x0_hat.clamp(-limit, limit)
    scale = eta * ddim_posterior_variance(abar_t, abar_prev) ** 0.5
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


def reverse_step(scheduler: Scheduler, eta: float) -> _DdimStep | _SdeDpmSolverStep:
    """A private copy of the scheduler wrapped as a reverse step; the caller's is never mutated."""
    if not eta > 0:
        raise ValueError(f"eta must be > 0 for noise maps to exist, got {eta}")
    if isinstance(scheduler, diffusers.DDIMScheduler):
        return _DdimStep(scheduler, eta)
    if (
        isinstance(scheduler, diffusers.DPMSolverMultistepScheduler)
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


def check_eta(scheduler: SchedulerName, eta: float) -> None:
    """Refuse an eta the scheduler cannot take (for parameter validators)."""
    if scheduler == "dpmsolver++" and eta != 1.0:
        raise ValueError("eta must be 1 with scheduler 'dpmsolver++' (its noise level is fixed)")
