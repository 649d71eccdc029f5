"""Small shared pieces of latent-diffusion math: prompts, guided noise prediction, the VAE.

Every method stage builds on these; none of them knows about recipes, caches or files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

# A noise predictor: (x_t (N, C, h, w), timestep, text embeddings (N, tokens, D)) -> eps_hat.
NoisePredictor = Callable[[torch.Tensor, torch.Tensor | int, torch.Tensor], torch.Tensor]


def unet_noise_predictor(unet: Any) -> NoisePredictor:
    """Wrap a diffusers ``UNet2DConditionModel`` as a plain noise predictor."""

    def predict(x_t: torch.Tensor, t: torch.Tensor | int, embeds: torch.Tensor) -> torch.Tensor:
        return unet(x_t, t, encoder_hidden_states=embeds, return_dict=False)[0]

    return predict


@torch.no_grad()
def encode_prompts(tokenizer: Any, text_encoder: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Encode prompts to the full padded text-encoder output, as Stable Diffusion does.

    Returns:
        (N, tokenizer.model_max_length, D) last hidden states.
    """
    tokens = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    device = next(text_encoder.parameters()).device
    return text_encoder(tokens.input_ids.to(device))[0]


def encode_prompt_pair(
    models: Any, prompt: str, negative_prompt: str, batch: int, guided: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(cond, uncond) embeddings for ``batch`` items; ``uncond`` is None without CFG.

    Args:
        models: Gives ``tokenizer`` and ``text_encoder`` through ``get``.
        prompt: The conditional prompt.
        negative_prompt: The unconditional (negative) prompt.
        batch: Number of items.
        guided: Whether CFG is used (else the negative prompt is not encoded).
    """
    tokenizer, text_encoder = models.get("tokenizer"), models.get("text_encoder")
    cond = encode_prompts(tokenizer, text_encoder, [prompt] * batch)
    uncond = encode_prompts(tokenizer, text_encoder, [negative_prompt] * batch) if guided else None
    return cond, uncond


def guided_noise(
    predict: NoisePredictor,
    x_t: torch.Tensor,
    t: torch.Tensor | int,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    guidance_scale: float,
) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): one batched UNet call.

    ``eps = eps_u + s * (eps_c - eps_u)``. With ``guidance_scale == 1`` or no unconditional
    embedding only the conditional branch is evaluated.

    Args:
        predict: The noise predictor.
        x_t: (N, C, h, w) noisy latents.
        t: The timestep.
        cond: (N, tokens, D) conditional embeddings.
        uncond: (N, tokens, D) unconditional (negative) embeddings or ``None``.
        guidance_scale: ``s``.
    """
    if uncond is None or guidance_scale == 1.0:
        return predict(x_t, t, cond)
    eps_uncond, eps_cond = predict(torch.cat([x_t, x_t]), t, torch.cat([uncond, cond])).chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


@torch.no_grad()
def vae_encode(vae: Any, images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] to latents: the posterior MEAN times the scaling factor (deterministic).

    Args:
        images: (N, 3, H, W) in [0, 1].

    Returns:
        (N, C, H / f, W / f) latents.
    """
    pixels = images.to(device=vae.device, dtype=vae.dtype) * 2 - 1
    posterior = vae.encode(pixels).latent_dist
    return posterior.mean * vae.config.scaling_factor


@torch.no_grad()
def vae_decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Latents to images in [0, 1] (clamped).

    Args:
        latents: (N, C, h, w).

    Returns:
        (N, 3, h * f, w * f) in [0, 1].
    """
    scaled = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor
    pixels = vae.decode(scaled, return_dict=False)[0]
    return ((pixels.float() + 1) / 2).clamp(0, 1)
