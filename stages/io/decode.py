"""Stage ``decode.vae``: latents to images, written to the output folder as PNG."""

from __future__ import annotations

from typing import Any

from editflow.errors import Problem
from editflow.lazy import lazy
from editflow.models import specs
from editflow.stages.base import ArtifactType, CheckView, Params, Port, StageContext, StageKind
from editflow.stages.diffusion import vae_decode
from editflow.stages.io.pixels import space_problems

torch = lazy("torch")


class DecodeVae(StageKind):
    kind = "decode.vae"
    version = "1"
    description = "Decode latents to images with the VAE; the images are written as PNG"
    params = Params
    inputs = (
        Port(
            "latents",
            ArtifactType.LATENT,
            "Latents, (N, C, h, w): clean or inverted",
            accepts=(ArtifactType.INVERTED_LATENT, ArtifactType.STOCHASTIC_LATENT),
        ),
    )
    outputs = (
        Port(
            "images",
            ArtifactType.IMAGE,
            "Decoded images in [0, 1], (N, 3, H, W)",
            export=True,
            size_of="latents",
        ),
    )
    components = (specs.VAE,)

    @classmethod
    def check(cls, params: Params, view: CheckView) -> list[Problem]:
        return space_problems(view.models, pixel_stage=False)

    def run(self, ctx: StageContext, params: Params, *, latents: torch.Tensor) -> dict[str, Any]:
        vae = ctx.models.get("vae")
        return {"images": vae_decode(vae, latents.to(ctx.device)).cpu()}
