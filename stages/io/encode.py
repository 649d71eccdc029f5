"""Stage ``encode.vae``: images to latents through the model's VAE (posterior mean)."""

from __future__ import annotations

from typing import Any

from editflow.errors import Problem
from editflow.lazy import lazy
from editflow.models import specs
from editflow.stages.base import ArtifactType, CheckView, Params, Port, StageContext, StageKind
from editflow.stages.diffusion import vae_encode
from editflow.stages.io.pixels import space_problems

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
    def check(cls, params: Params, view: CheckView) -> list[Problem]:
        return space_problems(view.models, pixel_stage=False)

    def run(self, ctx: StageContext, params: Params, *, images: torch.Tensor) -> dict[str, Any]:
        vae = ctx.models.get("vae")
        return {"latents": vae_encode(vae, images.to(ctx.device)).float()}
