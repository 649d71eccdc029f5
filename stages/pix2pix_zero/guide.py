"""The ``guide`` family: passes that record what a guided edit is steered towards.

``guide.attention_reference`` is pix2pix-zero's reference pass (Parmar et al. 2023): it
reconstructs x_T with the caption and streams every step's cross-attention maps into the
cache; the loop is :func:`editflow.stages.pix2pix_zero.reference_pass`.
"""

from __future__ import annotations

from typing import Any

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
from editflow.stages.diffusion import unet_noise_predictor
from editflow.stages.fields import Steps
from editflow.stages.pix2pix_zero.attention import AttentionMaps, install_attention_recorder
from editflow.stages.pix2pix_zero.edit import match_batch, reference_pass

torch = lazy("torch")
diffusers = lazy("diffusers")


class GuideReferenceParams(Params):
    num_inference_steps: Steps = 50


class GuidePix2PixZeroReference(StageKind):
    """pix2pix-zero reference pass: reconstruct x_T and stream its cross-attention maps."""

    kind = "guide.attention_reference"
    needs_text = True
    version = "2"  # 2: recorded layers compute their output with fused SDPA
    description = "Denoise x_T with the caption and record every step's cross-attention maps"
    params = GuideReferenceParams
    inputs = (
        Port("x_T", ArtifactType.INVERTED_LATENT, "Inverted latents (regularised DDIM inversion)"),
        Port("prompt_embeds", ArtifactType.EMBEDDING, "Caption embedding used for inversion"),
    )
    outputs = (
        Port(
            "attention_maps",
            ArtifactType.ATTENTION_MAPS,
            "Conditional cross-attention maps per layer and step (fp16, streamed)",
        ),
        Port("latents", ArtifactType.LATENT, "The reconstruction x_0", size_of="x_T"),
    )
    components = (specs.UNET, specs.SCHEDULER_CONFIG)

    def run(
        self,
        ctx: StageContext,
        params: GuideReferenceParams,
        *,
        x_T: torch.Tensor,
        prompt_embeds: torch.Tensor,
    ) -> dict[str, Any]:
        unet = ctx.models.get("unet")
        x_T = x_T.to(ctx.device, ctx.dtype)
        embeds = match_batch(
            prompt_embeds.to(ctx.device, ctx.dtype), len(x_T), "prompt_embeds", ctx
        )
        steps = params.num_inference_steps
        scheduler = diffusers.DDIMScheduler.from_config(ctx.models.scheduler_config)
        scheduler.set_timesteps(steps)
        writer = ctx.write_steps("attention_maps", steps)

        def record(step: int, maps: AttentionMaps) -> None:
            # fp16 on the CPU, as the cache keeps them: the device holds no step past its call.
            writer.write(
                step, {name: m.detach().to("cpu", torch.float16) for name, m in maps.items()}
            )

        with install_attention_recorder(unet) as recorder:
            latents = reference_pass(
                recorder.predictor(unet_noise_predictor(unet)),
                x_T,
                scheduler,
                embeds,
                record=record,
                callback=step_reporter(ctx.progress, steps),
            )
        return {"attention_maps": writer.result(), "latents": latents}
