"""pix2pix-zero (Parmar et al., SIGGRAPH 2023): reference pass and cross-attention guided edit.

Two loops (k-diffusion shape: predictors, start latent, a ``DDIMScheduler`` with
``set_timesteps`` called, embeddings, knobs) and the two stage kinds built on them:

- :func:`reference_pass` denoises x_T with the caption embedding and hands each step's
  cross-attention maps to a ``record(step, maps)`` callable (stage
  ``guide.attention_reference``).
- :func:`guided_edit` denoises the same x_T with ``c_edit = caption + direction``; at each
  step one SGD step on the latent pulls its cross-attention maps towards the reference maps
  of that step, fetched through a ``reference_maps(step)`` callable, then a DDIM step with
  CFG where the caption is the negative prompt (stage ``sample.pix2pix_zero``).

Differences from the released code (``src/utils/edit_pipeline.py``) and diffusers' port,
all deliberate:

- The released edit runs the guidance UNet call on the CFG batch ``[caption, c_edit]``,
  sums the loss of both halves, steps both halves' latents separately, predicts the noise
  of each half at its own stepped latent and carries the UNCONDITIONAL half forward. Here,
  as the paper describes it, the loss is taken on the ``c_edit`` maps only, the single
  latent is stepped, and both CFG branches are evaluated at that latent.
- The released reference pass runs CFG with the caption in both halves, which equals the
  plain conditional prediction; here it is one conditional call.
- The released code keeps every reference map of every step in memory (both halves, fp32).
  Here the stage streams them out step by step (conditional half, fp16) and the edit reads
  them back one step at a time.

Streaming protocol (what the engine provides; ``ctx.stream_writer`` in ``StageContext``)::

    writer = ctx.stream_writer(
        "attention_maps",                       # the output port being streamed
        layers={name: (steps, N * heads, q, k)}, # full shape of each layer's array
        dtype=torch.float16,
    )
    writer.write(step, {name: (N * heads, q, k) CPU float16 tensor})  # steps 0, 1, ... once
    handle = writer.close()                     # after the last step; the output's value

``layers`` is known only after the first UNet call, so the writer is opened then. When the
stage raises, ``close`` is never called and the engine must discard what was written. The
consumer side, the value the engine passes as the ``attention_maps`` input, is any object
with ``num_steps: int``, ``layers: Mapping[str, tuple[int, ...]]`` (per-step shapes) and
``step(i) -> {name: (N * heads, q, k) tensor}`` reading only step ``i`` (one chunk per
layer). :class:`InMemoryAttentionMaps` implements both sides; the stage falls back to it when
``ctx.stream_writer`` is ``None``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from diffusers import DDIMScheduler
from pydantic import Field

from editflow.errors import EditflowError
from editflow.stages.attention import (
    AttentionMaps,
    MapsPredictor,
    attention_loss,
    install_attention_recorder,
)
from editflow.stages.base import (
    ArtifactType,
    Params,
    Port,
    StageContext,
    StageKind,
    step_reporter,
)
from editflow.stages.ddim import StepCallback, ddim_step
from editflow.stages.diffusion import NoisePredictor, guided_noise, unet_noise_predictor

# ------------------------------------------------------------------------------------------
# The two loops


@torch.no_grad()
def reference_pass(
    predict_maps: MapsPredictor,
    x_T: torch.Tensor,
    scheduler: Any,
    embeds: torch.Tensor,
    record: Callable[[int, AttentionMaps], None],
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """pix2pix-zero reference pass (Parmar et al. 2023, "M_t^ref").

    Deterministic DDIM (eta 0, no CFG) from x_T with the caption embedding; after each UNet
    call the cross-attention maps of that step go to ``record`` before the next call
    replaces them.

    Args:
        predict_maps: ``(x_t, t, embeds) -> (eps_hat, {layer: (N * heads, q, k)})``.
        x_T: (N, C, h, w) inverted latents.
        scheduler: ``DDIMScheduler`` from the model's config, ``set_timesteps`` called.
        embeds: (N, tokens, D) caption embeddings.
        record: ``record(step, maps)``, called once per step in order (step 0 = noisiest).
        callback: Called after every step, see :data:`editflow.stages.ddim.StepCallback`.

    Returns:
        (N, C, h, w) the reconstruction x_0.
    """
    x = x_T
    for i, t in enumerate(scheduler.timesteps):
        eps, maps = predict_maps(scheduler.scale_model_input(x, t), t, embeds)
        record(i, maps)
        del maps
        x = ddim_step(scheduler, eps, t, x, 0.0, None)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "eps": eps})
    return x


@torch.no_grad()
def guided_edit(
    predict: NoisePredictor,
    predict_maps: MapsPredictor,
    x_T: torch.Tensor,
    scheduler: Any,
    edit_embeds: torch.Tensor,
    source_embeds: torch.Tensor | None,
    reference_maps: Callable[[int], AttentionMaps],
    xa_guidance: float = 0.1,
    guidance_scale: float = 5.0,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """pix2pix-zero edit with cross-attention guidance (Parmar et al. 2023).

    Per step i at timestep t:

    1. ``x_t`` becomes a leaf; one UNet call with ``edit_embeds`` records the maps
       ``M_t^edit``; ``loss = attention_loss(M_t^edit, reference_maps(i))``;
       ``x_t <- x_t - xa_guidance * grad(loss)`` (one SGD step, as the released code).
    2. Without gradients, ``eps = eps_src + s * (eps_edit - eps_src)`` at the new ``x_t``
       (CFG with the source caption as the negative prompt) and one DDIM step.

    With ``xa_guidance == 0`` step 1 is skipped and ``reference_maps`` never called. When
    ``source_embeds`` equals ``edit_embeds`` (a zero direction) CFG is the identity and only
    the conditional branch is evaluated, so the edit then reproduces :func:`reference_pass`
    exactly. ``reference_maps`` is called once per step with increasing ``i`` and its maps
    are dropped before the next step, so a streamed reader holds one step at a time.

    Args:
        predict: Noise predictor on the same UNet (for the CFG call; records nothing).
        predict_maps: ``(x_t, t, embeds) -> (eps_hat, maps)`` keeping the autograd graph.
        x_T: (N, C, h, w) inverted latents (the reference pass's start).
        scheduler: ``DDIMScheduler`` from the model's config, ``set_timesteps`` called with
            the reference pass's step count.
        edit_embeds: (N, tokens, D) ``caption + direction``.
        source_embeds: (N, tokens, D) caption embeddings (the negative prompt) or ``None``.
        reference_maps: ``step -> {layer: (N * heads, q, k)}`` reference maps of that step.
        xa_guidance: SGD step size on the latent (0.1 real images, 0.15 synthetic).
        guidance_scale: CFG scale (5 in the paper).
        eta: DDIM stochasticity (the paper uses 0).
        generator: CPU generator for the variance noise when ``eta > 0``.
        callback: Called after every step with ``i, t, x, eps`` and ``loss`` (the attention
            loss before the SGD step; ``None`` without guidance).

    Returns:
        (N, C, h, w) edited latents x_0.
    """
    if source_embeds is not None and torch.equal(source_embeds, edit_embeds):
        source_embeds = None
    x = x_T
    for i, t in enumerate(scheduler.timesteps):
        loss_value = None
        if xa_guidance > 0:
            reference = reference_maps(i)
            with torch.enable_grad():
                leaf = x.detach().requires_grad_(True)
                _, maps = predict_maps(scheduler.scale_model_input(leaf, t), t, edit_embeds)
                loss = attention_loss(maps, reference)
                (grad,) = torch.autograd.grad(loss, leaf)
            del maps, reference
            loss_value = float(loss)
            x = (leaf - xa_guidance * grad).detach()
        model_input = scheduler.scale_model_input(x, t)
        eps = guided_noise(predict, model_input, t, edit_embeds, source_embeds, guidance_scale)
        x = ddim_step(scheduler, eps, t, x, eta, generator)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "eps": eps, "loss": loss_value})
    return x


# ------------------------------------------------------------------------------------------
# Attention maps held in memory (the fallback when the engine offers no stream writer)


class InMemoryAttentionMaps:
    """Both sides of the streaming protocol, kept in RAM (tests, engines without streaming).

    Attributes:
        layers: ``{layer: (N * heads, q, k)}`` per-step shape of each layer.
        dtype: The dtype maps are stored in (float16 like the cache).
    """

    def __init__(
        self, layers: Mapping[str, tuple[int, ...]], dtype: torch.dtype = torch.float16
    ) -> None:
        self.layers = {name: tuple(shape[1:]) for name, shape in layers.items()}
        self.dtype = dtype
        self._total_steps = next(iter(layers.values()))[0] if layers else 0
        self._steps: list[AttentionMaps] = []

    @property
    def num_steps(self) -> int:
        return len(self._steps)

    def write(self, step: int, maps: AttentionMaps) -> None:
        """Store one step; steps must arrive in order."""
        if step != len(self._steps):
            raise ValueError(f"attention maps step {step} written after {len(self._steps)}")
        self._steps.append({name: maps[name].to("cpu", self.dtype) for name in self.layers})

    def close(self) -> InMemoryAttentionMaps:
        if len(self._steps) != self._total_steps:
            raise ValueError(f"{len(self._steps)} of {self._total_steps} steps were written")
        return self

    def step(self, i: int) -> AttentionMaps:
        """The maps of step ``i``."""
        return self._steps[i]

    def as_tensors(self) -> dict[str, torch.Tensor]:
        """``{layer: (steps, N * heads, q, k)}``, for an engine that stores them whole."""
        return {name: torch.stack([s[name] for s in self._steps]) for name in self.layers}


# ------------------------------------------------------------------------------------------
# Stage kinds


@contextmanager
def _no_weight_grads(module: torch.nn.Module) -> Iterator[None]:
    """Stop autograd from tracking weights (only the latent needs a gradient)."""
    flags = [parameter.requires_grad for parameter in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in zip(module.parameters(), flags, strict=True):
            parameter.requires_grad_(flag)


def _match_batch(embeds: torch.Tensor, batch: int, what: str, ctx: StageContext) -> torch.Tensor:
    if embeds.shape[0] == batch:
        return embeds
    if embeds.shape[0] == 1:
        return embeds.expand(batch, *embeds.shape[1:])
    raise EditflowError(
        f"{what} has batch {embeds.shape[0]} but x_T has {batch}",
        key=f"stages.{ctx.name}.{what}",
        hint="connect embeddings made for the same images",
    )


class GuideReferenceParams(Params):
    num_inference_steps: int = Field(
        50, ge=1, le=1000, description="DDIM steps (the edit must use the same number)"
    )


class GuidePix2PixZeroReference(StageKind):
    """pix2pix-zero reference pass: reconstruct x_T and stream its cross-attention maps."""

    kind = "guide.attention_reference"
    version = "1"
    description = "Denoise x_T with the caption and record every step's cross-attention maps"
    params = GuideReferenceParams
    inputs = (
        Port("x_T", ArtifactType.LATENT, "Inverted latents (regularised DDIM inversion)"),
        Port("prompt_embeds", ArtifactType.EMBEDDING, "Caption embedding used for inversion"),
    )
    outputs = (
        Port(
            "attention_maps",
            ArtifactType.ATTENTION_MAPS,
            "Conditional cross-attention maps per layer and step (fp16, streamed)",
        ),
        Port("latents", ArtifactType.LATENT, "The reconstruction x_0"),
    )
    components = frozenset({"unet"})

    def run(self, ctx: StageContext, params: Any, inputs: dict[str, Any]) -> dict[str, Any]:
        unet = ctx.models.get("unet")
        x_T = inputs["x_T"].to(ctx.device, ctx.dtype)
        embeds = _match_batch(
            inputs["prompt_embeds"].to(ctx.device, ctx.dtype), len(x_T), "prompt_embeds", ctx
        )
        steps = params.num_inference_steps
        scheduler = DDIMScheduler.from_config(ctx.models.scheduler_config)
        scheduler.set_timesteps(steps)
        writer = None

        def record(step: int, maps: AttentionMaps) -> None:
            nonlocal writer
            maps = {name: m.detach().to("cpu", torch.float16) for name, m in maps.items()}
            if writer is None:
                layers = {name: (steps, *m.shape) for name, m in maps.items()}
                open_writer = ctx.stream_writer or (lambda _, **kw: InMemoryAttentionMaps(**kw))
                writer = open_writer("attention_maps", layers=layers, dtype=torch.float16)
            writer.write(step, maps)

        with install_attention_recorder(unet) as recorder:
            predict_maps = recorder.predictor(unet_noise_predictor(unet))
            latents = reference_pass(
                predict_maps,
                x_T,
                scheduler,
                embeds,
                record,
                callback=step_reporter(ctx.progress, steps),
            )
        return {"attention_maps": writer.close(), "latents": latents}


class SamplePix2PixZeroParams(Params):
    xa_guidance: float = Field(
        0.1,
        ge=0.0,
        le=10.0,
        description="Cross-attention guidance step (0.1 real, 0.15 synthetic, <= 0.01 SD 2.x)",
    )
    guidance_scale: float = Field(
        5.0, ge=1.0, le=30.0, description="CFG scale; the caption is the negative prompt"
    )
    num_inference_steps: int = Field(
        50, ge=1, le=1000, description="DDIM steps (must equal the reference pass's)"
    )
    eta: float = Field(0.0, ge=0.0, le=1.0, description="DDIM eta (0 = deterministic)")
    direction_multiplier: float = Field(
        1.0, ge=-10.0, le=10.0, description="Scale of the edit direction added to the caption"
    )


class SamplePix2PixZero(StageKind):
    """pix2pix-zero edit: caption + direction, guided by the reference cross-attention maps."""

    kind = "sample.pix2pix_zero"
    version = "1"
    description = "Edit x_T along a text direction with cross-attention guidance"
    params = SamplePix2PixZeroParams
    inputs = (
        Port("x_T", ArtifactType.LATENT, "Inverted latents (the reference pass's start)"),
        Port("prompt_embeds", ArtifactType.EMBEDDING, "Caption embedding"),
        Port("direction", ArtifactType.DIRECTION, "Edit direction (1, 77, D)"),
        Port(
            "attention_maps",
            ArtifactType.ATTENTION_MAPS,
            "Reference maps from guide.attention_reference (needed when xa_guidance > 0)",
            optional=True,
        ),
    )
    outputs = (Port("latents", ArtifactType.LATENT, "Edited latents x_0"),)
    components = frozenset({"unet"})

    @classmethod
    def is_seeded(cls, params: Any) -> bool:
        return params.eta > 0

    def run(self, ctx: StageContext, params: Any, inputs: dict[str, Any]) -> dict[str, Any]:
        unet = ctx.models.get("unet")
        x_T = inputs["x_T"].to(ctx.device, ctx.dtype)
        caption = _match_batch(
            inputs["prompt_embeds"].to(ctx.device, ctx.dtype), len(x_T), "prompt_embeds", ctx
        )
        direction = inputs["direction"].to(ctx.device, ctx.dtype)
        edit_embeds = caption + params.direction_multiplier * direction
        reference = inputs.get("attention_maps")
        if params.xa_guidance > 0:
            if reference is None:
                raise EditflowError(
                    f"xa_guidance is {params.xa_guidance} but no attention_maps are connected",
                    key=f"stages.{ctx.name}.attention_maps",
                    hint="connect a guide.attention_reference stage or set xa_guidance = 0",
                )
            if reference.num_steps != params.num_inference_steps:
                raise EditflowError(
                    f"attention_maps hold {reference.num_steps} steps but"
                    f" num_inference_steps is {params.num_inference_steps}",
                    key=f"stages.{ctx.name}.num_inference_steps",
                    hint="use the reference stage's num_inference_steps",
                )
        scheduler = DDIMScheduler.from_config(ctx.models.scheduler_config)
        scheduler.set_timesteps(params.num_inference_steps)

        with _no_weight_grads(unet), install_attention_recorder(unet) as recorder:
            predict = unet_noise_predictor(unet)
            latents = guided_edit(
                predict,
                recorder.predictor(predict),
                x_T,
                scheduler,
                edit_embeds,
                caption,
                reference.step if reference is not None else _no_reference,
                xa_guidance=params.xa_guidance,
                guidance_scale=params.guidance_scale,
                eta=params.eta,
                generator=ctx.generator() if params.eta > 0 else None,
                callback=step_reporter(ctx.progress, params.num_inference_steps),
            )
        return {"latents": latents}


def _no_reference(step: int) -> AttentionMaps:
    raise RuntimeError("reference maps requested with guidance off")
