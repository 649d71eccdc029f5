"""Cross-domain compositing stages (Hachnochi et al. 2023; METHODS.md §3).

- ``compose.paste``: paste an object (with its mask) into a background: the reference
  composite, the mask at the background's size, and the masked image an inpainting UNet is
  conditioned on.
- ``sample.local_ilvr``: DDIM sampling pulled towards the composite with local ILVR and
  RePaint (math in :mod:`.local_ilvr`), on a plain, an inpainting or an unconditional
  pixel-space UNet (:mod:`.denoisers`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

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
from editflow.stages.compositing.denoisers import (
    AfterWindow,
    denoised_size,
    model_problems,
    noise_predictors,
)
from editflow.stages.compositing.local_ilvr import (
    LocalIlvr,
    LowPass,
    local_ilvr_sample,
    noise_to,
    repaint_schedule,
)
from editflow.stages.conditioning import text_problems
from editflow.stages.diffusion import cpu_randn, prompt_pair
from editflow.stages.fields import Eta, GuidanceScale, NegativePrompt, Prompt, Steps
from editflow.stages.tuned import WEIGHTS_PORT, TunedParams, check_ratio

torch = lazy("torch")
F = lazy("torch.nn.functional")
diffusers = lazy("diffusers")

# ------------------------------------------------------------------------------------------
# compose.paste


def paste(
    background: torch.Tensor,
    obj: torch.Tensor,
    obj_mask: torch.Tensor,
    position: tuple[int, int],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste a masked object into a background.

    Args:
        background: (N, 3, H, W) in [0, 1].
        obj: (N, 3, h, w) in [0, 1].
        obj_mask: (N, 1, h, w) in [0, 1], 1 on the object.
        position: (top, left) of the scaled object in the background, in pixels.
        scale: Resize factor of the object and its mask.

    Returns:
        The composite (N, 3, H, W) and the mask at the background's size (N, 1, H, W), hard.
    """
    height, width = round(obj.shape[-2] * scale), round(obj.shape[-1] * scale)
    obj = F.interpolate(obj, size=(height, width), mode="bilinear", antialias=True)
    obj_mask = F.interpolate(obj_mask, size=(height, width), mode="bilinear", antialias=True)
    obj_mask = (obj_mask > 0.5).to(background.dtype)
    top, left = position
    composite, mask = background.clone(), torch.zeros_like(background[:, :1])
    window = (..., slice(top, top + height), slice(left, left + width))
    composite[window] = obj_mask * obj + (1 - obj_mask) * composite[window]
    mask[window] = obj_mask
    return composite, mask


class PasteParams(Params):
    position: tuple[int, int] = Field((0, 0), description="[top, left] of the object, in pixels")
    scale: float = Field(1.0, gt=0.0, le=16.0, description="Resize factor of the object")


class ComposePaste(StageKind):
    kind = "compose.paste"
    version = "1"
    description = "Paste an object into a background: the reference composite and its mask"
    params = PasteParams
    inputs = (
        Port("background", ArtifactType.IMAGE, "The background image, (1, 3, H, W)"),
        Port("object", ArtifactType.IMAGE, "The object image, (1, 3, h, w)"),
        Port("object_mask", ArtifactType.MASK, "The object's mask (white = object), (1, 1, h, w)"),
    )
    outputs = (
        Port("composite", ArtifactType.IMAGE, "Object on background", size_of="background"),
        Port("mask", ArtifactType.MASK, "1 on the object, background size", size_of="background"),
        Port(
            "masked",
            ArtifactType.IMAGE,
            "The composite with everything but the object grey (an inpainting UNet's input)",
            size_of="background",
        ),
        Port(
            "mask_image", ArtifactType.IMAGE, "The mask as an image (figures)", size_of="background"
        ),
    )

    @classmethod
    def check(cls, params: PasteParams, view: CheckView) -> list[Problem]:
        background, obj, mask = (
            view.sizes.get(name) for name in ("background", "object", "object_mask")
        )
        if obj is not None and mask is not None and obj != mask:
            message = f"object_mask is {mask[0]}x{mask[1]} but object is {obj[0]}x{obj[1]}"
            return [Problem(message, key="object_mask")]
        if obj is None or background is None:
            return []
        height, width = round(obj[0] * params.scale), round(obj[1] * params.scale)
        top, left = params.position
        if top < 0 or left < 0 or top + height > background[0] or left + width > background[1]:
            return [
                Problem(
                    f"the object ({height}x{width} after scale) at [{top}, {left}] falls outside"
                    f" the background ({background[0]}x{background[1]})",
                    key="position",
                )
            ]
        return []

    def run(
        self,
        ctx: StageContext,
        params: PasteParams,
        *,
        background: torch.Tensor,
        object: torch.Tensor,  # noqa: A002 (the port's name)
        object_mask: torch.Tensor,
    ) -> dict[str, Any]:
        composite, mask = paste(background, object, object_mask, params.position, params.scale)
        return {
            "composite": composite,
            "mask": mask,
            "masked": torch.where(mask > 0.5, composite, torch.full_like(composite, 0.5)),
            "mask_image": mask.expand(-1, 3, -1, -1).contiguous(),
        }


# ------------------------------------------------------------------------------------------
# sample.local_ilvr

# METHODS.md §3's settings; explicit parameters override them.
PRESETS: Mapping[str, Mapping[str, Any]] = {
    "scribble": {"t_out": 1.0, "t_in": 0.4, "n_in": 2, "n_out": 1},
    "immersion": {"t_in": 0.5, "t_out": 1.0, "n_in": 2, "n_out": 1, "repaint_start": 0.2},
    "background": {"t_in": 0.0, "t_out": 0.5, "n_in": 1, "n_out": 1},
}


class LocalIlvrParams(TunedParams):
    prompt: Prompt = ""
    negative_prompt: NegativePrompt = ""
    guidance_scale: GuidanceScale = 5.0
    num_inference_steps: Steps = 50
    eta: Eta = 0.0
    strength: float = Field(
        1.0, gt=0.0, le=1.0, description="1 = start from noise; < 1 = from the noised reference"
    )
    n_in: int = Field(1, ge=1, le=64, description="Low-pass factor inside the mask (1 = none)")
    n_out: int = Field(1, ge=1, le=64, description="Low-pass factor outside the mask (1 = none)")
    t_in: float = Field(0.0, ge=0.0, le=1.0, description="Fraction of transitions guided inside")
    t_out: float = Field(1.0, ge=0.0, le=1.0, description="Fraction of transitions guided outside")
    space: Literal["xt", "x0"] = Field("xt", description="Compare with x_t, or with x0_hat")
    blend_pix: int = Field(
        0, ge=0, le=64, description="Mask smoothing ramp in the denoiser's pixels (0 = hard)"
    )
    lowpass: LowPass = Field(
        "area-bicubic",
        description="Low-pass resampling, down then up: area-bicubic (editflow), bilinear (the"
        " paper), antialiased-cubic (the released code)",
    )
    repaint_start: float = Field(
        0.0, ge=0.0, le=1.0, description="Fraction of the schedule, from its end, with RePaint"
    )
    repaint_jump: int = Field(10, ge=1, le=100, description="RePaint jump length, in steps")
    repaint_resamples: int = Field(10, ge=1, le=100, description="RePaint passes per jump")
    inpaint_after_window: AfterWindow = Field(
        "keep",
        description="An inpainting UNet's conditioning once both windows close: keep ([1 - M,"
        " masked latent] to the end) or generate (mask 1, masked latent 0: the released code)",
    )
    preset: Literal["scribble", "immersion", "background"] | None = Field(
        None, description="METHODS.md settings to start from (explicit parameters override)"
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if (
            isinstance(data, dict)
            and isinstance(data.get("preset"), str)
            and data["preset"] in PRESETS
        ):
            return {**PRESETS[data["preset"]], **data}
        return data


class SampleLocalIlvr(StageKind):
    """Cross-domain compositing: sample towards a composite with local ILVR guidance."""

    kind = "sample.local_ilvr"
    drives_inpainting = True  # it builds [1 - M, masked latent] for a 9-channel UNet
    version = "2"  # 2: RePaint jumps counted from the clean end, as RePaint's schedule
    description = "DDIM sampling guided towards a reference composite inside and outside a mask"
    params = LocalIlvrParams
    inputs = (
        Port(
            "reference",
            ArtifactType.LATENT,
            "Latent of the composite (encode.vae; encode.pixels on a pixel-space model)",
        ),
        Port("mask", ArtifactType.MASK, "1 on the object (compose.paste's mask), image size"),
        Port(
            "masked_reference",
            ArtifactType.LATENT,
            "Latent of compose.paste's masked image (needed by an inpainting UNet)",
            optional=True,
        ),
        WEIGHTS_PORT,
    )
    outputs = (
        Port(
            "latents",
            ArtifactType.LATENT,
            "Sampled latents x0 (the image in [-1, 1] on a pixel-space model)",
            size_of="reference",
        ),
    )
    seeded = True
    components = specs.DENOISER

    @classmethod
    def check(cls, params: LocalIlvrParams, view: CheckView) -> list[Problem]:
        problems = check_ratio(params.ratio, view.references.get("weights") or [])
        image, mask = view.sizes.get("reference"), view.sizes.get("mask")
        if image is not None and mask is not None and image != mask:
            message = f"mask is {mask[0]}x{mask[1]} but the reference is {image[0]}x{image[1]}"
            problems.append(Problem(message, key="mask"))
        size, what = denoised_size(view, "reference")
        for name in ("n_in", "n_out"):
            factor = getattr(params, name)
            if size is not None and (size[0] % factor or size[1] % factor):
                message = f"{name} = {factor} does not divide the {what} {size[0]}x{size[1]}"
                problems.append(Problem(message, key=name))
        # A prompt on a model without a text encoder is refused, as by sample.ddim.
        prompts = {"prompt": params.prompt, "negative_prompt": params.negative_prompt}
        return (
            problems
            + _repaint_problems(params)
            + model_problems(params, view)
            + text_problems(view, prompts, ports=())
        )

    def run(
        self,
        ctx: StageContext,
        params: LocalIlvrParams,
        *,
        reference: torch.Tensor,
        mask: torch.Tensor,
        masked_reference: torch.Tensor | None,
        weights: Sequence[Mapping[str, torch.Tensor]] | None,
    ) -> dict[str, Any]:
        models = ctx.models
        reference = reference.to(ctx.device, ctx.dtype)
        latent_size = tuple(reference.shape[-2:])
        latent_mask = F.interpolate(
            mask.to(ctx.device, ctx.dtype), size=latent_size, mode="nearest"
        )
        latent_mask = (latent_mask > 0.5).to(ctx.dtype).expand(len(reference), -1, -1, -1)
        predict, predict_after_window = noise_predictors(
            ctx, params.inpaint_after_window, params.ratio, latent_mask, masked_reference,
            weights or [],
        )  # fmt: skip
        # (None, None) on an unconditional model, whose check refused any prompt.
        cond, uncond = prompt_pair(
            models, params.prompt, params.negative_prompt, len(reference),
            guided=params.guidance_scale != 1.0,
        )  # fmt: skip
        scheduler = diffusers.DDIMScheduler.from_config(models.scheduler_config)
        # Timesteps stay on the CPU: the loop reads them as numbers without waiting for the
        # device, and the UNet moves each one to the latent's device itself.
        scheduler.set_timesteps(params.num_inference_steps)
        generator = ctx.generator()
        start = params.num_inference_steps - int(params.num_inference_steps * params.strength)
        if start == 0:
            x = cpu_randn(reference.shape, generator).to(ctx.device, ctx.dtype)
            x = x * scheduler.init_noise_sigma
        else:
            level = scheduler.alphas_cumprod[int(scheduler.timesteps[start])]
            x = noise_to(reference, level.to(ctx.device, ctx.dtype), generator)
        guided = params.t_in > 0 or params.t_out > 0
        guidance = LocalIlvr(
            reference, latent_mask, params.n_in, params.n_out, params.t_in, params.t_out,
            params.space, params.blend_pix, params.lowpass,
        ) if guided else None  # fmt: skip
        latents = local_ilvr_sample(
            predict,
            x,
            scheduler,
            cond,
            uncond,
            guidance=guidance,
            predict_after_window=predict_after_window,
            guidance_scale=params.guidance_scale,
            eta=params.eta,
            start=start,
            repaint_start=params.repaint_start,
            repaint_jump=params.repaint_jump,
            repaint_resamples=params.repaint_resamples,
            generator=generator,
            callback=step_reporter(ctx.progress, params.num_inference_steps - start),
        )
        return {"latents": latents}


def _repaint_problems(params: LocalIlvrParams) -> list[Problem]:
    """RePaint asked for (``repaint_start``, a preset) but with no level to jump from."""
    if params.repaint_start <= 0 or params.repaint_resamples <= 1:
        return []
    steps = params.num_inference_steps
    plain = repaint_schedule(steps, 0.0, params.repaint_jump, params.repaint_resamples)
    if repaint_schedule(steps, params.repaint_start, params.repaint_jump,
                        params.repaint_resamples) != plain:  # fmt: skip
        return []
    return [
        Problem(f"is {params.repaint_start} but the last {params.repaint_start:.0%} of"
                f" {steps} steps hold no multiple of repaint_jump = {params.repaint_jump}:"
                " RePaint would never resample", key="repaint_start",
                hint="use more steps or a shorter repaint_jump")
    ]  # fmt: skip
