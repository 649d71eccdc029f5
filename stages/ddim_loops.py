"""DDIM sampling and inversion, with pix2pix-zero's optional noise regulariser.

Two loops with the loop contract of :mod:`editflow.stages.diffusion` (a noise predictor, a
start latent, a diffusers scheduler whose ``set_timesteps`` the caller has already called,
the prompt embeddings, keyword-only knobs; tensors in, tensors out):

- :func:`ddim_sample`: DDIM denoising (Song et al. 2021, eq. 12) with classifier-free
  guidance, one ``DDIMScheduler.step`` per timestep.
- :func:`ddim_invert`: deterministic DDIM inversion (Song et al. 2021, sec. 4.3: the DDIM
  ODE integrated from x_0 towards x_T) through ``DDIMInverseScheduler.step``,
  optionally refining each predicted noise with the pix2pix-zero regulariser (Parmar et al.
  2023, "noise regularization") before it is used. It runs every step of the inverse
  schedule from the clean level (50 of 50 by default, as diffusers' inverse scheduler
  does); the released pix2pix-zero code runs 48, treating x0 as the level of timestep 20.

Both schedulers must be built from the model's own scheduler config
(``DDIMInverseScheduler.from_config(cfg)``): their constructor defaults (``clip_sample=True``,
linear betas) do not match Stable Diffusion.

The regulariser follows the released pix2pix-zero code (``src/utils/ddim_inv.py``) with two
deliberate differences, both documented on :func:`auto_correlation_loss`: shifts come from
the given seeded generator and are drawn from ``[1, H/2)`` (the released code draws from the
global RNG in ``[0, H/2)``), and every pyramid level is multiplied by 2 after pooling, as the
StyleGAN2 noise regulariser it copies prescribes (the released code omits the factor).
"""

from __future__ import annotations

from typing import Any

from editflow.lazy import lazy, no_grad
from editflow.stages.diffusion import (
    Callback,
    NoisePredictor,
    cpu_randn,
    eps_to_model_output,
    guided_noise,
    split_model_output,
)

torch = lazy("torch")
F = lazy("torch.nn.functional")

# ------------------------------------------------------------------------------------------
# pix2pix-zero noise regularisation


def auto_correlation_loss(eps: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """pix2pix-zero auto-correlation loss L_auto (Parmar et al. 2023, noise regularization).

    For every (sample, channel) map a pyramid is built: level 0 is the map itself, each next
    level is a 2x2 average pooling multiplied by 2 (so that i.i.d. unit-variance noise keeps
    unit variance). At every level one shift ``s`` is drawn from ``[1, H/2)`` and
    ``mean(x * roll(x, s, H))**2 + mean(x * roll(x, s, W))**2`` is added.

    Stopping rule (as in the released ``ddim_inv.py``): the loss of a level is added FIRST,
    then the loop stops if that level's height is ``<= 8``, else it pools and goes on. A
    64 px latent therefore contributes levels 64, 32, 16, 8 and an 8 px latent only level 8;
    a 96 px latent gives 96, 48, 24, 12, 6.

    Differences from the released code, on purpose: (1) the shift is drawn from the given
    generator, not Python's global ``random``, so inversion is reproducible; (2) the range is
    ``[1, H/2)``: the released ``randrange(H // 2)`` can draw 0, which turns the term into
    ``mean(x**2)**2``, a variance penalty rather than a correlation one; (3) pooled levels are
    multiplied by 2 (the released code and diffusers' port pool without it, so their levels
    below the first weigh 16x less per halving). Shifts are drawn in the order
    (sample, channel, level), one ``randint`` per level, used for both axes.

    Args:
        eps: (N, C, H, W) noise prediction.
        generator: CPU generator the shifts are drawn from (``None``: torch's global RNG).

    Returns:
        Scalar loss (summed over samples, channels and levels).
    """
    loss = eps.new_zeros(())
    for sample in range(eps.shape[0]):
        for channel in range(eps.shape[1]):
            noise = eps[sample : sample + 1, channel : channel + 1]  # (1, 1, H, W)
            while True:
                high = max(noise.shape[2] // 2, 2)
                shift = int(torch.randint(1, high, (1,), generator=generator).item())
                loss = loss + (noise * torch.roll(noise, shifts=shift, dims=2)).mean() ** 2
                loss = loss + (noise * torch.roll(noise, shifts=shift, dims=3)).mean() ** 2
                if noise.shape[2] <= 8:
                    break
                noise = F.avg_pool2d(noise, kernel_size=2) * 2
    return loss


def kl_loss(eps: torch.Tensor) -> torch.Tensor:
    """pix2pix-zero KL loss L_KL to a standard normal (Parmar et al. 2023, noise reg.).

    ``var + mean**2 - 1 - log(var)`` per sample over all its values (unbiased variance and a
    1e-7 floor inside the log, as the released code), summed over the batch so that a batch
    regularises exactly like its samples one by one. For N = 1 this is the released formula.

    Args:
        eps: (N, C, H, W) noise prediction.

    Returns:
        Scalar loss.
    """
    flat = eps.reshape(eps.shape[0], -1)
    mean = flat.mean(dim=1)
    var = flat.var(dim=1)
    return (var + mean**2 - 1 - torch.log(var + 1e-7)).sum()


def regularize_noise(
    eps: torch.Tensor,
    generator: torch.Generator | None,
    lambda_ac: float = 20.0,
    lambda_kl: float = 20.0,
    rounds: int = 5,
    ac_steps: int = 5,
) -> torch.Tensor:
    """pix2pix-zero noise regularisation of one predicted noise (Parmar et al. 2023).

    ``rounds`` times: ``ac_steps`` gradient steps ``eps -= lambda_ac * grad(L_auto) / ac_steps``
    (a fresh set of shifts each), then one step ``eps -= lambda_kl * grad(L_KL)``. A weight of
    0 skips its loss entirely (and draws no shifts). Computed in float32 whatever the input
    dtype; gradients never reach the model (the input is detached).

    Args:
        eps: (N, C, H, W) noise prediction.
        generator: CPU generator for the auto-correlation shifts.
        lambda_ac: Weight of the auto-correlation loss (20 in the paper).
        lambda_kl: Weight of the KL loss (20 in the paper).
        rounds: Outer rounds (5).
        ac_steps: Auto-correlation steps per round (5).

    Returns:
        (N, C, H, W) regularised noise, same dtype as ``eps``.
    """
    dtype = eps.dtype
    eps = eps.detach().float()
    with torch.enable_grad():
        for _ in range(rounds):
            if lambda_ac > 0:
                for _ in range(ac_steps):
                    leaf = eps.detach().requires_grad_(True)
                    (grad,) = torch.autograd.grad(auto_correlation_loss(leaf, generator), leaf)
                    # (grad / ac_steps) first, as the released code rounds it.
                    eps = eps - lambda_ac * (grad / ac_steps)
            if lambda_kl > 0:
                leaf = eps.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(kl_loss(leaf), leaf)
                eps = eps - lambda_kl * grad
    return eps.detach().to(dtype)


# ------------------------------------------------------------------------------------------
# DDIM loops


def _require_timesteps(scheduler: Any) -> None:
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError(f"call {type(scheduler).__name__}.set_timesteps(n) before the loop")


@no_grad
def ddim_invert(
    predict: NoisePredictor,
    latents: torch.Tensor,
    scheduler: Any,
    cond: torch.Tensor,
    uncond: torch.Tensor | None = None,
    *,
    guidance_scale: float = 1.0,
    regularize: bool = False,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    lambda_ac: float = 20.0,
    lambda_kl: float = 20.0,
    reg_rounds: int = 5,
    ac_steps: int = 5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic DDIM inversion (Song et al. 2021, eq. 12 run from t to t + dt).

    At each ascending timestep of ``scheduler`` the (optionally CFG-guided) noise is
    predicted at the current latent and ``DDIMInverseScheduler.step`` moves the latent one
    level noisier. With ``regularize`` the predicted noise is first refined by
    :func:`regularize_noise` (pix2pix-zero, Parmar et al. 2023); for a
    v-prediction model the regulariser acts on the epsilon implied by the output.

    Args:
        predict: Noise predictor ``(x_t, t, embeds) -> model output``.
        latents: (N, C, h, w) clean latents x_0.
        scheduler: A ``DDIMInverseScheduler`` built from the model's scheduler config,
            with ``set_timesteps`` already called.
        cond: (N, tokens, D) prompt embeddings (pix2pix-zero: the caption).
        uncond: (N, tokens, D) unconditional embeddings for CFG, or ``None``.
        guidance_scale: CFG scale (1 = conditional branch only; pix2pix-zero inverts with 1).
        regularize: Apply the pix2pix-zero noise regulariser before every step.
        generator: CPU generator for the regulariser's shifts (unused otherwise).
        callback: Called after every step with a ``StepInfo`` (``eps`` is the possibly
            regularised model output the step used).
        lambda_ac: Auto-correlation weight of the regulariser.
        lambda_kl: KL weight of the regulariser.
        reg_rounds: Outer rounds of the regulariser.
        ac_steps: Auto-correlation steps per round.

    Returns:
        ``(x_T, trajectory)``: x_T (N, C, h, w) and the latents at every level,
        (steps + 1, N, C, h, w), ``trajectory[0]`` the input, ``trajectory[-1]`` x_T.
    """
    _require_timesteps(scheduler)
    prediction_type = scheduler.config.prediction_type
    x = latents
    trajectory = [x]
    for i, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(x, t)
        output = guided_noise(predict, model_input, t, cond, uncond, guidance_scale)
        if regularize:
            alpha_prod = scheduler.alphas_cumprod[int(t)].to(x.device, torch.float32)
            alpha, sigma = alpha_prod**0.5, (1 - alpha_prod) ** 0.5
            eps, _ = split_model_output(output.float(), x.float(), alpha, sigma, prediction_type)
            eps = regularize_noise(eps, generator, lambda_ac, lambda_kl, reg_rounds, ac_steps)
            output = eps_to_model_output(eps, x.float(), alpha, sigma, prediction_type)
            output = output.to(x.dtype)
        step = scheduler.step(output, t, x)
        x = step.prev_sample
        trajectory.append(x)
        if callback is not None:
            denoised = step.pred_original_sample
            callback({"i": i, "t": t, "x": x, "denoised": denoised, "eps": output})
    return x, torch.stack(trajectory)


@no_grad
def ddim_sample(
    predict: NoisePredictor,
    x_T: torch.Tensor,
    scheduler: Any,
    cond: torch.Tensor,
    uncond: torch.Tensor | None = None,
    *,
    guidance_scale: float = 1.0,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DDIM denoising with classifier-free guidance (Song et al. 2021, eq. 12; Ho & Salimans
    2022, eq. 6).

    One ``DDIMScheduler.step`` per timestep. With ``eta > 0`` the variance noise of each step
    is drawn on the CPU from ``generator`` (so results do not depend on the device) and passed
    as ``variance_noise``; with ``eta == 0`` the generator is never touched.

    Args:
        predict: Noise predictor ``(x_t, t, embeds) -> model output``.
        x_T: (N, C, h, w) starting latents.
        scheduler: A ``DDIMScheduler`` built from the model's config, ``set_timesteps`` called.
        cond: (N, tokens, D) prompt embeddings.
        uncond: (N, tokens, D) unconditional / negative embeddings, or ``None``.
        guidance_scale: CFG scale (1 = conditional branch only).
        eta: DDIM stochasticity (0 = deterministic, 1 = DDPM-like).
        generator: CPU generator for the variance noise (used only when ``eta > 0``).
        callback: Called after every step with a ``StepInfo``.

    Returns:
        (N, C, h, w) denoised latents x_0.
    """
    _require_timesteps(scheduler)
    x = x_T
    for i, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(x, t)
        output = guided_noise(predict, model_input, t, cond, uncond, guidance_scale)
        step = ddim_step(scheduler, output, t, x, eta, generator)
        x = step.prev_sample
        if callback is not None:
            denoised = step.pred_original_sample
            callback({"i": i, "t": t, "x": x, "denoised": denoised, "eps": output})
    return x


def ddim_step(
    scheduler: Any,
    output: torch.Tensor,
    t: torch.Tensor | int,
    x: torch.Tensor,
    eta: float,
    generator: torch.Generator | None,
) -> Any:
    """One ``DDIMScheduler.step`` with CPU-drawn variance noise when ``eta > 0``.

    Returns:
        The scheduler's output (``prev_sample``, ``pred_original_sample``).
    """
    if eta > 0:
        noise = cpu_randn(x.shape, generator, like=x)
        return scheduler.step(output, t, x, eta=eta, variance_noise=noise)
    return scheduler.step(output, t, x)
