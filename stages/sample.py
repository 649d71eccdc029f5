"""The ``sample`` family: from a start latent (or stored noise) to clean latents.

- ``sample.ddim``: DDIM with classifier-free guidance (math in :mod:`editflow.stages.ddim`).
- ``sample.edit_friendly``: the edit-friendly DDPM edit driven by stored noise maps
  (Huberman-Spiegelglas et al. 2024; math in :mod:`editflow.stages.edit_friendly`).
- ``sample.pix2pix_zero`` (:mod:`editflow.stages.sample_pix2pix_zero`), ``sample.interpolate``
  and ``sample.unseen_domain`` live in modules of their own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import Field, model_validator

from editflow.errors import EditflowError
from editflow.lazy import lazy
from editflow.models import specs
from editflow.stages.base import (
    ArtifactType,
    Port,
    StageContext,
    StageKind,
    step_reporter,
)
from editflow.stages.ddim import ddim_sample
from editflow.stages.diffusion import (
    check_t0,
    encode_prompt_pair,
    prompt_pair,
    vae_encode,
)
from editflow.stages.diffusionclip import grid_sample, t0_grid
from editflow.stages.edit_friendly import (
    ColourGuidance,
    EditFriendlyInversion,
    Steps,
    StepsOn,
    edit_friendly_sample,
)
from editflow.stages.reverse_steps import SchedulerName, build_scheduler, check_eta
from editflow.stages.tuned import WEIGHTS_PORT, TunedParams, check_ratio, mixing_predictor

torch = lazy("torch")
F = lazy("torch.nn.functional")
diffusers = lazy("diffusers")


class SampleDdimParams(TunedParams):
    prompt: str = Field("", description="Target prompt")
    negative_prompt: str = Field("", description="Negative prompt for CFG")
    num_inference_steps: int = Field(50, ge=1, le=999, description="DDIM steps")
    guidance_scale: float = Field(7.5, ge=1.0, le=30.0, description="CFG scale (1 = no CFG)")
    eta: float = Field(0.0, ge=0.0, le=1.0, description="DDIM eta (0 = deterministic)")
    t0: int | None = Field(
        None,
        ge=1,
        le=999,
        description="Start from this timestep, on the grid linspace(0, 1, n) * t0 with n ="
        " num_inference_steps (DiffusionCLIP's S_test); default: the whole schedule, or the"
        " t0 of the inversion that made the latents",
    )


class SampleDdim(StageKind):
    kind = "sample.ddim"
    version = "1"
    description = "DDIM sampling with CFG from x_T (e.g. inverted latents) to x0"
    params = SampleDdimParams
    inputs = (
        Port("latents", ArtifactType.LATENT, "Starting latents x_T"),
        WEIGHTS_PORT,
    )
    outputs = (Port("latents", ArtifactType.LATENT, "Sampled latents x0", size_of="latents"),)
    components = specs.DENOISER
    inherits = {"latents": {"t0": None}}

    @classmethod
    def is_seeded(cls, params: SampleDdimParams) -> bool:
        return params.eta > 0

    @classmethod
    def check(
        cls, params: SampleDdimParams, references: Mapping[str, Any], sizes: Mapping[str, Any]
    ) -> list[tuple[str | None, str]]:
        return check_ratio(params.ratio, references.get("weights") or [])

    @classmethod
    def check_models(
        cls, params: SampleDdimParams, models: Mapping[str, Any]
    ) -> list[tuple[str | None, str]]:
        return check_t0(params.t0, models)

    def run(
        self,
        ctx: StageContext,
        params: SampleDdimParams,
        *,
        latents: torch.Tensor,
        weights: Sequence[Mapping[str, torch.Tensor]] | None,
    ) -> dict[str, Any]:
        models = ctx.models
        x_T = latents.to(ctx.device, ctx.dtype)
        cond, uncond = prompt_pair(
            models,
            params.prompt,
            params.negative_prompt,
            batch=len(x_T),
            guided=params.guidance_scale != 1.0,
        )
        scheduler = diffusers.DDIMScheduler.from_config(models.scheduler_config)
        predict = mixing_predictor(models.get("unet"), weights or [], params.ratio)
        if params.t0 is not None:
            sampled = grid_sample(
                predict,
                x_T,
                scheduler.alphas_cumprod,
                t0_grid(params.t0, params.num_inference_steps),
                cond,
                uncond,
                guidance_scale=params.guidance_scale,
                eta=params.eta,
                generator=ctx.generator() if params.eta > 0 else None,
                callback=step_reporter(ctx.progress, params.num_inference_steps),
            )
            return {"latents": sampled}
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


class SampleEditFriendlyParams(TunedParams):
    target_prompt: str = Field(
        "", description="Prompt describing the edited image; empty means no CFG"
    )
    cfg_tar: float = Field(15.0, ge=1.0, le=30.0, description="CFG scale on the target prompt")
    skip: int = Field(
        36, ge=0, le=999, description="Steps skipped: the edit starts at level T - skip"
    )
    num_inference_steps: int | None = Field(
        None, ge=1, le=999, description="Reverse steps T (default: the inversion's; must match it)"
    )
    eta: float | None = Field(
        None, gt=0.0, le=1.0, description="DDIM eta (default: the inversion's; must match it)"
    )
    scheduler: SchedulerName | None = Field(
        None, description="Reverse step (default: the inversion's; must match it)"
    )
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
        Port(
            "noise_maps",
            ArtifactType.NOISE_SEQUENCE,
            "Noise maps from invert.edit_friendly",
            follows=True,
        ),
        Port(
            "auxiliary_path",
            ArtifactType.LATENT_TRAJECTORY,
            "Auxiliary path from the same invert.edit_friendly stage",
            follows=True,
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
        WEIGHTS_PORT,
    )
    outputs = (Port("latents", ArtifactType.LATENT, "Edited clean latents", size_of="noise_maps"),)
    # The vae is loaded only when colour inputs are given.
    components = (*specs.DENOISER, specs.VAE)
    # The inversion's settings (METHODS.md defaults when the maps come from elsewhere).
    inherits = {"noise_maps": {"num_inference_steps": 100, "eta": 1.0, "scheduler": "ddim"}}

    @classmethod
    def check(
        cls,
        params: SampleEditFriendlyParams,
        references: Mapping[str, Any],
        sizes: Mapping[str, Any],
    ) -> list[tuple[str | None, str]]:
        mask, image = "colour_mask" in references, "colour_image" in references
        if mask != image:
            missing = "colour_image" if not image else "colour_mask"
            return [(None, f"colour_mask and colour_image go together: {missing} is missing")]
        problems = check_ratio(params.ratio, references.get("weights") or [])
        if params.colour_strength > 0 and not mask:
            problems.append(
                (None, "colour_strength > 0 needs the colour_mask and colour_image inputs")
            )
        edited = sizes.get("noise_maps")
        for name in ("colour_mask", "colour_image"):
            size = sizes.get(name)
            if edited is not None and size is not None and size != edited:
                message = (
                    f"{name} is {size[0]}x{size[1]} but the edited image is"
                    f" {edited[0]}x{edited[1]}: give it the image's size with inputs.NAME.size"
                )
                problems.append((name, message))
        return problems

    def run(
        self,
        ctx: StageContext,
        params: SampleEditFriendlyParams,
        *,
        noise_maps: Steps,
        auxiliary_path: Steps,
        colour_mask: torch.Tensor | None,
        colour_image: torch.Tensor | None,
        weights: Sequence[Mapping[str, torch.Tensor]] | None,
    ) -> dict[str, Any]:
        models = ctx.models
        # Read a step at a time: on Ray the inversion may still be writing them (follows).
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
        # An empty target prompt means no CFG.
        cond, uncond = encode_prompt_pair(
            models, params.target_prompt, "", len(x_T), guided=bool(params.target_prompt)
        )
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
    if (mask is None) != (image is None):  # recipes are refused earlier, by check()
        missing = "colour_image" if image is None else "colour_mask"
        raise EditflowError(
            "colour_mask and colour_image must be given together",
            key=f"stages.{ctx.name}.{missing}",
        )
    if mask is None:
        if params.colour_strength > 0:
            raise EditflowError(
                "colour_strength > 0 needs the colour_mask and colour_image inputs",
                key=f"stages.{ctx.name}.colour_strength",
                hint="add both inputs or set colour_strength = 0",
            )
        return None
    if params.colour_strength == 0:
        return None
    vae = ctx.models.get("vae")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    expected = (latent_size[0] * factor, latent_size[1] * factor)
    for name, value in (("colour_mask", mask), ("colour_image", image)):
        if tuple(value.shape[-2:]) != expected:
            raise EditflowError(
                f"{name} is {value.shape[-2]}x{value.shape[-1]} but the edited image is"
                f" {expected[0]}x{expected[1]}",
                key=f"stages.{ctx.name}.{name}",
                hint="give it the image's size with inputs.NAME.size",
            )
    colour_latent = vae_encode(vae, image).to(ctx.device, ctx.dtype)
    mask = mask.to(ctx.device, ctx.dtype)
    latent_mask = F.interpolate(mask, size=tuple(latent_size), mode="area")
    return ColourGuidance(latent_mask, colour_latent, params.colour_strength, params.colour_window)
