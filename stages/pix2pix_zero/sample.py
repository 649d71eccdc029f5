"""``sample.pix2pix_zero``: the pix2pix-zero edit with cross-attention guidance (Parmar et
al. 2023); math in :mod:`editflow.stages.pix2pix_zero.edit`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import Field

from editflow.errors import EditflowError, Problem
from editflow.lazy import lazy
from editflow.models import specs
from editflow.stages.base import (
    ArtifactType,
    CheckView,
    Port,
    StageContext,
    StageKind,
    StepSequence,
    step_reporter,
)
from editflow.stages.fields import Eta, GuidanceScale, Steps
from editflow.stages.pix2pix_zero.attention import AttentionMaps, install_attention_recorder
from editflow.stages.pix2pix_zero.edit import guided_edit, match_batch, no_weight_grads
from editflow.stages.tuned import WEIGHTS_PORT, TunedParams, check_ratio, mixing_predictor

torch = lazy("torch")
diffusers = lazy("diffusers")


class SamplePix2PixZeroParams(TunedParams):
    xa_guidance: float = Field(
        0.1,
        ge=0.0,
        le=10.0,
        description="Cross-attention guidance step (0.1 real, 0.15 synthetic, <= 0.01 SD 2.x);"
        " it steps the one latent with the edited prompt's maps, where the released code steps"
        " both CFG halves, so the same value acts about twice as strongly here",
    )
    guidance_scale: GuidanceScale = 5.0  # the caption is the negative prompt
    num_inference_steps: Steps | None = None
    eta: Eta = 0.0
    direction_multiplier: float = Field(
        1.0, ge=-10.0, le=10.0, description="Scale of the edit direction added to the caption"
    )


class SamplePix2PixZero(StageKind):
    """pix2pix-zero edit: caption + direction, guided by the reference cross-attention maps."""

    kind = "sample.pix2pix_zero"
    needs_text = True
    version = "2"  # 2: recorded layers compute their output with fused SDPA
    description = "Edit x_T along a text direction with cross-attention guidance"
    params = SamplePix2PixZeroParams
    inputs = (
        Port("x_T", ArtifactType.INVERTED_LATENT, "Inverted latents (the reference pass's start)"),
        Port("prompt_embeds", ArtifactType.EMBEDDING, "Caption embedding"),
        Port("direction", ArtifactType.DIRECTION, "Edit direction (1, 77, D)"),
        Port(
            "attention_maps",
            ArtifactType.ATTENTION_MAPS,
            "Reference maps from guide.attention_reference (needed when xa_guidance > 0)",
            optional=True,
        ),
        WEIGHTS_PORT,
    )
    outputs = (Port("latents", ArtifactType.LATENT, "Edited latents x_0", size_of="x_T"),)
    components = (specs.UNET, specs.SCHEDULER_CONFIG)
    inherits = {"attention_maps": {"num_inference_steps": 50}}

    @classmethod
    def is_seeded(cls, params: SamplePix2PixZeroParams) -> bool:
        return params.eta > 0

    @classmethod
    def check(cls, params: SamplePix2PixZeroParams, view: CheckView) -> list[Problem]:
        problems = check_ratio(params.ratio, view.references.get("weights") or [])
        if params.xa_guidance > 0 and "attention_maps" not in view.references:
            message = f"xa_guidance is {params.xa_guidance} but no attention_maps are connected"
            hint = "connect a guide.attention_reference stage or set xa_guidance = 0"
            problems.append(Problem(message, key="attention_maps", hint=hint))
        return problems

    def run(
        self,
        ctx: StageContext,
        params: SamplePix2PixZeroParams,
        *,
        x_T: torch.Tensor,
        prompt_embeds: torch.Tensor,
        direction: torch.Tensor,
        attention_maps: StepSequence | None,
        weights: Sequence[Mapping[str, torch.Tensor]] | None,
    ) -> dict[str, Any]:
        unet = ctx.models.get("unet")
        x_T = x_T.to(ctx.device, ctx.dtype)
        caption = match_batch(
            prompt_embeds.to(ctx.device, ctx.dtype), len(x_T), "prompt_embeds", ctx
        )
        direction = direction.to(ctx.device, ctx.dtype)
        edit_embeds = caption + params.direction_multiplier * direction
        reference = attention_maps
        # check() refused guidance without maps; the maps' length is the data's to tell.
        if reference is not None and params.xa_guidance > 0:
            if len(reference) != params.num_inference_steps:
                raise EditflowError(
                    f"attention_maps hold {len(reference)} steps but"
                    f" num_inference_steps is {params.num_inference_steps}",
                    key=f"stages.{ctx.name}.num_inference_steps",
                    hint="use the reference stage's num_inference_steps",
                )
        scheduler = diffusers.DDIMScheduler.from_config(ctx.models.scheduler_config)
        scheduler.set_timesteps(params.num_inference_steps)

        with no_weight_grads(unet), install_attention_recorder(unet) as recorder:
            predict = mixing_predictor(unet, weights or [], params.ratio)
            latents = guided_edit(
                predict,
                x_T,
                scheduler,
                edit_embeds,
                caption,
                predict_maps=recorder.predictor(predict),
                reference_maps=reference.__getitem__ if reference is not None else _no_reference,
                xa_guidance=params.xa_guidance,
                guidance_scale=params.guidance_scale,
                eta=params.eta,
                generator=ctx.generator() if params.eta > 0 else None,
                callback=step_reporter(ctx.progress, params.num_inference_steps),
            )
        return {"latents": latents}


def _no_reference(step: int) -> AttentionMaps:
    raise RuntimeError("reference maps requested with guidance off")
