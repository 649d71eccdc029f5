"""The ``finetune`` family: stages whose output is model weights.

``finetune.diffusionclip`` tunes a denoiser so that a text direction moves its outputs
(Kim, Kwon, Ye 2022; math in :mod:`editflow.stages.diffusionclip.finetuning`). Its
``weights`` are cached like any artifact (one fp32 array per parameter) and any sampler with
a ``weights`` input runs them.

The paper tunes pixel-space models; its latent variants and successors tune a
text-conditioned latent UNet the same way. On such a model (one with a VAE) the chain runs
on VAE latents with the UNet conditioned on ``prompt``, and each x0 estimate is decoded
through the VAE, with gradients, to the pixels both losses see: the CLIP loss needs images,
and the L1 to the input is then in the same [-1, 1] pixels as on a pixel model, so ``w_l1``
means the same on both (the input is the decoded input latent, so the VAE's own
reconstruction error is no part of it). Only the UNet is tuned; the VAE and text encoder
are frozen.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, Literal

from pydantic import Field

from editflow.errors import EditflowError, Problem
from editflow.lazy import lazy
from editflow.models import specs
from editflow.stages.base import ArtifactType, CheckView, Params, Port, StageContext, StageKind
from editflow.stages.diffusion import (
    check_t0,
    encode_prompts,
    is_unconditional,
    unet_noise_predictor,
)
from editflow.stages.diffusionclip.finetuning import (
    ClipLoss,
    TextDirection,
    directional_clip_loss,
    finetune,
    image_features,
    text_direction,
)
from editflow.stages.diffusionclip.templates import TEMPLATE_SETS, TemplateSet
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
    templates: TemplateSet = Field(
        "editflow-16",
        description="CLIP's ImageNet prompt templates the text features are averaged over:"
        " editflow-16 (16 of them) or imagenet-80 (all 80, as CLIP's notebook has them)",
    )
    prompt: str = Field(
        "",
        description="Latent models: the text the UNet is conditioned on while generating"
        " (the inversions' prompt; empty: the unconditional embedding)",
    )
    w_l1: float = Field(
        0.0, ge=0.0, le=100.0, description="Weight of the L1 to the input (in pixels)"
    )
    w_id: float = Field(
        0.0, ge=0.0, le=100.0, description="Weight of a face-identity loss (needs a face model)"
    )
    checkpointing: bool = Field(
        True,
        description="full mode: recompute each step in the backward pass (bounded memory);"
        " latent models: also each block of the VAE decoder",
    )


class FinetuneDiffusionclip(StageKind):
    """Fine-tune a pixel-space or latent denoiser with the directional CLIP loss
    (DiffusionCLIP)."""

    kind = "finetune.diffusionclip"
    version = "3"  # 3: tiny-pixel runs on its own DDPM schedule (was tiny's SD one)
    description = "Tuned denoiser weights that move its outputs along a CLIP text direction"
    params = FinetuneDiffusionclipParams
    inputs = (
        Port(
            "latents",
            ArtifactType.LATENT,
            "The training images x0: pixels in [-1, 1] (encode.pixels) or VAE latents (encode.vae)",
            many=True,
        ),
        Port(
            "inverted", ArtifactType.INVERTED_LATENT, "Their x_t0 (invert.ddim with t0)", many=True
        ),
    )
    outputs = (
        Port("weights", ArtifactType.WEIGHTS, "Every parameter of the tuned denoiser, fp32"),
        Port("losses", ArtifactType.SCORES, "The loss of every optimiser step"),
    )
    # A pixel model never loads the VAE and text encoder: parts load when first asked for.
    components = (*specs.DENOISER, specs.VAE, specs.CLIP)
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
            problems += _latent_model_problems(model.spec.id, view)
        elif model is not None and params.prompt:
            problems.append(
                Problem(f"model '{model.spec.id}' denoises pixels unconditionally and takes"
                        " no text: leave prompt empty", key="prompt")
            )  # fmt: skip
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
        sizes = sorted({tuple(item.shape[-2:]) for item in latents})
        if len(sizes) > 1:
            # The plan knows the size of a list's first image only, so this is found here.
            raise EditflowError(
                f"holds x0 of {len(sizes)} sizes (h, w) {sizes}: the training images are"
                " batched, so give every image the same size",
                key=f"stages.{ctx.name}.latents",
            )
        images = torch.cat([item.to(ctx.device, torch.float32) for item in latents])
        x_t0 = torch.cat([item.to(ctx.device, torch.float32) for item in inverted])
        if images.shape != x_t0.shape:
            raise EditflowError(
                f"inverted holds {tuple(x_t0.shape)} but latents {tuple(images.shape)}:"
                " one inversion per training image",
                key=f"stages.{ctx.name}.inverted",
            )
        original = models.get("unet")
        # The tuned copy trains in fp32 whatever the run's dtype; the loaded model is untouched.
        tuned = copy.deepcopy(getattr(original, "_orig_mod", original)).float()
        tuned.requires_grad_(True)
        clip = models.get("clip")
        # The loss is taken in fp32; a CLIP loaded in half precision is copied, not changed.
        scorer = clip.model if clip.model.dtype == torch.float32 else copy.deepcopy(clip.model)
        scorer = scorer.float()
        direction = text_direction(
            scorer,
            clip.processor,
            params.source_text,
            params.target_text,
            params.text_direction,
            TEMPLATE_SETS[params.templates],
        )
        to_pixels, embeds = _pixels_and_prompt(ctx, params, latent=not is_unconditional(original))
        with torch.no_grad():
            pixels = to_pixels(images)  # (N, 3, H, W) in [-1, 1]: what the losses compare with
            sources = image_features(scorer, clip.processor, pixels)

        def loss(x0: torch.Tensor, index: int) -> torch.Tensor:
            generated = to_pixels(x0)
            value = params.w_clip * directional_clip_loss(
                scorer,
                clip.processor,
                generated,
                sources[index : index + 1],
                direction,
                params.clip_loss,
            )
            if params.w_l1 > 0:
                value = value + params.w_l1 * (generated - pixels[index : index + 1]).abs().mean()
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
                embeds=embeds,
                progress=ctx.progress,
            )
        weights = {name: value.detach().float().cpu() for name, value in tuned.state_dict().items()}
        return {"weights": weights, "losses": losses}


def _pixels_and_prompt(
    ctx: StageContext, params: FinetuneDiffusionclipParams, *, latent: bool
) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor | None]:
    """How x0 estimates become the pixels the losses see, and the text embedding the UNet is
    generated with: the identity and ``None`` on a pixel model; on a latent one the VAE
    decoder (differentiable in the latents) and ``prompt``'s embedding, (1, tokens, D)."""
    if not latent:
        return (lambda x0: x0), None
    models = ctx.models
    embeds = encode_prompts(models.get("tokenizer"), models.get("text_encoder"), [params.prompt])
    # A private fp32 copy: the loss is taken in fp32, and turning on the decoder's block
    # checkpointing must not change the VAE other stages share. Its weights stay frozen.
    vae = copy.deepcopy(models.get("vae")).float().requires_grad_(False)
    if params.checkpointing:
        # The backward pass through the decoder needs its activations: SD's VAE in fp32 at
        # 256 px grew a CPU process by 1.7 GB with all of them kept, 1.1 GB when each block
        # is recomputed (the same gradient; 40% slower), about 4x that at 512 px.
        vae.enable_gradient_checkpointing()
    scale = vae.config.scaling_factor

    def decode(latents: torch.Tensor) -> torch.Tensor:
        # (N, C, h, w) latents -> (N, 3, h * f, w * f) pixels in about [-1, 1]; unclamped, so
        # the gradient reaches pixels outside the range as it does on a pixel model.
        return vae.decode(latents / scale, return_dict=False)[0]

    return decode, embeds.to(ctx.device, torch.float32)


def _latent_model_problems(model: str, view: CheckView) -> list[Problem]:
    """What a latent model's UNet must be for the chain: text-conditioned, denoising the
    VAE's latents alone (from the configs; none where they are not known yet)."""
    unet, vae = view.config("unet"), view.config("vae")
    if unet is None or vae is None:
        return []
    if "cross_attention_dim" not in unet:
        return [Problem(f"model '{model}' has a VAE but its UNet takes no text: DiffusionCLIP"
                        " tunes pixel-space models and text-conditioned latent ones")]  # fmt: skip
    channels, latent_channels = unet.get("in_channels"), vae.get("latent_channels")
    if channels != latent_channels:
        return [Problem(f"model '{model}' has a UNet of {channels} input channels for"
                        f" {latent_channels}-channel latents (an inpainting model):"
                        " DiffusionCLIP tunes a UNet that denoises the latents alone")]  # fmt: skip
    return []
