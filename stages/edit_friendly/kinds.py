"""Edit-friendly DDPM inversion and its edit as stage kinds (Huberman-Spiegelglas et al.
2024): ``invert.edit_friendly`` and ``sample.edit_friendly``; the math is
:mod:`editflow.stages.edit_friendly.inversion`. The edit's text may come from other stages
(embeddings, a direction: :mod:`editflow.stages.conditioning`); a pixel model takes none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any

from pydantic import Field, model_validator

from editflow.errors import EditflowError, Problem
from editflow.lazy import lazy
from editflow.models import specs
from editflow.stages.base import (
    ArtifactType,
    CheckView,
    Params,
    Port,
    StageContext,
    StageKind,
    StepSequence,
    StepSequenceWriter,
    StepsOn,
    step_reporter,
)
from editflow.stages.conditioning import text_conditioning, text_problems
from editflow.stages.diffusion import (
    Callback,
    StepInfo,
    is_unconditional,
    prompt_pair,
    vae_encode,
)
from editflow.stages.edit_friendly.inversion import (
    ColourGuidance,
    EditFriendlyInversion,
    edit_friendly_invert,
    edit_friendly_sample,
)
from editflow.stages.edit_friendly.reverse_steps import SchedulerName, build_scheduler, check_eta
from editflow.stages.fields import Eta, Steps
from editflow.stages.tuned import WEIGHTS_PORT, TunedParams, check_ratio, mixing_predictor

torch = lazy("torch")
F = lazy("torch.nn.functional")
diffusers = lazy("diffusers")


# The reverse step's settings, which inversion and edit share.
NoisyEta = Annotated[
    Eta,
    Field(
        gt=0.0, description="DDIM eta, > 0 for noise maps to exist (1 = DDPM; 1 for dpmsolver++)"
    ),
]
ReverseStep = Annotated[
    SchedulerName,
    Field(description="Reverse step: DDIM(eta) or sde-dpmsolver++ order 2 (LEDITS++)"),
]


class InvertEditFriendlyParams(Params):
    source_prompt: str = Field(
        "", description="Prompt describing the input image; empty means no CFG"
    )
    cfg_src: float = Field(
        3.5, ge=1.0, le=30.0, description="CFG scale on the source prompt during inversion"
    )
    num_inference_steps: Steps = 100
    eta: NoisyEta = 1.0
    scheduler: ReverseStep = "ddim"

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
    inputs = (
        Port("latents", ArtifactType.LATENT, "Clean latents x0 (VAE-encoded image, or pixels)"),
        Port(
            "weights",
            ArtifactType.WEIGHTS,
            "Tuned weights to invert with (one finetune.diffusionclip output), so an edit"
            " with the same weights retraces them",
            optional=True,
            many=True,
        ),
    )
    outputs = (
        Port(
            "x_T",
            ArtifactType.STOCHASTIC_LATENT,
            "The noisiest level of the auxiliary path",
            size_of="latents",
        ),
        Port(
            "noise_maps",
            ArtifactType.NOISE_SEQUENCE,
            "(T, N, C, h, w) noise maps, noisiest first",
            size_of="latents",
        ),
        Port(
            "auxiliary_path",
            ArtifactType.LATENT_TRAJECTORY,
            "(T + 1, N, C, h, w) latents per level, x_T first and x0 last",
            size_of="latents",
        ),
        Port(
            "prompt_embeds",
            ArtifactType.EMBEDDING,
            "Source-prompt embeddings used ((N, 0, 0) on a model without text)",
        ),
    )
    seeded = True
    components = specs.DENOISER

    @classmethod
    def check(cls, params: InvertEditFriendlyParams, view: CheckView) -> list[Problem]:
        problems = text_problems(view, {"source_prompt": params.source_prompt}, ports=())
        weights = view.references.get("weights") or []
        if len(weights) > 1:
            message = f"has {len(weights)} references, but the inversion runs one tuned model"
            hint = "give one; sample.edit_friendly mixes several by its ratio"
            problems.append(Problem(message, key="weights", hint=hint))
        return problems

    def run(
        self,
        ctx: StageContext,
        params: InvertEditFriendlyParams,
        *,
        latents: torch.Tensor,
        weights: Sequence[Mapping[str, torch.Tensor]] | None,
    ) -> dict[str, Any]:
        models = ctx.models
        x0 = latents.to(ctx.device, ctx.dtype)
        # An empty source prompt means no CFG; a model without text gets (None, None).
        cond, uncond = prompt_pair(
            models, params.source_prompt, "", len(x0), guided=bool(params.source_prompt)
        )
        # Timesteps stay on the CPU: the loop reads them as numbers without waiting for the
        # device, and the UNet moves each one to the latent's device itself.
        scheduler = build_scheduler(
            params.scheduler, models.scheduler_config, params.num_inference_steps
        )
        noise_maps = ctx.write_steps("noise_maps", params.num_inference_steps)
        path = ctx.write_steps("auxiliary_path", params.num_inference_steps + 1)
        inversion = edit_friendly_invert(
            # Tuned weights run alone (ratio 1): without them this is the model's own predictor.
            mixing_predictor(models.get("unet"), weights or [], 1.0),
            x0,
            scheduler,
            cond,
            uncond,
            guidance_scale=params.cfg_src,
            eta=params.eta,
            generator=ctx.generator(),
            callback=_writing(
                noise_maps, path, step_reporter(ctx.progress, params.num_inference_steps)
            ),
        )
        return {
            "x_T": inversion.x_T,
            "noise_maps": noise_maps.result(),
            "auxiliary_path": path.result(),
            "prompt_embeds": cond if cond is not None else torch.zeros(len(x0), 0, 0),
        }


def _writing(
    noise_maps: StepSequenceWriter, path: StepSequenceWriter, report: Callback
) -> Callback:
    """``report``, after writing each noise map and level of the auxiliary path as soon as
    it is final (another worker may be following them)."""

    def write(info: StepInfo) -> None:
        if info["i"] == 0:
            path.write(0, info["x_in"])
        noise_maps.write(info["i"], info["z"])
        path.write(info["i"] + 1, info["x"])
        report(info)

    return write


class SampleEditFriendlyParams(TunedParams):
    target_prompt: str = Field(
        "",
        description="Prompt describing the edited image; empty (and no prompt_embeds or"
        " direction) means no CFG",
    )
    cfg_tar: float = Field(15.0, ge=1.0, le=30.0, description="CFG scale on the target prompt")
    skip: int = Field(
        36, ge=0, le=999, description="Steps skipped: the edit starts at level T - skip"
    )
    num_inference_steps: Steps | None = None
    eta: NoisyEta | None = None
    scheduler: ReverseStep | None = None
    shift: tuple[int, int] = Field(
        (0, 0), description="(dy, dx) latent pixels to roll the start and every noise map by"
    )
    colour_strength: float = Field(
        0.0, ge=0.0, le=10.0, description="Colour manipulation strength s (0 = off)"
    )
    colour_window: tuple[int, int] | None = Field(
        None,
        description="(start, end) edit steps with colour, counted from the first edit step,"
        " inclusive; leave out for every edit step",
    )

    @model_validator(mode="after")
    def _check(self) -> SampleEditFriendlyParams:
        # Inherited values may still be None here; the rules apply once they are known.
        if self.scheduler is not None and self.eta is not None:
            check_eta(self.scheduler, self.eta)
        steps = self.num_inference_steps
        if steps is not None and self.skip >= steps:
            raise ValueError("skip must be < num_inference_steps")
        if self.colour_window is not None:
            start, end = self.colour_window
            if start < 0:
                raise ValueError("colour_window start must be >= 0")
            if start > end:
                raise ValueError("colour_window start must be <= end")
            if steps is not None and end >= steps - self.skip:
                raise ValueError(
                    "colour_window end must be < num_inference_steps - skip"
                    " (the number of edit steps)"
                )
        return self


class SampleEditFriendly(StageKind):
    """Edit with edit-friendly noise maps: target prompt, skip, shift, colour."""

    kind = "sample.edit_friendly"
    version = "1"
    description = "Reverse diffusion driven by stored edit-friendly noise maps (the edit)"
    params = SampleEditFriendlyParams
    inputs = (
        Port("noise_maps", ArtifactType.NOISE_SEQUENCE, "Noise maps from invert.edit_friendly"),
        Port(
            "auxiliary_path",
            ArtifactType.LATENT_TRAJECTORY,
            "Auxiliary path from the same invert.edit_friendly stage",
        ),
        Port(
            "colour_mask",
            ArtifactType.MASK,
            "Where to apply the colour (image resolution)",
            optional=True,
        ),
        Port(
            "colour_image",
            ArtifactType.IMAGE,
            "Colour image M (image resolution)",
            optional=True,
        ),
        Port(
            "prompt_embeds",
            ArtifactType.EMBEDDING,
            "(1 or N, tokens, D) target embeddings; replaces `target_prompt`",
            optional=True,
        ),
        Port(
            "direction",
            ArtifactType.DIRECTION,
            "Edit direction added to the target embedding (direction.pix2pix_zero), as in LEDITS",
            optional=True,
        ),
        WEIGHTS_PORT,
    )
    outputs = (Port("latents", ArtifactType.LATENT, "Edited clean latents", size_of="noise_maps"),)
    # The vae is loaded only when colour inputs are given.
    components = (*specs.DENOISER, specs.VAE)
    # The inversion's settings (METHODS.md defaults when the maps come from elsewhere).
    inherits = {"noise_maps": {"num_inference_steps": 100, "eta": 1.0, "scheduler": "ddim"}}

    @classmethod
    def check(cls, params: SampleEditFriendlyParams, view: CheckView) -> list[Problem]:
        mask, image = "colour_mask" in view.references, "colour_image" in view.references
        if mask != image:
            missing = "colour_image" if not image else "colour_mask"
            return [Problem(f"colour_mask and colour_image go together: {missing} is missing")]
        problems = check_ratio(params.ratio, view.references.get("weights") or [])
        problems += text_problems(view, {"target_prompt": params.target_prompt},
                                  replaced="target_prompt")  # fmt: skip
        maps, path = view.references.get("noise_maps"), view.references.get("auxiliary_path")
        if isinstance(maps, str) and isinstance(path, str) and "." in maps and "." in path:
            maps, path = maps.split(".")[0], path.split(".")[0]
            if maps != path:
                problems.append(Problem(f"comes from {path!r} but noise_maps from {maps!r}: the"
                                        " edit retraces one inversion", key="auxiliary_path",
                                        hint="connect both to the same invert.edit_friendly stage"))  # fmt: skip
        if params.colour_strength > 0 and not mask:
            problems.append(
                Problem("colour_strength > 0 needs the colour_mask and colour_image inputs")
            )
        edited = view.sizes.get("noise_maps")
        for name in ("colour_mask", "colour_image"):
            size = view.sizes.get(name)
            if edited is not None and size is not None and size != edited:
                message = (
                    f"{name} is {size[0]}x{size[1]} but the edited image is"
                    f" {edited[0]}x{edited[1]}: give it the image's size with inputs.NAME.size"
                )
                problems.append(Problem(message, key=name))
        return problems

    def run(
        self,
        ctx: StageContext,
        params: SampleEditFriendlyParams,
        *,
        noise_maps: StepSequence,
        auxiliary_path: StepSequence,
        colour_mask: torch.Tensor | None,
        colour_image: torch.Tensor | None,
        prompt_embeds: torch.Tensor | None,
        direction: torch.Tensor | None,
        weights: Sequence[Mapping[str, torch.Tensor]] | None,
    ) -> dict[str, Any]:
        models = ctx.models
        # Read a step at a time: on Ray the inversion may still be writing them.
        noise_maps = StepsOn(noise_maps, ctx.device, ctx.dtype)
        path = StepsOn(auxiliary_path, ctx.device, ctx.dtype)
        num_steps = len(noise_maps)
        hint = "use the num_inference_steps, eta and scheduler of the inversion stage"
        if num_steps != params.num_inference_steps:
            raise EditflowError(
                f"noise_maps has {num_steps} steps but num_inference_steps is"
                f" {params.num_inference_steps}",
                key=f"stages.{ctx.name}.num_inference_steps",
                hint=hint,
            )
        if len(path) != num_steps + 1:
            raise EditflowError(
                f"auxiliary_path has {len(path)} levels, expected {num_steps + 1}",
                key=f"stages.{ctx.name}.auxiliary_path",
                hint="connect noise_maps and auxiliary_path of the same inversion stage",
            )
        # Timesteps stay on the CPU (see invert.edit_friendly).
        scheduler = build_scheduler(params.scheduler, models.scheduler_config, num_steps)
        x_T = path[0]
        inversion = EditFriendlyInversion(x_T, noise_maps, path, scheduler.timesteps)
        # CFG (on cfg_tar, against the empty prompt) unless the target is the plain empty
        # prompt: embeddings or a direction are a target even when the prompt is empty.
        guided = bool(params.target_prompt) or prompt_embeds is not None or direction is not None
        cond, uncond = text_conditioning(
            models, params.target_prompt, "", len(x_T), guided=guided,
            prompt_embeds=prompt_embeds, direction=direction, stage=ctx.name,
            device=ctx.device, dtype=ctx.dtype,
        )  # fmt: skip
        colour = _colour_guidance(ctx, params, colour_mask, colour_image, x_T.shape[-2:])
        latents = edit_friendly_sample(
            mixing_predictor(models.get("unet"), weights or [], params.ratio),
            inversion,
            scheduler,
            cond,
            uncond,
            guidance_scale=params.cfg_tar,
            skip=params.skip,
            eta=params.eta,
            shift=params.shift,
            colour=colour,
            callback=step_reporter(ctx.progress, num_steps - params.skip, first=params.skip),
        )
        return {"latents": latents}


def _colour_guidance(
    ctx: StageContext,
    params: SampleEditFriendlyParams,
    mask: torch.Tensor | None,
    image: torch.Tensor | None,
    latent_size: tuple[int, int],
) -> ColourGuidance | None:
    # check() has made sure both inputs come together, at the edited image's size.
    if mask is None or image is None or params.colour_strength == 0:
        return None
    if is_unconditional(ctx.models.get("unet")):
        # A pixel-space model: M in the model's space is the image in [-1, 1] (encode.pixels).
        colour_latent = image.to(ctx.device, ctx.dtype) * 2 - 1
    else:
        colour_latent = vae_encode(ctx.models.get("vae"), image).to(ctx.device, ctx.dtype)
    mask = mask.to(ctx.device, ctx.dtype)
    latent_mask = F.interpolate(mask, size=tuple(latent_size), mode="area")
    return ColourGuidance(latent_mask, colour_latent, params.colour_strength, params.colour_window)
