"""``invert.textual_inversion``: per-image prompt embeddings for image interpolation (Wang &
Golland 2023); the math is :mod:`editflow.stages.interpolation.textual_inversion`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import Field

from editflow.errors import Problem
from editflow.lazy import lazy
from editflow.models import specs
from editflow.stages.base import (
    ArtifactType,
    CheckView,
    Params,
    Port,
    StageContext,
    StageKind,
)
from editflow.stages.diffusion import (
    encode_prompts,
    unet_noise_predictor,
)
from editflow.stages.fields import GuidanceScale
from editflow.stages.interpolation.checks import textual_inversion_problems
from editflow.stages.interpolation.textual_inversion import textual_inversion

torch = lazy("torch")
F = lazy("torch.nn.functional")
diffusers = lazy("diffusers")


class InvertTextualInversionParams(Params):
    prompt: str = Field("", description="Prompt whose embedding every image's starts from")
    negative_prompt: str = Field("", description="Prompt the shared negative embedding starts from")
    iterations: int = Field(200, ge=1, le=10000, description="Adam steps (METHODS.md: 100-500)")
    learning_rate: float = Field(1e-4, gt=0.0, le=1.0, description="Adam learning rate")
    guidance_scale: GuidanceScale = 7.5  # of the prediction the loss is taken on
    augment: bool = Field(True, description="Shift the latents by up to one latent pixel")


class InvertTextualInversion(StageKind):
    """Textual inversion: one prompt embedding per image and a shared negative embedding."""

    kind = "invert.textual_inversion"
    version = "1"
    description = "Prompt embeddings per image and a negative embedding that reconstruct them"
    params = InvertTextualInversionParams
    inputs = (
        Port(
            "latents",
            ArtifactType.LATENT,
            "Clean latents of the images (every image of every reference)",
            many=True,
        ),
        Port(
            "caption",
            ArtifactType.TEXT,
            "Text to start from (e.g. a caption stage's output); replaces `prompt`",
            optional=True,
        ),
    )
    outputs = (
        Port("prompt_embeds", ArtifactType.EMBEDDING, "(N, tokens, D) one per image"),
        Port("negative_embeds", ArtifactType.EMBEDDING, "(1, tokens, D) shared"),
        Port("losses", ArtifactType.SCORES, "The loss of every iteration"),
    )
    seeded = True
    components = specs.DENOISER

    @classmethod
    def check(cls, params: InvertTextualInversionParams, view: CheckView) -> list[Problem]:
        return textual_inversion_problems(view)

    def run(
        self,
        ctx: StageContext,
        params: InvertTextualInversionParams,
        *,
        latents: Sequence[torch.Tensor],
        caption: str | None,
    ) -> dict[str, Any]:
        models = ctx.models
        x0 = torch.cat([item.to(ctx.device, ctx.dtype) for item in latents])
        prompt = caption if caption is not None else params.prompt
        # One text-encoder call for both starting points.
        embeds = encode_prompts(
            models.get("tokenizer"), models.get("text_encoder"), [prompt, params.negative_prompt]
        )
        cond, negative = embeds[:1].expand(len(x0), -1, -1), embeds[1:]
        scheduler = diffusers.DDPMScheduler.from_config(models.scheduler_config)
        prompt_embeds, negative_embeds, losses = textual_inversion(
            unet_noise_predictor(models.get("unet")),
            x0,
            cond,
            negative,
            scheduler.alphas_cumprod,
            scheduler.config.prediction_type,
            iterations=params.iterations,
            learning_rate=params.learning_rate,
            guidance_scale=params.guidance_scale,
            generator=ctx.generator(),
            augment=params.augment,
            progress=ctx.progress,
        )
        return {
            "prompt_embeds": prompt_embeds,
            "negative_embeds": negative_embeds,
            "losses": losses,
        }
