"""Stages ``encode.pixels`` and ``decode.pixels``: images in and out of a pixel-space model.

A pixel-space diffusion model (DDPM's ``UNet2DModel``, DiffusionCLIP's models) denoises the
image itself, scaled to [-1, 1], where a latent model denoises VAE latents. The recipe says
which by its stages; a VAE stage on a model without a VAE, or a pixel stage on a model with
one, is found while planning from the model's identity, before any weight loads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from editflow.errors import Problem
from editflow.lazy import lazy
from editflow.stages.base import ArtifactType, CheckView, Params, Port, StageContext, StageKind

torch = lazy("torch")

MODEL = "model.id"


def space_problems(models: Mapping[str, Any], pixel_stage: bool) -> list[Problem]:
    """The problem of a pixel stage on a latent model, or a VAE stage on a pixel model."""
    from editflow.models.providers import has_component

    model = models.get(MODEL)
    if model is None:
        return []
    latent = has_component(model, "vae")
    if pixel_stage and latent:
        return [Problem(f"model '{model.spec.id}' denoises VAE latents: images enter with"
                        " encode.vae and leave with decode.vae")]  # fmt: skip
    if not pixel_stage and not latent:
        return [Problem(f"model '{model.spec.id}' has no VAE: it denoises pixels, so images"
                        " enter with encode.pixels and leave with decode.pixels")]  # fmt: skip
    return []


class EncodePixels(StageKind):
    kind = "encode.pixels"
    version = "1"
    description = "Images to a pixel-space model's input: scaled from [0, 1] to [-1, 1]"
    params = Params
    inputs = (Port("images", ArtifactType.IMAGE, "Images in [0, 1], (N, 3, H, W)"),)
    outputs = (
        Port("latents", ArtifactType.LATENT, "x0 in [-1, 1], (N, 3, H, W)", size_of="images"),
    )

    @classmethod
    def check(cls, params: Params, view: CheckView) -> list[Problem]:
        return space_problems(view.models, pixel_stage=True)

    def run(self, ctx: StageContext, params: Params, *, images: torch.Tensor) -> dict[str, Any]:
        return {"latents": images.float() * 2 - 1}


class DecodePixels(StageKind):
    kind = "decode.pixels"
    version = "1"
    description = "A pixel-space model's output to images in [0, 1]; written as PNG"
    params = Params
    inputs = (
        Port(
            "latents",
            ArtifactType.LATENT,
            "x0 (or an inverted x_T) in [-1, 1], (N, 3, H, W)",
            accepts=(ArtifactType.INVERTED_LATENT, ArtifactType.STOCHASTIC_LATENT),
        ),
    )
    outputs = (
        Port(
            "images",
            ArtifactType.IMAGE,
            "Images in [0, 1], (N, 3, H, W)",
            export=True,
            size_of="latents",
        ),
    )

    @classmethod
    def check(cls, params: Params, view: CheckView) -> list[Problem]:
        return space_problems(view.models, pixel_stage=True)

    def run(self, ctx: StageContext, params: Params, *, latents: torch.Tensor) -> dict[str, Any]:
        return {"images": ((latents.float() + 1) / 2).clamp(0, 1).cpu()}
