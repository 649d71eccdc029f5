"""Stage ``decode.vae``: latents to images, written to the output folder as PNG."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from editflow.lazy import lazy
from editflow.models import specs
from editflow.stages.base import ArtifactType, Params, Port, StageContext, StageKind
from editflow.stages.diffusion import vae_decode
from editflow.stages.pixels import space_problems

torch = lazy("torch")


class DecodeVae(StageKind):
    kind = "decode.vae"
    version = "1"
    description = "Decode latents to images with the VAE; the images are written as PNG"
    params = Params
    inputs = (Port("latents", ArtifactType.LATENT, "Latents, (N, C, h, w)"),)
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
    def check_models(
        cls, params: Params, models: Mapping[str, Any]
    ) -> list[tuple[str | None, str]]:
        return space_problems(models, pixel_stage=False)

    def run(self, ctx: StageContext, params: Params, *, latents: torch.Tensor) -> dict[str, Any]:
        vae = ctx.models.get("vae")
        return {"images": vae_decode(vae, latents.to(ctx.device)).cpu()}
