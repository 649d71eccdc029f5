"""The ``invert`` family: image latents to the noise that regenerates them.

- ``invert.ddim``: deterministic DDIM inversion, optionally with the pix2pix-zero noise
  regulariser (Parmar et al. 2023, Sec. 3.2); math in :mod:`editflow.stages.ddim`.
- ``invert.edit_friendly``: edit-friendly DDPM inversion (Huberman-Spiegelglas et al. 2024);
  math in :mod:`editflow.stages.edit_friendly`.
- ``invert.textual_inversion``: per-image prompt embeddings for image interpolation (Wang &
  Golland 2023); math in :mod:`editflow.stages.textual_inversion`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import Field, model_validator

from editflow.lazy import lazy
from editflow.models import specs
from editflow.stages.base import (
    ArtifactType,
    Params,
    Port,
    StageContext,
    StageKind,
    step_reporter,
)
from editflow.stages.ddim import ddim_invert
from editflow.stages.diffusion import (
    Callback,
    StepInfo,
    check_t0,
    encode_prompt_pair,
    encode_prompts,
    prompt_pair,
    unet_noise_predictor,
)
from editflow.stages.diffusionclip import grid_invert, t0_grid
from editflow.stages.edit_friendly import edit_friendly_invert
from editflow.stages.reverse_steps import SchedulerName, build_scheduler, check_eta
from editflow.stages.textual_inversion import textual_inversion

torch = lazy("torch")
diffusers = lazy("diffusers")


class InvertDdimParams(Params):
    prompt: str = Field("", description="Prompt the inversion is conditioned on (a caption)")
    negative_prompt: str = Field("", description="Unconditional prompt for CFG")
    num_inference_steps: int = Field(50, ge=1, le=999, description="DDIM steps")
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
    t0: int | None = Field(
        None,
        ge=1,
        le=999,
        description="Invert only to this timestep, on the grid linspace(0, 1, n) * t0 with n ="
        " num_inference_steps (DiffusionCLIP's S_for); default: the whole schedule",
    )

    @model_validator(mode="after")
    def _t0_alone(self) -> InvertDdimParams:
        if self.t0 is not None and self.regularize:
            raise ValueError("t0 and regularize cannot be combined")
        return self


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
        Port("latents", ArtifactType.LATENT, "Inverted latents x_T", size_of="latents"),
        Port(
            "trajectory",
            ArtifactType.LATENT_TRAJECTORY,
            "x_t after each inversion step",
            size_of="latents",
        ),
        Port("prompt_embeds", ArtifactType.EMBEDDING, "Embedding of the prompt"),
    )
    components = specs.DENOISER

    @classmethod
    def is_seeded(cls, params: InvertDdimParams) -> bool:
        return params.regularize  # the regulariser draws its roll shifts

    @classmethod
    def check_models(
        cls, params: InvertDdimParams, models: Mapping[str, Any]
    ) -> list[tuple[str | None, str]]:
        return check_t0(params.t0, models)

    def run(
        self,
        ctx: StageContext,
        params: InvertDdimParams,
        *,
        latents: torch.Tensor,
        caption: str | None,
    ) -> dict[str, Any]:
        models = ctx.models
        cond, uncond = prompt_pair(
            models,
            caption if caption is not None else params.prompt,
            params.negative_prompt,
            batch=len(latents),
            guided=params.guidance_scale != 1.0,
        )
        no_embeds = torch.zeros(len(latents), 0, 0)
        if params.t0 is not None:
            alphas = diffusers.DDIMScheduler.from_config(models.scheduler_config).alphas_cumprod
            x_t0, trajectory = grid_invert(
                unet_noise_predictor(models.get("unet")),
                latents.to(ctx.device, ctx.dtype),
                alphas,
                t0_grid(params.t0, params.num_inference_steps),
                cond,
                uncond,
                guidance_scale=params.guidance_scale,
                callback=step_reporter(ctx.progress, params.num_inference_steps - 1),
            )
            embeds = cond if cond is not None else no_embeds
            return {"latents": x_t0, "trajectory": trajectory, "prompt_embeds": embeds}
        scheduler = diffusers.DDIMInverseScheduler.from_config(models.scheduler_config)
        scheduler.set_timesteps(params.num_inference_steps)
        x_T, trajectory = ddim_invert(
            unet_noise_predictor(models.get("unet")),
            latents.to(ctx.device, ctx.dtype),
            scheduler,
            cond,
            uncond,
            guidance_scale=params.guidance_scale,
            regularize=params.regularize,
            lambda_ac=params.lambda_ac,
            lambda_kl=params.lambda_kl,
            reg_rounds=params.regularize_rounds,
            ac_steps=params.regularize_steps,
            generator=ctx.generator() if params.regularize else None,
            callback=step_reporter(ctx.progress, params.num_inference_steps),
        )
        embeds = cond if cond is not None else no_embeds
        return {"latents": x_T, "trajectory": trajectory, "prompt_embeds": embeds}


class InvertEditFriendlyParams(Params):
    source_prompt: str = Field(
        "", description="Prompt describing the input image; empty means no CFG"
    )
    cfg_src: float = Field(
        3.5, ge=1.0, le=30.0, description="CFG scale on the source prompt during inversion"
    )
    num_inference_steps: int = Field(
        100, ge=1, le=999, description="Reverse steps T; the edit must use the same"
    )
    eta: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="DDIM eta (1 = DDPM); > 0 for noise maps to exist, 1 for dpmsolver++",
    )
    scheduler: SchedulerName = Field(
        "ddim", description="Reverse step: DDIM(eta) or sde-dpmsolver++ order 2 (LEDITS++)"
    )

    @model_validator(mode="after")
    def _check(self) -> InvertEditFriendlyParams:
        check_eta(self.scheduler, self.eta)
        return self


class InvertEditFriendly(StageKind):
    """Edit-friendly DDPM inversion: noise maps that make the reverse process return x0."""

    kind = "invert.edit_friendly"
    version = "1"
    description = "Edit-friendly DDPM inversion x0 -> (x_T, noise maps) with independent noise"
    params = InvertEditFriendlyParams
    inputs = (Port("latents", ArtifactType.LATENT, "Clean latents x0 (VAE-encoded image)"),)
    outputs = (
        Port(
            "x_T",
            ArtifactType.LATENT,
            "The noisiest level of the auxiliary path",
            size_of="latents",
        ),
        Port(
            "noise_maps",
            ArtifactType.NOISE_SEQUENCE,
            "(T, N, C, h, w) noise maps, noisiest first",
            size_of="latents",
            streamed=True,
        ),
        Port(
            "auxiliary_path",
            ArtifactType.LATENT_TRAJECTORY,
            "(T + 1, N, C, h, w) latents per level, x_T first and x0 last",
            size_of="latents",
            streamed=True,
        ),
        Port("prompt_embeds", ArtifactType.EMBEDDING, "Source-prompt embeddings used"),
    )
    seeded = True
    components = specs.DENOISER

    def run(
        self, ctx: StageContext, params: InvertEditFriendlyParams, *, latents: torch.Tensor
    ) -> dict[str, Any]:
        models = ctx.models
        x0 = latents.to(ctx.device, ctx.dtype)
        # An empty source prompt means no CFG.
        cond, uncond = encode_prompt_pair(
            models, params.source_prompt, "", len(x0), guided=bool(params.source_prompt)
        )
        # Timesteps stay on the CPU: the loop reads them as numbers without waiting for the
        # device, and the UNet moves each one to the latent's device itself.
        scheduler = build_scheduler(
            params.scheduler, models.scheduler_config, params.num_inference_steps
        )
        inversion = edit_friendly_invert(
            unet_noise_predictor(models.get("unet")),
            x0,
            scheduler,
            cond,
            uncond,
            guidance_scale=params.cfg_src,
            eta=params.eta,
            generator=ctx.generator(),
            callback=_streaming(
                ctx,
                step_reporter(ctx.progress, params.num_inference_steps),
                params.num_inference_steps,
                x0,
            ),
        )
        return {
            "x_T": inversion.x_T,
            "noise_maps": inversion.noise_maps,
            "auxiliary_path": inversion.auxiliary_path,
            "prompt_embeds": cond,
        }


def _streaming(ctx: StageContext, report: Callback, num_steps: int, x0: torch.Tensor) -> Callback:
    """``report``, and where the engine asks for it (a stage other workers may follow), each
    noise map and level of the auxiliary path written to the cache as soon as it is final."""
    if ctx.step_writer is None:
        return report
    noise_maps = ctx.step_writer("noise_maps", (num_steps, *x0.shape), x0.dtype)
    path = ctx.step_writer("auxiliary_path", (num_steps + 1, *x0.shape), x0.dtype)

    def write(info: StepInfo) -> None:
        if info["i"] == 0:
            path.write(0, info["x_in"])
        noise_maps.write(info["i"], info["z"])
        path.write(info["i"] + 1, info["x"])
        report(info)

    return write


class InvertTextualInversionParams(Params):
    prompt: str = Field("", description="Prompt whose embedding every image's starts from")
    negative_prompt: str = Field("", description="Prompt the shared negative embedding starts from")
    iterations: int = Field(200, ge=1, le=10000, description="Adam steps (METHODS.md: 100-500)")
    learning_rate: float = Field(1e-4, gt=0.0, le=1.0, description="Adam learning rate")
    guidance_scale: float = Field(
        7.5, ge=1.0, le=30.0, description="CFG scale of the prediction the loss is taken on"
    )
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
