"""pix2pix-zero (Parmar et al., SIGGRAPH 2023): reference pass and cross-attention guided edit.

Two loops (the loop contract of :mod:`editflow.stages.diffusion`: predictor, start latent, a
``DDIMScheduler`` with ``set_timesteps`` called, embeddings, keyword-only knobs) for the two
stage kinds built on them (``guide.attention_reference`` in :mod:`.guide`,
``sample.pix2pix_zero`` in :mod:`.sample`):

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

The maps are a step sequence (docs/steps.md): the reference stage writes each step's
``{layer: (N * heads, q, k)}`` CPU float16 maps through ``ctx.write_steps("attention_maps",
steps)`` as the UNet makes them and returns the writer's ``result()``; the edit stage reads
``maps[i]``, one step at a time, whatever holds them (memory, the cache, a producer still
running).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from editflow.errors import EditflowError
from editflow.lazy import lazy, no_grad
from editflow.stages.base import StageContext
from editflow.stages.ddim_loops import ddim_step
from editflow.stages.diffusion import Callback, NoisePredictor, guided_noise
from editflow.stages.pix2pix_zero.attention import AttentionMaps, MapsPredictor, attention_loss

torch = lazy("torch")

# ------------------------------------------------------------------------------------------
# The two loops


@no_grad
def reference_pass(
    predict_maps: MapsPredictor,
    x_T: torch.Tensor,
    scheduler: Any,
    cond: torch.Tensor,
    *,
    record: Callable[[int, AttentionMaps], None],
    callback: Callback | None = None,
) -> torch.Tensor:
    """pix2pix-zero reference pass (Parmar et al. 2023, "M_t^ref").

    Deterministic DDIM (eta 0, no CFG) from x_T with the caption embedding; after each UNet
    call the cross-attention maps of that step go to ``record`` before the next call
    replaces them.

    Args:
        predict_maps: ``(x_t, t, embeds) -> (eps_hat, {layer: (N * heads, q, k)})``.
        x_T: (N, C, h, w) inverted latents.
        scheduler: ``DDIMScheduler`` from the model's config, ``set_timesteps`` called.
        cond: (N, tokens, D) caption embeddings.
        record: ``record(step, maps)``, called once per step in order (step 0 = noisiest).
        callback: Called after every step with a ``StepInfo``.

    Returns:
        (N, C, h, w) the reconstruction x_0.
    """
    x = x_T
    for i, t in enumerate(scheduler.timesteps):
        eps, maps = predict_maps(scheduler.scale_model_input(x, t), t, cond)
        record(i, maps)
        del maps
        step = ddim_step(scheduler, eps, t, x, 0.0, None)
        x = step.prev_sample
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": step.pred_original_sample, "eps": eps})
    return x


@no_grad
def guided_edit(
    predict: NoisePredictor,
    x_T: torch.Tensor,
    scheduler: Any,
    cond: torch.Tensor,
    uncond: torch.Tensor | None = None,
    *,
    predict_maps: MapsPredictor,
    reference_maps: Callable[[int], AttentionMaps],
    xa_guidance: float = 0.1,
    guidance_scale: float = 5.0,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """pix2pix-zero edit with cross-attention guidance (Parmar et al. 2023).

    Per step i at timestep t:

    1. ``x_t`` becomes a leaf; one UNet call with ``cond`` records the maps
       ``M_t^edit``; ``loss = attention_loss(M_t^edit, reference_maps(i))``;
       ``x_t <- x_t - xa_guidance * grad(loss)`` (one SGD step, as the released code).
    2. Without gradients, ``eps = eps_src + s * (eps_edit - eps_src)`` at the new ``x_t``
       (CFG with the source caption as the negative prompt) and one DDIM step.

    With ``xa_guidance == 0`` step 1 is skipped and ``reference_maps`` never called. When
    ``uncond`` equals ``cond`` (a zero direction) CFG is the identity and only
    the conditional branch is evaluated, so the edit then reproduces :func:`reference_pass`
    exactly. ``reference_maps`` is called once per step with increasing ``i`` and its maps
    are dropped before the next step, so a streamed reader holds one step at a time.

    Args:
        predict: Noise predictor on the same UNet (for the CFG call; records nothing).
        x_T: (N, C, h, w) inverted latents (the reference pass's start).
        scheduler: ``DDIMScheduler`` from the model's config, ``set_timesteps`` called with
            the reference pass's step count.
        cond: (N, tokens, D) the edit embeddings, ``caption + direction``.
        uncond: (N, tokens, D) caption embeddings (the negative prompt) or ``None``.
        predict_maps: ``(x_t, t, embeds) -> (eps_hat, maps)`` keeping the autograd graph.
        reference_maps: ``step -> {layer: (N * heads, q, k)}`` reference maps of that step.
        xa_guidance: SGD step size on the latent (0.1 real images, 0.15 synthetic).
        guidance_scale: CFG scale (5 in the paper).
        eta: DDIM stochasticity (the paper uses 0).
        generator: CPU generator for the variance noise when ``eta > 0``.
        callback: Called after every step with a ``StepInfo`` whose ``loss`` is the attention
            loss before the SGD step, a 0-d tensor (``None`` without guidance).

    Returns:
        (N, C, h, w) edited latents x_0.
    """
    if uncond is not None and torch.equal(uncond, cond):
        uncond = None
    x = x_T
    for i, t in enumerate(scheduler.timesteps):
        loss_value = None
        if xa_guidance > 0:
            reference = reference_maps(i)
            with torch.enable_grad():
                leaf = x.detach().requires_grad_(True)
                _, maps = predict_maps(scheduler.scale_model_input(leaf, t), t, cond)
                loss = attention_loss(maps, reference)
                (grad,) = torch.autograd.grad(loss, leaf)
            del maps, reference
            loss_value = loss.detach()  # a tensor: reading it would wait for the device
            x = (leaf - xa_guidance * grad).detach()
        model_input = scheduler.scale_model_input(x, t)
        eps = guided_noise(predict, model_input, t, cond, uncond, guidance_scale)
        step = ddim_step(scheduler, eps, t, x, eta, generator)
        x = step.prev_sample
        if callback is not None:
            denoised = step.pred_original_sample
            callback({"i": i, "t": t, "x": x, "denoised": denoised, "eps": eps, "loss": loss_value})
    return x


# ------------------------------------------------------------------------------------------
# Helpers the stage kinds share


@contextmanager
def no_weight_grads(module: torch.nn.Module) -> Iterator[None]:
    """Stop autograd from tracking weights (only the latent needs a gradient)."""
    flags = [parameter.requires_grad for parameter in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in zip(module.parameters(), flags, strict=True):
            parameter.requires_grad_(flag)


def match_batch(embeds: torch.Tensor, batch: int, what: str, ctx: StageContext) -> torch.Tensor:
    if embeds.shape[0] == batch:
        return embeds
    if embeds.shape[0] == 1:
        return embeds.expand(batch, *embeds.shape[1:])
    raise EditflowError(
        f"{what} has batch {embeds.shape[0]} but x_T has {batch}",
        key=f"stages.{ctx.name}.{what}",
        hint="connect embeddings made for the same images",
    )
