"""Stage ``invert.ddim``: deterministic DDIM inversion, optionally with the pix2pix-zero
noise regulariser (Parmar et al. 2023, Sec. 3.2)."""

from __future__ import annotations

from typing import Any

from diffusers import DDIMInverseScheduler
from pydantic import Field

from editflow.stages.base import (
    ArtifactType,
    Params,
    Port,
    StageContext,
    StageKind,
    step_reporter,
)
from editflow.stages.ddim import ddim_invert
from editflow.stages.diffusion import encode_prompt_pair, unet_noise_predictor


class InvertDdimParams(Params):
    prompt: str = Field("", description="Prompt the inversion is conditioned on (a caption)")
    negative_prompt: str = Field("", description="Unconditional prompt for CFG")
    num_inference_steps: int = Field(50, ge=1, le=1000, description="DDIM steps")
    guidance_scale: float = Field(
        1.0, ge=1.0, le=30.0, description="CFG scale during inversion (1 = no CFG)"
    )
    regularize: bool = Field(
        False, description="pix2pix-zero auto-correlation + KL regulariser on eps_hat"
    )
    lambda_ac: float = Field(20.0, ge=0.0, le=1000.0, description="Auto-correlation weight")
    lambda_kl: float = Field(20.0, ge=0.0, le=1000.0, description="KL weight")
    regularize_rounds: int = Field(5, ge=1, le=50, description="Outer regulariser rounds")
    regularize_steps: int = Field(
        5, ge=1, le=50, description="Auto-correlation gradient steps per round"
    )


class InvertDdim(StageKind):
    kind = "invert.ddim"
    version = "1"
    description = "DDIM inversion x0 -> x_T with the model's scheduler config"
    params = InvertDdimParams
    inputs = (
        Port("latents", ArtifactType.LATENT, "Clean latents x0"),
        Port(
            "caption",
            ArtifactType.TEXT,
            "Text to condition on (e.g. a caption stage's output); replaces `prompt`",
            optional=True,
        ),
    )
    outputs = (
        Port("latents", ArtifactType.LATENT, "Inverted latents x_T"),
        Port("trajectory", ArtifactType.NOISE_SEQUENCE, "x_t after each inversion step"),
        Port("prompt_embeds", ArtifactType.EMBEDDING, "Embedding of the prompt"),
    )
    components = frozenset({"unet", "text_encoder", "tokenizer"})

    @classmethod
    def is_seeded(cls, params: Any) -> bool:
        return bool(params.regularize)  # the regulariser draws its roll shifts

    def run(self, ctx: StageContext, params: Any, inputs: dict[str, Any]) -> dict[str, Any]:
        models = ctx.models
        cond, uncond = encode_prompt_pair(
            models,
            inputs.get("caption", params.prompt),
            params.negative_prompt,
            batch=len(inputs["latents"]),
            guided=params.guidance_scale != 1.0,
        )
        scheduler = DDIMInverseScheduler.from_config(models.scheduler_config)
        scheduler.set_timesteps(params.num_inference_steps)
        x_T, trajectory = ddim_invert(
            unet_noise_predictor(models.get("unet")),
            inputs["latents"].to(ctx.device, ctx.dtype),
            scheduler,
            cond,
            uncond=uncond,
            guidance_scale=params.guidance_scale,
            regularize=params.regularize,
            lambda_ac=params.lambda_ac,
            lambda_kl=params.lambda_kl,
            reg_rounds=params.regularize_rounds,
            ac_steps=params.regularize_steps,
            generator=ctx.generator() if params.regularize else None,
            callback=step_reporter(ctx.progress, params.num_inference_steps),
        )
        return {"latents": x_T, "trajectory": trajectory, "prompt_embeds": cond}
