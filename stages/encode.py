"""Stage ``encode.vae``: images to latents through the model's VAE (posterior mean)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from editflow.lazy import lazy
from editflow.models import specs
from editflow.stages.base import ArtifactType, Params, Port, StageContext, StageKind
from editflow.stages.diffusion import vae_encode
from editflow.stages.pixels import space_problems

torch = lazy("torch")


class EncodeVae(StageKind):
    kind = "encode.vae"
    version = "1"
    description = "Encode images to latents with the VAE (posterior mean times scaling factor)"
    params = Params
    inputs = (Port("images", ArtifactType.IMAGE, "Images in [0, 1], (N, 3, H, W)"),)
    outputs = (
        Port("latents", ArtifactType.LATENT, "Latents x0, (N, C, H/8, W/8)", size_of="images"),
    )
    components = (specs.VAE,)

    @classmethod
    def check_models(
        cls, params: Params, models: Mapping[str, Any]
    ) -> list[tuple[str | None, str]]:
        return space_problems(models, pixel_stage=False)

    def run(self, ctx: StageContext, params: Params, *, images: torch.Tensor) -> dict[str, Any]:
        vae = ctx.models.get("vae")
        return {"latents": vae_encode(vae, images.to(ctx.device)).float()}
