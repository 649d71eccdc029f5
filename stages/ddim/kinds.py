"""DDIM as stage kinds: ``invert.ddim`` and ``sample.ddim``.

- ``invert.ddim``: deterministic DDIM inversion (Song et al. 2021, sec. 4.3), optionally with
  the pix2pix-zero noise regulariser (Parmar et al. 2023, Sec. 3.2), or only up to ``t0`` on
  DiffusionCLIP's time grid.
- ``sample.ddim``: DDIM with classifier-free guidance from x_T (or x_t0) to x0, optionally
  with tuned weights mixed in; its text is the prompt or another stage's embeddings, plus an
  optional edit direction (:mod:`editflow.stages.conditioning`).

The loops are :mod:`editflow.stages.ddim_loops`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import Field, model_validator

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
    step_reporter,
)
from editflow.stages.conditioning import text_conditioning, text_problems
from editflow.stages.ddim_loops import ddim_invert, ddim_sample
from editflow.stages.diffusion import check_t0, prompt_pair, unet_noise_predictor
from editflow.stages.fields import T0, Eta, GuidanceScale, NegativePrompt, Prompt, Steps
from editflow.stages.grid_scheduler import GridScheduler, t0_grid
from editflow.stages.tuned import WEIGHTS_PORT, TunedParams, check_ratio, mixing_predictor

torch = lazy("torch")
F = lazy("torch.nn.functional")
diffusers = lazy("diffusers")


class InvertDdimParams(Params):
    prompt: Prompt = ""
    negative_prompt: NegativePrompt = ""
    num_inference_steps: Steps = 50
    guidance_scale: GuidanceScale = 1.0
    regularize: bool = Field(
        False, description="pix2pix-zero auto-correlation + KL regulariser on eps_hat"
    )
    lambda_ac: float = Field(20.0, ge=0.0, le=1000.0, description="Auto-correlation weight")
    lambda_kl: float = Field(20.0, ge=0.0, le=1000.0, description="KL weight")
    regularize_rounds: int = Field(5, ge=1, le=50, description="Outer regulariser rounds")
    regularize_steps: int = Field(
        5, ge=1, le=50, description="Auto-correlation gradient steps per round"
    )
    t0: T0 | None = None

    @model_validator(mode="after")
    def _t0_alone(self) -> InvertDdimParams:
        if self.t0 is not None and self.regularize:
            raise ValueError("t0 and regularize cannot be combined")
        return self


class InvertDdim(StageKind):
    kind = "invert.ddim"
    version = "3"  # 3: tiny-pixel runs on its own DDPM schedule (was tiny's SD one)
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
        Port("latents", ArtifactType.INVERTED_LATENT, "Inverted latents x_T", size_of="latents"),
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
    def check(cls, params: InvertDdimParams, view: CheckView) -> list[Problem]:
        prompts = {"prompt": params.prompt, "negative_prompt": params.negative_prompt}
        return text_problems(view, prompts, ports=("caption",)) + check_t0(params.t0, view.models)

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
            grid = t0_grid(params.t0, params.num_inference_steps)
            ddim = diffusers.DDIMScheduler.from_config(models.scheduler_config)
            scheduler = GridScheduler.from_scheduler(ddim, grid, inverse=True)
        else:
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
            callback=step_reporter(ctx.progress, scheduler.num_inference_steps),
        )
        if params.t0 is not None:
            trajectory = trajectory[1:]  # DiffusionCLIP's: x after each step, not x0
        embeds = cond if cond is not None else no_embeds
        return {"latents": x_T, "trajectory": trajectory, "prompt_embeds": embeds}

    def nan_reason(self, params: InvertDdimParams, inputs: Mapping[str, Any]) -> str | None:
        if not params.regularize:
            return None
        return regularizer_diverged(inputs["latents"].shape, params.lambda_kl)


def regularizer_diverged(shape: Sequence[int], lambda_kl: float) -> str:
    """Why a regularised inversion came out NaN. The KL step moves each value towards the
    mean by ``2 * lambda_kl * (1 - 1/var) / (values - 1)`` of its distance, so on a small
    latent it overshoots: on tiny at 10 steps, 5x5 latents (40 px) diverge at the paper's 20,
    6x6 do not, and 4x4 hold at 10."""
    height, width = shape[-2:]
    values = shape[-3] * height * width
    return (
        f"the noise regularisation diverged on a {height}x{width} latent (lambda_kl ="
        f" {lambda_kl:g} over {values} values per sample): use a larger image or a smaller"
        " lambda_kl"
    )


class SampleDdimParams(TunedParams):
    prompt: Prompt = ""
    negative_prompt: NegativePrompt = ""
    num_inference_steps: Steps = 50
    guidance_scale: GuidanceScale = 7.5
    eta: Eta = 0.0
    t0: T0 | None = None


class SampleDdim(StageKind):
    kind = "sample.ddim"
    version = "3"  # 3: tiny-pixel runs on its own DDPM schedule (was tiny's SD one)
    description = "DDIM sampling with CFG from x_T (e.g. inverted latents) to x0"
    params = SampleDdimParams
    inputs = (
        Port("latents", ArtifactType.INVERTED_LATENT, "Starting latents x_T (invert.ddim)"),
        Port(
            "prompt_embeds",
            ArtifactType.EMBEDDING,
            "(1 or N, tokens, D) embeddings (a textual inversion's); replaces `prompt`",
            optional=True,
        ),
        Port(
            "direction",
            ArtifactType.DIRECTION,
            "Edit direction added to the conditional embedding (direction.pix2pix_zero)",
            optional=True,
        ),
        WEIGHTS_PORT,
    )
    outputs = (Port("latents", ArtifactType.LATENT, "Sampled latents x0", size_of="latents"),)
    components = specs.DENOISER
    inherits = {"latents": {"t0": None}}

    @classmethod
    def inherit(
        cls, params: Any, producers: Mapping[str, tuple[str, Any]]
    ) -> tuple[Any, list[Problem]]:
        params, problems = super().inherit(params, producers)
        stage, theirs = producers.get("latents", ("", None))
        steps = getattr(theirs, "num_inference_steps", None)
        if steps is not None and steps != params.num_inference_steps:
            # Allowed (DiffusionCLIP samples in fewer steps than it inverts), but then the
            # sampler does not retrace the inversion, so a reconstruction is not exact.
            message = (f"is {params.num_inference_steps} but latents come from {stage!r}, which"
                       f" inverted in {steps}: sampling will not retrace the inversion")  # fmt: skip
            problems.append(Problem(message, key="num_inference_steps", note=True))
        return params, problems

    @classmethod
    def is_seeded(cls, params: SampleDdimParams) -> bool:
        return params.eta > 0

    @classmethod
    def check(cls, params: SampleDdimParams, view: CheckView) -> list[Problem]:
        weights = view.references.get("weights") or []
        prompts = {"prompt": params.prompt, "negative_prompt": params.negative_prompt}
        return (
            check_ratio(params.ratio, weights)
            + check_t0(params.t0, view.models)
            + text_problems(view, prompts, replaced="prompt")
        )

    def run(
        self,
        ctx: StageContext,
        params: SampleDdimParams,
        *,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor | None,
        direction: torch.Tensor | None,
        weights: Sequence[Mapping[str, torch.Tensor]] | None,
    ) -> dict[str, Any]:
        models = ctx.models
        x_T = latents.to(ctx.device, ctx.dtype)
        cond, uncond = text_conditioning(
            models, params.prompt, params.negative_prompt, len(x_T),
            guided=params.guidance_scale != 1.0, prompt_embeds=prompt_embeds,
            direction=direction, stage=ctx.name, device=ctx.device, dtype=ctx.dtype,
        )  # fmt: skip
        scheduler = diffusers.DDIMScheduler.from_config(models.scheduler_config)
        predict = mixing_predictor(models.get("unet"), weights or [], params.ratio)
        if params.t0 is not None:
            grid = t0_grid(params.t0, params.num_inference_steps)
            scheduler = GridScheduler.from_scheduler(scheduler, grid)
        else:
            scheduler.set_timesteps(params.num_inference_steps)
        latents = ddim_sample(
            predict,
            x_T,
            scheduler,
            cond,
            uncond,
            guidance_scale=params.guidance_scale,
            eta=params.eta,
            generator=ctx.generator() if params.eta > 0 else None,
            callback=step_reporter(ctx.progress, params.num_inference_steps),
        )
        return {"latents": latents}
