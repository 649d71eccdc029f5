"""The ``finetune`` family: stages whose output is model weights.

``finetune.diffusionclip`` tunes a pixel-space denoiser so that a text direction moves its
outputs (Kim, Kwon, Ye 2022; math in :mod:`editflow.stages.diffusionclip.finetuning`). Its ``weights``
are cached like any artifact (one fp32 array per parameter) and any sampler with a
``weights`` input runs them.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field

from editflow.errors import EditflowError, Problem
from editflow.lazy import lazy
from editflow.models import specs
from editflow.stages.base import ArtifactType, CheckView, Params, Port, StageContext, StageKind
from editflow.stages.diffusion import check_t0, is_unconditional, unet_noise_predictor
from editflow.stages.diffusionclip.finetuning import (
    ClipLoss,
    TextDirection,
    directional_clip_loss,
    finetune,
    image_features,
    text_direction,
)
from editflow.stages.fields import T0
from editflow.stages.grid_scheduler import GridScheduler, t0_grid

torch = lazy("torch")
diffusers = lazy("diffusers")


class FinetuneDiffusionclipParams(Params):
    source_text: str = Field(description="What the training images show ('photo', 'face')")
    target_text: str = Field(description="What the tuned model should make of them ('sketch')")
    epochs: int = Field(1, ge=1, le=100, description="Passes over the training images")
    mode: Literal["full", "light"] = Field(
        "full",
        description="full: gradients through the S_gen-step chain; light: loss on x0_hat at"
        " every step, optimiser step at once",
    )
    t0: T0 | None = None
    num_gen_steps: int = Field(6, ge=1, le=100, description="S_gen: DDIM steps from t0 to 0")
    learning_rate: float = Field(
        4e-6, gt=0.0, le=1.0, description="Adam's first-epoch rate (METHODS.md: 2e-6 to 8e-6)"
    )
    lr_growth: float = Field(1.3, gt=0.0, le=10.0, description="Learning-rate factor per epoch")
    w_clip: float = Field(3.0, ge=0.0, le=100.0, description="Weight of the directional CLIP loss")
    clip_loss: ClipLoss = Field(
        "direction",
        description="direction: 1 - cos (the paper); log: -log((1 + cos) / 2) (the released code)",
    )
    text_direction: TextDirection = Field(
        "template-means",
        description="template-means: each text's template mean, then the difference; released:"
        " the mean of the per-template differences (the released code)",
    )
    w_l1: float = Field(0.0, ge=0.0, le=100.0, description="Weight of the L1 to the input")
    w_id: float = Field(
        0.0, ge=0.0, le=100.0, description="Weight of a face-identity loss (needs a face model)"
    )
    checkpointing: bool = Field(
        True, description="full mode: recompute each step in the backward pass (bounded memory)"
    )


class FinetuneDiffusionclip(StageKind):
    """Fine-tune a pixel-space denoiser with the directional CLIP loss (DiffusionCLIP)."""

    kind = "finetune.diffusionclip"
    version = "3"  # 3: tiny-pixel runs on its own DDPM schedule (was tiny's SD one)
    description = "Tuned denoiser weights that move its outputs along a CLIP text direction"
    params = FinetuneDiffusionclipParams
    inputs = (
        Port("latents", ArtifactType.LATENT, "The training images x0 in [-1, 1]", many=True),
        Port(
            "inverted", ArtifactType.INVERTED_LATENT, "Their x_t0 (invert.ddim with t0)", many=True
        ),
    )
    outputs = (
        Port("weights", ArtifactType.WEIGHTS, "Every parameter of the tuned denoiser, fp32"),
        Port("losses", ArtifactType.SCORES, "The loss of every optimiser step"),
    )
    components = (specs.UNET, specs.SCHEDULER_CONFIG, specs.CLIP)
    inherits = {"inverted": {"t0": 400}}

    @classmethod
    def check(cls, params: FinetuneDiffusionclipParams, view: CheckView) -> list[Problem]:
        from editflow.models.providers import has_component

        problems: list[Problem] = []
        if params.w_id > 0:
            problems.append(
                Problem("needs a face-recognition model for the identity loss, which editflow"
                        " does not have: set w_id = 0", key="w_id")
            )  # fmt: skip
        images = view.references.get("latents") or []
        inverted = view.references.get("inverted") or []
        if len(images) != len(inverted):
            problems.append(
                Problem(f"has {len(inverted)} references but latents has {len(images)}:"
                        " one inversion per training image", key="inverted")
            )  # fmt: skip
        model = view.models.get("model.id")
        if model is not None and has_component(model, "vae"):
            problems.append(
                Problem(f"model '{model.spec.id}' denoises VAE latents; DiffusionCLIP"
                        " fine-tunes pixel-space models (such as 'tiny-pixel')")
            )  # fmt: skip
            return problems
        return problems + check_t0(params.t0, view.models)

    def run(
        self,
        ctx: StageContext,
        params: FinetuneDiffusionclipParams,
        *,
        latents: Sequence[torch.Tensor],
        inverted: Sequence[torch.Tensor],
    ) -> dict[str, Any]:
        models = ctx.models
        images = torch.cat([item.to(ctx.device, torch.float32) for item in latents])
        x_t0 = torch.cat([item.to(ctx.device, torch.float32) for item in inverted])
        if images.shape != x_t0.shape:
            raise EditflowError(
                f"inverted holds {tuple(x_t0.shape)} but latents {tuple(images.shape)}:"
                " one inversion per training image",
                key=f"stages.{ctx.name}.inverted",
            )
        original = models.get("unet")
        if not is_unconditional(original):
            raise EditflowError(
                "DiffusionCLIP fine-tunes pixel-space models", key=f"stages.{ctx.name}"
            )
        # The tuned copy trains in fp32 whatever the run's dtype; the loaded model is untouched.
        tuned = copy.deepcopy(getattr(original, "_orig_mod", original)).float()
        tuned.requires_grad_(True)
        clip = models.get("clip")
        # The loss is taken in fp32; a CLIP loaded in half precision is copied, not changed.
        scorer = clip.model if clip.model.dtype == torch.float32 else copy.deepcopy(clip.model)
        scorer = scorer.float()
        direction = text_direction(
            scorer, clip.processor, params.source_text, params.target_text, params.text_direction
        )
        with torch.no_grad():
            sources = image_features(scorer, clip.processor, images)

        def loss(x0: torch.Tensor, index: int) -> torch.Tensor:
            value = params.w_clip * directional_clip_loss(
                scorer, clip.processor, x0, sources[index : index + 1], direction, params.clip_loss
            )
            if params.w_l1 > 0:
                value = value + params.w_l1 * (x0 - images[index : index + 1]).abs().mean()
            return value

        ddim = diffusers.DDIMScheduler.from_config(models.scheduler_config)
        scheduler = GridScheduler.from_scheduler(ddim, t0_grid(params.t0, params.num_gen_steps))
        with torch.enable_grad():
            losses = finetune(
                unet_noise_predictor(tuned),
                list(tuned.parameters()),
                x_t0,
                scheduler,
                loss,
                epochs=params.epochs,
                learning_rate=params.learning_rate,
                lr_growth=params.lr_growth,
                mode=params.mode,
                checkpointing=params.checkpointing,
                progress=ctx.progress,
            )
        weights = {name: value.detach().float().cpu() for name, value in tuned.state_dict().items()}
        return {"weights": weights, "losses": losses}
