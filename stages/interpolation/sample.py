"""``sample.interpolate``: frames between two images (Wang & Golland 2023).

The math is :func:`editflow.stages.interpolation.interpolate_frames`; this module wires it
to the models: the text embeddings (a textual inversion's, or the prompts'), CLIP ranking
of decoded candidates (the function ``rank.clip`` uses), and pose guidance through a
ControlNet from OpenPose keypoints or pose images. On an unconditional pixel-space model
there is no text: frames are denoised without it and decoded as pixels to be ranked
(:mod:`.checks` refuses what such a model cannot take).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import Field, model_validator

from editflow.errors import EditflowError, Problem
from editflow.lazy import lazy
from editflow.models import specs
from editflow.stages.base import ArtifactType, CheckView, Port, StageContext, StageKind
from editflow.stages.clip import clip_scores
from editflow.stages.diffusion import (
    NoisePredictor,
    encode_prompts,
    is_unconditional,
    vae_decode,
)
from editflow.stages.fields import GuidanceScale, Steps
from editflow.stages.interpolation.checks import (
    controlnet_problems,
    textless_problems,
)
from editflow.stages.interpolation.frames import (
    Rounding,
    SlerpForm,
    Spacing,
    Variant,
    candidate_counts,
    controlnet_strength,
    interpolate_frames,
    interpolate_keypoints,
    noise_levels,
)
from editflow.stages.interpolation.pose import draw_pose
from editflow.stages.tuned import WEIGHTS_PORT, TunedParams, check_ratio, mixing_predictor

torch = lazy("torch")
diffusers = lazy("diffusers")

MAX_LEVELS = 7  # 129 frames
# METHODS.md section 4: the noise-level range of each variant, as schedule fractions.
DEFAULT_SCHEDULE = {"quality": (0.3, 0.55), "plain": (0.25, 0.5)}


class SampleInterpolateParams(TunedParams):
    levels: int = Field(3, ge=1, le=MAX_LEVELS, description="Tree depth L: 2^L + 1 frames")
    variant: Literal["plain", "quality"] = Field(
        "quality",
        description="quality: candidates denoised to 0 and ranked by CLIP; plain: branching"
        " to the next level, no ranking",
    )
    schedule_min: float | None = Field(
        None, gt=0.0, le=1.0, description="Finest level (fraction; 0.3 quality, 0.25 plain)"
    )
    schedule_max: float | None = Field(
        None, gt=0.0, le=1.0, description="Coarsest level (fraction; 0.55 quality, 0.5 plain)"
    )
    spacing: Literal["linear", "convex", "concave"] = Field(
        "linear", description="Levels between min and max: linear, convex (x^2), concave (sqrt)"
    )
    rounding: Literal["half-even", "half-up"] = Field(
        "half-even",
        description="A level's fraction times num_inference_steps, when halfway between two"
        " step counts: half-even (8.5 -> 8) or half-up (8.5 -> 9)",
    )
    slerp: Literal["unit-direction", "raw"] = Field(
        "unit-direction",
        description="unit-direction: slerp the directions, interpolate the norms linearly;"
        " raw: textbook slerp of the vectors (the authors' code)",
    )
    num_inference_steps: Steps = 50
    guidance_scale: GuidanceScale = 7.5
    prompt: str = Field(
        "", description="Prompt of both images (without prompt_embeds; models that take text)"
    )
    negative_prompt: str = Field(
        "", description="What frames should not show: CLIP ranking, and CFG without negative_embeds"
    )
    candidates: int = Field(8, ge=1, le=64, description="Candidates per frame at the first level")
    min_candidates: int = Field(3, ge=1, le=64, description="Fewest candidates at a level")
    positive_prompt: str = Field("", description="CLIP ranking: what frames should show")
    batch_size: int | None = Field(
        None, ge=1, le=64, description="Candidates per UNet batch (default: all at once)"
    )
    pose_strength_ends: float = Field(1.0, ge=0.0, le=5.0, description="ControlNet scale at ends")
    pose_strength_middle: float = Field(
        1.5, ge=0.0, le=5.0, description="ControlNet scale at the middle frame"
    )

    @model_validator(mode="after")
    def _schedule(self) -> SampleInterpolateParams:
        low, high = self.schedule_range()
        if low > high:
            raise ValueError(f"schedule_min ({low}) is above schedule_max ({high})")
        return self

    def schedule_range(self) -> tuple[float, float]:
        """(min, max) noise level, the variant's defaults where left out."""
        low, high = DEFAULT_SCHEDULE[self.variant]
        return (
            self.schedule_min if self.schedule_min is not None else low,
            self.schedule_max if self.schedule_max is not None else high,
        )


class SampleInterpolate(StageKind):
    """Frames between two images: branching denoise-interpolate-denoise with CLIP ranking."""

    kind = "sample.interpolate"
    version = "1"
    description = "2^L + 1 frames between two images (Wang & Golland 2023), clean latents"
    params = SampleInterpolateParams
    inputs = (
        Port("latents", ArtifactType.LATENT, "Clean latents of the two images", many=True),
        Port(
            "prompt_embeds",
            ArtifactType.EMBEDDING,
            "(2, tokens, D) per-image embeddings (a textual inversion); replaces `prompt`",
            optional=True,
        ),
        Port(
            "negative_embeds",
            ArtifactType.EMBEDDING,
            "(1, tokens, D) negative embedding; replaces `negative_prompt`",
            optional=True,
        ),
        Port(
            "keypoints",
            ArtifactType.KEYPOINTS,
            "OpenPose points of the two images: interpolated, drawn, fed to the ControlNet",
            optional=True,
            many=True,
        ),
        Port(
            "poses",
            ArtifactType.IMAGE,
            "Pose images, one per frame (2^L + 1), instead of keypoints",
            optional=True,
            many=True,
        ),
        WEIGHTS_PORT,
    )
    outputs = (
        Port("latents", ArtifactType.LATENT, "(2^L + 1, C, h, w) the frames", size_of="latents"),
        Port("scores", ArtifactType.SCORES, "CLIP score of each frame (NaN: not ranked)"),
        Port("poses", ArtifactType.IMAGE, "The pose image of each frame (none unguided)"),
    )
    seeded = True
    components = (*specs.DENOISER, specs.VAE, specs.CLIP, specs.CONTROLNET)

    @classmethod
    def component_specs(
        cls, params: SampleInterpolateParams, references: Mapping[str, Any] | None = None
    ) -> tuple[specs.ComponentSpec, ...]:
        needed = list(specs.DENOISER)
        if params.variant == "quality":
            needed += [specs.VAE, specs.CLIP]  # candidates are decoded and scored
        if references and (references.get("keypoints") or references.get("poses")):
            needed.append(specs.CONTROLNET)
        return tuple(needed)

    @classmethod
    def check(cls, params: SampleInterpolateParams, view: CheckView) -> list[Problem]:
        references = view.references
        problems = check_ratio(params.ratio, references.get("weights") or [])
        if references.get("keypoints") and references.get("poses"):
            problems.append(Problem("give keypoints or poses, not both", key="poses"))
        # Input files hold one image or pose each, so their count is known while planning.
        counts = {"keypoints": 2, "poses": 2**params.levels + 1}
        for port, wanted in counts.items():
            refs = references.get(port) or []
            if all(ref.startswith("inputs.") for ref in refs) and 0 < len(refs) != wanted:
                message = f"needs {wanted} entries for levels = {params.levels}, got {len(refs)}"
                problems.append(Problem(message, key=port))
        if params.min_candidates > params.candidates:
            message = f"is {params.min_candidates}, above candidates ({params.candidates})"
            problems.append(Problem(message, key="min_candidates"))
        if params.variant == "quality" and not params.positive_prompt:
            message = "is needed to rank candidates (variant 'quality')"
            problems.append(Problem(message, key="positive_prompt"))
        if view.text_free_model() is not None:
            return problems + textless_problems(
                view, prompt=params.prompt, negative_prompt=params.negative_prompt,
                ranked=params.variant == "quality",
            )  # fmt: skip
        return problems + controlnet_problems(view.models)

    def run(
        self,
        ctx: StageContext,
        params: SampleInterpolateParams,
        *,
        latents: Sequence[torch.Tensor],
        prompt_embeds: torch.Tensor | None,
        negative_embeds: torch.Tensor | None,
        keypoints: Sequence[torch.Tensor] | None,
        poses: Sequence[torch.Tensor] | None,
        weights: Sequence[Mapping[str, torch.Tensor]] | None,
    ) -> dict[str, Any]:
        models = ctx.models
        ends = torch.cat([item.to(ctx.device, ctx.dtype) for item in latents])
        frames = 2**params.levels + 1
        _require(ends.shape[0] == 2, ctx, "latents",
                 f"needs exactly two images, got {ends.shape[0]}")  # fmt: skip
        unet, pose_images = models.get("unet"), None
        # editflow's pixel-space models (DDPM's UNet2DModel) are the unconditional ones: no
        # text to condition on (the check refused any given), frames decoded as pixels.
        pixels = is_unconditional(unet)
        cond, negative = (
            (None, None)
            if pixels
            else self._embeddings(ctx, params, prompt_embeds, negative_embeds)
        )
        if keypoints is not None or poses is not None:
            controlnet = models.get("controlnet")
            # The condition image is as many pixels per latent as its embedding downsamples.
            factor = 2 ** (len(controlnet.config.conditioning_embedding_out_channels) - 1)
            size = (ends.shape[-2] * factor, ends.shape[-1] * factor)
            pose_images = self._poses(ctx, params, keypoints, poses, frames, size)
        tuned = weights or []
        if pose_images is None:
            unguided = mixing_predictor(unet, tuned, params.ratio)

            def predictor(frame: int) -> NoisePredictor:
                return unguided
        else:
            last = frames - 1
            pose_images = pose_images.to(ctx.device, ctx.dtype)

            def predictor(frame: int) -> NoisePredictor:
                scale = controlnet_strength(
                    frame / last, params.pose_strength_ends, params.pose_strength_middle
                )
                pose = pose_images[frame]
                return mixing_predictor(
                    unet, tuned, params.ratio,
                    lambda model: controlled_predictor(model, controlnet, pose, scale),
                )  # fmt: skip

        scheduler = diffusers.DDIMScheduler.from_config(models.scheduler_config)
        scheduler.set_timesteps(params.num_inference_steps)
        low, high = params.schedule_range()
        spacing: Spacing = params.spacing
        variant: Variant = params.variant
        slerp_form: SlerpForm = params.slerp
        rounding: Rounding = params.rounding
        score = self._scorer(ctx, params, pixels) if variant == "quality" else None
        frames_out, scores = interpolate_frames(
            predictor,
            ends,
            scheduler,
            cond,
            negative,
            levels=params.levels,
            fractions=noise_levels(params.levels, low, high, spacing),
            variant=variant,
            candidates=candidate_counts(params.levels, params.candidates, params.min_candidates),
            guidance_scale=params.guidance_scale,
            generator=ctx.generator,
            score=score,
            batch_size=params.batch_size,
            progress=ctx.progress,
            slerp_form=slerp_form,
            rounding=rounding,
        )
        no_poses = torch.zeros(0, 3, 1, 1)
        return {
            "latents": frames_out,
            "scores": scores,
            "poses": pose_images.float().cpu() if pose_images is not None else no_poses,
        }

    @staticmethod
    def _embeddings(
        ctx: StageContext,
        params: SampleInterpolateParams,
        prompt_embeds: torch.Tensor | None,
        negative_embeds: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = []
        if prompt_embeds is None:
            prompts += [params.prompt]
        if negative_embeds is None:
            prompts += [params.negative_prompt]
        encoded = (
            encode_prompts(ctx.models.get("tokenizer"), ctx.models.get("text_encoder"), prompts)
            if prompts
            else None
        )
        if prompt_embeds is None:
            cond = encoded[:1].expand(2, -1, -1)
        else:
            _require(prompt_embeds.shape[0] == 2, ctx, "prompt_embeds",
                     f"needs one embedding per image (2), got {prompt_embeds.shape[0]}")  # fmt: skip
            cond = prompt_embeds
        negative = encoded[-1:] if negative_embeds is None else negative_embeds[:1]
        return cond.to(ctx.device, ctx.dtype), negative.to(ctx.device, ctx.dtype)

    @staticmethod
    def _poses(
        ctx: StageContext,
        params: SampleInterpolateParams,
        keypoints: Sequence[torch.Tensor] | None,
        poses: Sequence[torch.Tensor] | None,
        frames: int,
        size: tuple[int, int],
    ) -> torch.Tensor | None:
        """One pose image per frame: drawn from interpolated keypoints, or as given."""
        if poses is not None:
            images = torch.cat([image.float() for image in poses])
            _require(images.shape[0] == frames, ctx, "poses",
                     f"needs {frames} images (one per frame) for levels = {params.levels},"
                     f" got {images.shape[0]}")  # fmt: skip
            _require(tuple(images.shape[-2:]) == size, ctx, "poses",
                     f"pose images are {tuple(images.shape[-2:])} px but frames are {size}")  # fmt: skip
            return images
        if keypoints is None:
            return None
        points = torch.cat([item.float() for item in keypoints])
        _require(points.shape[0] == 2, ctx, "keypoints",
                 f"needs the poses of the two images, got {points.shape[0]}")  # fmt: skip
        last = frames - 1
        return torch.stack(
            [
                draw_pose(interpolate_keypoints(points[0], points[1], frame / last), *size)
                for frame in range(frames)
            ]
        )

    @staticmethod
    def _scorer(ctx: StageContext, params: SampleInterpolateParams, pixels: bool) -> Any:
        """CLIP's score of candidates, decoded by the VAE, or read as pixels in [-1, 1] (as
        decode.pixels does) on a pixel-space model, whose denoisers are unconditional."""
        vae = None if pixels else ctx.models.get("vae")
        clip = ctx.models.get("clip")

        def score(candidates: torch.Tensor) -> torch.Tensor:
            if vae is None:
                images = ((candidates.float() + 1) / 2).clamp(0, 1)
            else:
                images = vae_decode(vae, candidates)
            return clip_scores(
                clip.model, clip.processor, images, params.positive_prompt,
                params.negative_prompt,
            )  # fmt: skip

        return score


def controlled_predictor(
    unet: Any, controlnet: Any, condition: torch.Tensor, scale: float
) -> NoisePredictor:
    """A noise predictor whose UNet takes a ControlNet's residuals for ``condition``
    ((3, H, W) in [0, 1], as diffusers' ControlNet pipelines feed it) at ``scale``."""

    def predict(x: torch.Tensor, t: torch.Tensor | int, embeds: torch.Tensor) -> torch.Tensor:
        image = condition[None].expand(len(x), -1, -1, -1)
        down, middle = controlnet(
            x, t, encoder_hidden_states=embeds, controlnet_cond=image,
            conditioning_scale=scale, return_dict=False,
        )  # fmt: skip
        return unet(
            x, t, encoder_hidden_states=embeds, down_block_additional_residuals=down,
            mid_block_additional_residual=middle, return_dict=False,
        )[0]  # fmt: skip

    return predict


def _require(condition: bool, ctx: StageContext, port: str, message: str) -> None:
    if not condition:
        raise EditflowError(f"{port} {message}", key=f"stages.{ctx.name}.{port}")
