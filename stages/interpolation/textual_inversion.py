"""Textual inversion of image latents, as image interpolation uses it (Wang & Golland 2023).

Each image gets its own prompt embedding (both start as the prompt's embedding) and all
share one negative embedding; the three are optimised with Adam so that the guided noise
prediction of the frozen UNet matches the noise added to the image's latent. Timesteps are
drawn from the middle third of training, ``[T/3, 2T/3)``, where both layout and
appearance matter; the latents are lightly augmented (a shift of up to one latent pixel)
so the embeddings do not fit one exact pixel grid.

Every random draw comes from the caller's generator, on the CPU, so a run is repeatable on
any device.
"""

from __future__ import annotations

from collections.abc import Callable

from editflow.lazy import lazy
from editflow.stages.diffusion import NoisePredictor, cpu_randn, split_model_output

torch = lazy("torch")
F = lazy("torch.nn.functional")


def shift_latents(latents: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate by ``(dy, dx)`` latent pixels, each in {-1, 0, 1}; edges are replicated."""
    height, width = latents.shape[-2:]
    padded = F.pad(latents, (1, 1, 1, 1), mode="replicate")
    return padded[..., 1 - dy : 1 - dy + height, 1 - dx : 1 - dx + width]


def textual_inversion(
    predict: NoisePredictor,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    *,
    iterations: int,
    learning_rate: float,
    guidance_scale: float,
    generator: torch.Generator,
    augment: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Optimise per-image prompt embeddings and a shared negative embedding.

    Args:
        predict: The frozen UNet as ``predict(x_t, t, embeds) -> model output``.
        latents: (N, C, h, w) clean latents, one per image.
        prompt_embeds: (N, tokens, D) starting prompt embeddings (the prompt's, N copies).
        negative_embeds: (1, tokens, D) starting negative embedding.
        alphas_cumprod: (T,) the training schedule's cumulative alphas.
        prediction_type: The UNet's ``epsilon``, ``v_prediction`` or ``sample``; the loss is
            always on the implied noise.
        iterations: Adam steps.
        learning_rate: Adam's learning rate.
        guidance_scale: CFG scale of the prediction the loss is taken on.
        generator: CPU generator for timesteps, noise and shifts.
        augment: Whether to shift the latents by up to one latent pixel per iteration.
        progress: Called with ``(iteration, iterations)`` after each step.

    Returns:
        (prompt_embeds (N, tokens, D), negative_embeds (1, tokens, D), losses (iterations,)),
        the embeddings float32 on the latents' device, the losses float32 on the CPU.
    """
    device, dtype = latents.device, latents.dtype
    count = len(latents)
    low, high = len(alphas_cumprod) // 3, 2 * len(alphas_cumprod) // 3  # [T/3, 2T/3)
    # Trained in float32 whatever the UNet's dtype: Adam's updates at lr 1e-4 vanish in fp16.
    prompt = prompt_embeds.detach().to(device, torch.float32).clone().requires_grad_(True)
    negative = negative_embeds.detach().to(device, torch.float32).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([prompt, negative], lr=learning_rate)
    abar = alphas_cumprod.to(device, torch.float32)
    losses = torch.empty(iterations, device=device)
    with torch.enable_grad():
        for iteration in range(iterations):
            x0 = latents
            if augment:
                dy, dx = torch.randint(-1, 2, (2,), generator=generator).tolist()
                x0 = shift_latents(latents, dy, dx)
            t = torch.randint(low, high, (count,), generator=generator)
            noise = cpu_randn(latents.shape, generator).to(device)
            t = t.to(device)
            alpha = abar[t].sqrt().view(-1, 1, 1, 1)
            sigma = (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
            x_t = alpha * x0.float() + sigma * noise
            embeds = torch.cat([negative.expand(count, -1, -1), prompt]).to(dtype)
            output = predict(torch.cat([x_t, x_t]).to(dtype), torch.cat([t, t]), embeds).float()
            output_uncond, output_cond = output.chunk(2)
            guided = output_uncond + guidance_scale * (output_cond - output_uncond)
            eps_hat, _ = split_model_output(guided, x_t, alpha, sigma, prediction_type)
            loss = F.mse_loss(eps_hat, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses[iteration] = loss.detach()  # no host sync per iteration
            if progress is not None:
                progress(iteration + 1, iterations)
    return prompt.detach(), negative.detach(), losses.cpu()
