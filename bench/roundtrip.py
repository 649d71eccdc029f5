"""The round trip two benchmarks time through the engine and through diffusers directly.

encode -> DDIM inversion -> DDIM sampling -> decode -> PNG: ``run_recipe`` on a cold cache
(plan, keys, cache entries, records, the exported PNG) against the same steps written
against diffusers (a plain inversion loop, then a plain sampling loop or
``StableDiffusionPipeline``), on the same loaded components, the same image and prompt.
``bench_core.py`` runs it on ``tiny``, ``bench_gpu.py`` on ``sd15-shaped``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

PROMPT = "a photo of a cat"


def write_recipe(
    folder: Path,
    *,
    model: str,
    size: int,
    steps: int,
    guidance: float,
    dtype: str = "float32",
    compiled: bool = False,
    prompt: str = PROMPT,
) -> Path:
    """A recipe of the round trip: encode, invert (guidance 1), sample (``guidance``),
    decode (exported as ``decode.png``)."""
    path = folder / f"roundtrip-{model}-{dtype}{'-compiled' if compiled else ''}.toml"
    path.write_text(
        f"""schema_version = 1
seed = 0

[model]
id = "{model}"
dtype = "{dtype}"
compile = {"true" if compiled else "false"}

[inputs.photo]
image = "skimage:chelsea"
size = [{size}, {size}]

[stages.encode]
kind = "encode.vae"
images = "inputs.photo"

[stages.invert]
kind = "invert.ddim"
latents = "encode.latents"
prompt = "{prompt}"
num_inference_steps = {steps}

[stages.sample]
kind = "sample.ddim"
latents = "invert.latents"
prompt = "{prompt}"
guidance_scale = {guidance}
num_inference_steps = {steps}

[stages.decode]
kind = "decode.vae"
latents = "sample.latents"
"""
    )
    return path


def components_of(models: Any, provider: str = "model.id") -> dict[str, Any]:
    """The loaded parts a plain loop uses, from the engine's registry (the same objects)."""
    registry = models.registry(provider)
    parts = {name: registry.get(name) for name in ("vae", "unet", "tokenizer", "text_encoder")}
    parts["scheduler_config"] = dict(registry.scheduler_config)
    return parts


def save_png(images: torch.Tensor, path: Path) -> None:
    """Decoded images in [-1, 1] to an 8-bit PNG, as an export does."""
    pixels = ((images[0].float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy()).save(path)


@torch.no_grad()
def encode_prompt(components: dict[str, Any], prompt: str, device: torch.device) -> torch.Tensor:
    tokenizer, text_encoder = components["tokenizer"], components["text_encoder"]
    ids = tokenizer(
        [prompt], padding="max_length", max_length=tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    ).input_ids  # fmt: skip
    return text_encoder(ids.to(device))[0]


@torch.no_grad()
def plain_invert(
    components: dict[str, Any], image: torch.Tensor, prompt: str, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE encode (posterior mean) and DDIM inversion, written directly against diffusers;
    returns (x_T, the prompt's embedding)."""
    from diffusers import DDIMInverseScheduler

    vae, unet = components["vae"], components["unet"]
    device, dtype = unet.device, unet.dtype
    x = vae.encode((image * 2 - 1).to(device, dtype)).latent_dist.mean * vae.config.scaling_factor
    embeds = encode_prompt(components, prompt, device)
    inverse = DDIMInverseScheduler.from_config(components["scheduler_config"])
    inverse.set_timesteps(steps)
    for t in inverse.timesteps:
        x = inverse.step(unet(x, t, encoder_hidden_states=embeds).sample, t, x).prev_sample
    return x, embeds


@torch.no_grad()
def plain_round_trip(
    components: dict[str, Any], image: torch.Tensor, prompt: str, steps: int, png: Path
) -> None:
    """encode -> DDIM invert -> DDIM sample (guidance 1) -> decode -> PNG, plain diffusers."""
    from diffusers import DDIMScheduler

    vae, unet = components["vae"], components["unet"]
    x, embeds = plain_invert(components, image, prompt, steps)
    scheduler = DDIMScheduler.from_config(components["scheduler_config"])
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t, encoder_hidden_states=embeds).sample, t, x).prev_sample
    save_png(vae.decode(x / vae.config.scaling_factor).sample, png)


def pipeline_of(components: dict[str, Any]) -> Any:
    """``StableDiffusionPipeline`` on the given parts (DDIM, no safety checker)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        tokenizer=components["tokenizer"],
        unet=components["unet"],
        scheduler=DDIMScheduler.from_config(components["scheduler_config"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def pipeline_round_trip(
    components: dict[str, Any],
    pipe: Any,
    image: torch.Tensor,
    prompt: str,
    steps: int,
    guidance: float,
    png: Path,
) -> None:
    """encode -> DDIM invert (plain loop: diffusers has no inversion pipeline) ->
    ``StableDiffusionPipeline`` from x_T (DDIM, ``guidance``, decode, PIL) -> PNG."""
    x_T, _ = plain_invert(components, image, prompt, steps)
    size = image.shape[-1]
    result = pipe(
        prompt, latents=x_T, num_inference_steps=steps, guidance_scale=guidance,
        height=size, width=size, output_type="pil",
    )  # fmt: skip
    result.images[0].save(png)


def forget_prompts() -> None:
    """Drop the prompt embeddings the stages remember per loaded text encoder
    (``stages.diffusion``'s memo), so a timed engine run encodes its prompts as a cold run in
    a new process would: within the run an inversion and its edit still share them, across
    the benchmark's runs (which share the loaded models) they do not."""
    from editflow.stages import diffusion

    memo = getattr(diffusion, "_PROMPT_MEMO", None)
    if memo is not None:
        memo.clear()


def counter() -> Callable[[], int]:
    """0, 1, 2 ... : a fresh folder name per run."""
    state = iter(range(10**9))
    return lambda: next(state)
