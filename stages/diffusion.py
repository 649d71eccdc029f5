"""Small shared pieces of diffusion math: the loop contract, parameterisations, prompts,
guided noise prediction, the VAE.

Every method stage builds on these; none of them knows about recipes, caches or files.

The loop contract (k-diffusion's, with a diffusers scheduler in place of the sigmas): every
sampling or inversion loop is one function
``loop(predict, x, scheduler, cond, uncond=None, *, knobs..., callback=None) -> x`` whose
knobs are keyword-only, and which calls ``callback(info)`` after every step with a
:class:`StepInfo`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NotRequired, TypedDict

from editflow.errors import Problem
from editflow.lazy import lazy, no_grad
from editflow.models.adapters import ADAPTERS_ATTRIBUTE
from editflow.models.embeddings import expand_multi_vector_tokens

torch = lazy("torch")


# A noise predictor: (x_t (N, C, h, w), timestep, text embeddings (N, tokens, D)) -> eps_hat.
NoisePredictor = Callable[..., "torch.Tensor"]  # (x_t, t, embeds) -> eps_hat


class StepInfo(TypedDict):
    """What every loop reports after each step (k-diffusion's ``{x, i, sigma, denoised}``).

    Attributes:
        i: The step's index in the loop (0 = the loop's first step).
        t: The step's timestep.
        x: (N, C, h, w) the latent after the step.
        denoised: (N, C, h, w) the clean latent predicted at this step, ``x0_hat``.
        eps: The (guided) model output the step used, where the loop has one.
        z: The noise map the step added (edit-friendly loops).
        x_in: (N, C, h, w) the latent the step started from (edit-friendly inversion: its
            level ``i`` of the auxiliary path).
        loss: The guidance loss before the step as a 0-d tensor, or ``None`` (pix2pix-zero's
            edit); a tensor, so that reporting it never waits for the device.
    """

    i: int
    t: torch.Tensor | int
    x: torch.Tensor
    denoised: torch.Tensor
    eps: NotRequired[torch.Tensor]
    z: NotRequired[torch.Tensor]
    x_in: NotRequired[torch.Tensor]
    loss: NotRequired[torch.Tensor | None]


# Called once per step by every loop.
Callback = Callable[[StepInfo], None]


def split_model_output(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    prediction_type: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps_hat, x0_hat) from a model output of any diffusers prediction type.

    With ``x_t = alpha x0 + sigma eps``: ``epsilon`` predicts eps, ``sample`` predicts x0 and
    ``v_prediction`` predicts ``v = alpha eps - sigma x0`` (Salimans & Ho 2022, eq. 9), so
    ``eps = alpha v + sigma x_t`` and ``x0 = alpha x_t - sigma v``.
    """
    if prediction_type == "epsilon":
        return model_output, (x_t - sigma * model_output) / alpha
    if prediction_type == "v_prediction":
        return alpha * model_output + sigma * x_t, alpha * x_t - sigma * model_output
    if prediction_type == "sample":
        return (x_t - alpha * model_output) / sigma, model_output
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def eps_to_model_output(
    eps: torch.Tensor,
    x_t: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """The model output of ``prediction_type`` that implies ``eps`` at ``x_t`` (the inverse of
    :func:`split_model_output`'s first result)."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return (eps - sigma * x_t) / alpha
    if prediction_type == "sample":
        return (x_t - sigma * eps) / alpha
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def cpu_randn(
    shape: Sequence[int], generator: torch.Generator | None, like: torch.Tensor | None = None
) -> torch.Tensor:
    """Standard normal float32 noise drawn on the CPU from ``generator``, so the numbers do not
    depend on the device; moved to ``like``'s device and dtype when given."""
    noise = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    return noise if like is None else noise.to(device=like.device, dtype=like.dtype)


def ddim_posterior_variance(abar_t: torch.Tensor, abar_prev: torch.Tensor) -> torch.Tensor:
    """DDIM's sigma_t^2 at eta = 1 (Song et al. 2021, eq. 16), the DDPM posterior variance:
    ``(1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)``."""
    return ((1 - abar_prev) / (1 - abar_t)) * (1 - abar_t / abar_prev)


def unet_noise_predictor(unet: Any) -> NoisePredictor:
    """Wrap a diffusers ``UNet2DConditionModel`` (or an unconditional pixel-space
    ``UNet2DModel``, which ignores the embeddings) as a plain noise predictor."""
    if is_unconditional(unet):

        def unconditional(x_t: torch.Tensor, t: torch.Tensor | int, embeds: Any) -> torch.Tensor:
            # Models that learn the variance (improved DDPM) output it after the noise.
            return unet(x_t, t, return_dict=False)[0][:, : x_t.shape[1]]

        return unconditional

    def predict(x_t: torch.Tensor, t: torch.Tensor | int, embeds: torch.Tensor) -> torch.Tensor:
        return unet(x_t, t, encoder_hidden_states=embeds, return_dict=False)[0]

    return predict


def is_unconditional(unet: Any) -> bool:
    """Whether a denoiser takes no text (DDPM's ``UNet2DModel``, a pixel-space model)."""
    return "cross_attention_dim" not in unet.config


@no_grad
def encode_prompts(tokenizer: Any, text_encoder: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Encode prompts to the full padded text-encoder output, as Stable Diffusion does.

    A multi-vector textual-inversion token stands for all its vectors
    (:func:`~editflow.models.embeddings.expand_multi_vector_tokens`).

    Returns:
        (N, tokenizer.model_max_length, D) last hidden states.
    """
    tokens = tokenizer(
        expand_multi_vector_tokens(tokenizer, prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    device = next(text_encoder.parameters()).device
    return text_encoder(tokens.input_ids.to(device))[0]


# Text encoder -> tokenizer -> (adapters, vocabulary size, prompts) -> embeddings: the
# prompts a run's stages encode, each once (an inversion and its edits share a prompt, and on
# Stable Diffusion the text encoder costs as much as several UNet steps). Frozen encoders
# only; bounded per encoder.
_PROMPT_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PROMPT_MEMO_SIZE = 32


def encode_prompts_once(tokenizer: Any, text_encoder: Any, prompts: Sequence[str]) -> torch.Tensor:
    """:func:`encode_prompts`, remembered per (text encoder, tokenizer, prompts) for as long as
    the encoder is loaded: the same call gives the same tensor's values without running the
    encoder again. For the prompts of samplers, not for banks of hundreds of sentences.

    The LoRA files and embeddings applied to the encoder (the registry marks it) and the
    tokenizer's vocabulary size are part of the key, so an encoder or tokenizer that one of
    them changed in place never answers with what it encoded before."""
    by_tokenizer = _PROMPT_MEMO.setdefault(text_encoder, weakref.WeakKeyDictionary())
    memo = by_tokenizer.setdefault(tokenizer, {})
    adapters = getattr(getattr(text_encoder, "_orig_mod", text_encoder), ADAPTERS_ATTRIBUTE, None)
    key = (adapters, len(tokenizer), tuple(prompts))
    if key not in memo:
        if len(memo) >= _PROMPT_MEMO_SIZE:
            memo.pop(next(iter(memo)))
        memo[key] = encode_prompts(tokenizer, text_encoder, prompts)
    return memo[key].clone()  # a caller may change its copy


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
    cond = encode_prompts_once(tokenizer, text_encoder, [prompt] * batch)
    uncond = (
        encode_prompts_once(tokenizer, text_encoder, [negative_prompt] * batch) if guided else None
    )
    return cond, uncond


def prompt_pair(
    models: Any, prompt: str, negative_prompt: str, batch: int, guided: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """:func:`encode_prompt_pair`, or ``(None, None)`` for an unconditional model (which has
    no text encoder to load)."""
    if is_unconditional(models.get("unet")):
        return None, None
    return encode_prompt_pair(models, prompt, negative_prompt, batch, guided)


def check_t0(t0: int | None, models: Mapping[str, Any]) -> list[Problem]:
    """``t0`` must be a timestep of the model's schedule (from its config; nothing loads)."""
    model = models.get("model.id")
    if t0 is None or model is None:
        return []
    steps = model.scheduler_config.get("num_train_timesteps")
    if steps is not None and t0 >= steps:
        return [Problem(f"is {t0} but model '{model.spec.id}' has {steps} training steps"
                        f" (timesteps 0 to {steps - 1})", key="t0")]  # fmt: skip
    return []


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


@no_grad
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


@no_grad
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
