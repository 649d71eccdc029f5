"""Stage ``sample.ddim``: DDIM sampling with classifier-free guidance from given latents."""

from __future__ import annotations

from typing import Any

from diffusers import DDIMScheduler
from pydantic import Field

from editflow.stages.base import (
    ArtifactType,
    Params,
    Port,
    StageContext,
    StageKind,
    step_reporter,
)
from editflow.stages.ddim import ddim_sample
from editflow.stages.diffusion import encode_prompt_pair, unet_noise_predictor


class SampleDdimParams(Params):
    prompt: str = Field("", description="Target prompt")
    negative_prompt: str = Field("", description="Negative prompt for CFG")
    num_inference_steps: int = Field(50, ge=1, le=1000, description="DDIM steps")
    guidance_scale: float = Field(7.5, ge=1.0, le=30.0, description="CFG scale (1 = no CFG)")
    eta: float = Field(0.0, ge=0.0, le=1.0, description="DDIM eta (0 = deterministic)")


class SampleDdim(StageKind):
    kind = "sample.ddim"
    version = "1"
    description = "DDIM sampling with CFG from x_T (e.g. inverted latents) to x0"
    params = SampleDdimParams
    inputs = (Port("latents", ArtifactType.LATENT, "Starting latents x_T"),)
    outputs = (Port("latents", ArtifactType.LATENT, "Sampled latents x0"),)
    components = frozenset({"unet", "text_encoder", "tokenizer"})

    @classmethod
    def is_seeded(cls, params: Any) -> bool:
        return params.eta > 0

    def run(self, ctx: StageContext, params: Any, inputs: dict[str, Any]) -> dict[str, Any]:
        models = ctx.models
        x_T = inputs["latents"].to(ctx.device, ctx.dtype)
        cond, uncond = encode_prompt_pair(
            models,
            params.prompt,
            params.negative_prompt,
            batch=len(x_T),
            guided=params.guidance_scale != 1.0,
        )
        scheduler = DDIMScheduler.from_config(models.scheduler_config)
        scheduler.set_timesteps(params.num_inference_steps)
        latents = ddim_sample(
            unet_noise_predictor(models.get("unet")),
            x_T,
            scheduler,
            cond,
            uncond=uncond,
            guidance_scale=params.guidance_scale,
            eta=params.eta,
            generator=ctx.generator() if params.eta > 0 else None,
            callback=step_reporter(ctx.progress, params.num_inference_steps),
        )
        return {"latents": latents}
