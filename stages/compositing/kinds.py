"""Cross-domain compositing stages (Hachnochi et al. 2023; METHODS.md §3).

- ``compose.paste``: paste an object (with its mask) into a background: the reference
  composite, the mask at the background's size, and the masked image an inpainting UNet is
  conditioned on.
- ``sample.local_ilvr``: DDIM sampling pulled towards the composite with local ILVR and
  RePaint (math in :mod:`.local_ilvr`), on a plain or an inpainting UNet.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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
from editflow.stages.compositing.local_ilvr import (
    LocalIlvr,
    LowPass,
    local_ilvr_sample,
    noise_to,
    repaint_schedule,
)
from editflow.stages.diffusion import (
    NoisePredictor,
    cpu_randn,
    encode_prompt_pair,
    unet_noise_predictor,
)
from editflow.stages.fields import Eta, GuidanceScale, NegativePrompt, Prompt, Steps
from editflow.stages.tuned import WEIGHTS_PORT, TunedParams, check_ratio, mixing_predictor

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
    blend_pix: int = Field(0, ge=0, le=64, description="Mask smoothing ramp, latent px (0 = hard)")
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
        Port("reference", ArtifactType.LATENT, "Latent of the composite (encode.vae)"),
        Port("mask", ArtifactType.MASK, "1 on the object (compose.paste's mask), image size"),
        Port(
            "masked_reference",
            ArtifactType.LATENT,
            "Latent of compose.paste's masked image (needed by an inpainting UNet)",
            optional=True,
        ),
        WEIGHTS_PORT,
    )
    outputs = (Port("latents", ArtifactType.LATENT, "Sampled latents x0", size_of="reference"),)
    seeded = True
    components = specs.DENOISER

    @classmethod
    def check(cls, params: LocalIlvrParams, view: CheckView) -> list[Problem]:
        problems = check_ratio(params.ratio, view.references.get("weights") or [])
        image, mask = view.sizes.get("reference"), view.sizes.get("mask")
        if image is not None and mask is not None and image != mask:
            message = f"mask is {mask[0]}x{mask[1]} but the reference is {image[0]}x{image[1]}"
            problems.append(Problem(message, key="mask"))
        latent = view.latent_size("reference")
        for name in ("n_in", "n_out"):
            factor = getattr(params, name)
            if latent is not None and (latent[0] % factor or latent[1] % factor):
                message = (
                    f"{name} = {factor} does not divide the latent size {latent[0]}x{latent[1]}"
                )
                problems.append(Problem(message, key=name))
        if params.preset == "background" and "masked_reference" not in view.references:
            message = "preset 'background' needs the latent of compose.paste's masked image"
            problems.append(Problem(message, key="masked_reference"))
        return problems + _repaint_problems(params) + _unet_problems(params, view)

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
        unet = models.get("unet")
        reference = reference.to(ctx.device, ctx.dtype)
        latent_size = tuple(reference.shape[-2:])
        latent_mask = F.interpolate(
            mask.to(ctx.device, ctx.dtype), size=latent_size, mode="nearest"
        )
        latent_mask = (latent_mask > 0.5).to(ctx.dtype).expand(len(reference), -1, -1, -1)
        wrap = _predictor(ctx, params, unet, latent_mask, masked_reference)
        predict = mixing_predictor(unet, weights or [], params.ratio, wrap)
        cond, uncond = encode_prompt_pair(
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


def inpainting_predictor(
    unet: Any, inpaint_mask: torch.Tensor, masked_latents: torch.Tensor
) -> NoisePredictor:
    """A 9-channel inpainting UNet as a noise predictor: ``[x_t, mask, masked latent]`` in,
    as Stable Diffusion's inpainting pipeline feeds it (mask 1 = region to generate)."""
    extra = torch.cat([inpaint_mask, masked_latents], dim=1)

    def predict(x_t: torch.Tensor, t: torch.Tensor | int, embeds: torch.Tensor) -> torch.Tensor:
        repeats = len(x_t) // len(extra)  # CFG doubles the batch
        model_input = torch.cat([x_t, extra.repeat(repeats, 1, 1, 1)], dim=1)
        return unet(model_input, t, encoder_hidden_states=embeds, return_dict=False)[0]

    return predict


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


def _unet_problems(params: LocalIlvrParams, view: CheckView) -> list[Problem]:
    """A plain (4 channels) or an inpainting (9) UNet; the latter needs the masked image."""
    unet = view.config("unet")
    channels = unet.get("in_channels") if unet is not None else None
    if channels == 4 and params.preset == "background":
        return [
            Problem("preset 'background' needs an inpainting UNet (9 input channels); this"
                    " model's UNet takes 4", key="preset",
                    hint="set model.id to an inpainting model such as 'tiny-inpaint'")
        ]  # fmt: skip
    if channels not in (None, 4, 9):
        return [Problem(f"needs a UNet with 4 or 9 input channels; this model's takes {channels}")]
    if channels == 9 and params.preset in ("immersion", "scribble"):
        return [
            Problem(f"preset '{params.preset}' guides a plain UNet; this model's is an inpainting"
                    " UNet (9 input channels), which would regenerate everything but the object",
                    key="preset", hint="use preset 'background', or a plain model")
        ]  # fmt: skip
    if channels == 9 and "masked_reference" not in view.references:
        return [
            Problem("an inpainting UNet needs the masked_reference input", key="masked_reference",
                    hint="connect the latent of compose.paste's masked image")
        ]  # fmt: skip
    return []


def _predictor(
    ctx: StageContext,
    params: LocalIlvrParams,
    unet: Any,
    latent_mask: torch.Tensor,
    masked_reference: torch.Tensor | None,
) -> Callable[[Any], NoisePredictor]:
    """How a model (the original, or one with tuned weights) becomes the noise predictor
    (:func:`_unet_problems` has checked the UNet against the preset and the inputs)."""
    if unet.config.in_channels == 4:
        return unet_noise_predictor
    masked = masked_reference.to(ctx.device, ctx.dtype).expand(len(latent_mask), -1, -1, -1)
    # The inpainting model generates where its mask is 1: everything but the object.
    return lambda model: inpainting_predictor(model, 1 - latent_mask, masked)
