"""The denoisers ``sample.local_ilvr`` runs, and the rules that tie them to its parameters.

Three kinds of UNet run the loop of :mod:`.local_ilvr`, told apart by their config alone (so
that ``validate`` decides without loading weights):

- a plain text-conditioned UNet (Stable Diffusion, ``tiny``; 4 input channels): the latent
  in, the prompt through cross-attention;
- an inpainting UNet (9 input channels: latent, mask, masked latent), fed as Stable
  Diffusion's inpainting pipeline feeds it, mask 1 = region to generate (everything but the
  object);
- an unconditional pixel-space UNet (DDPM's ``UNet2DModel``, ``tiny-pixel``; no
  ``cross_attention_dim``): the image in [-1, 1] in, no text at all.

After both guidance windows close, an inpainting UNet keeps ``[1 - M, masked latent]``
(``inpaint_after_window = "keep"``) or is told to generate everything, mask 1 and masked
latent 0 (``"generate"``), as the released code does (``ldm/models/diffusion/ddim.py``,
``decode``: it zeroes the masked-latent channels and sets the mask channel to 1 in place, so
the unconditional branch of CFG switches too, and for good).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from editflow.errors import Problem
from editflow.lazy import lazy
from editflow.stages.base import CheckView, StageContext
from editflow.stages.diffusion import NoisePredictor
from editflow.stages.tuned import Ratio, mixing_predictor

torch = lazy("torch")

PLAIN_CHANNELS = 4
INPAINTING_CHANNELS = 9

# What an inpainting UNet is told once both windows have closed (see the module docstring).
AfterWindow = Literal["keep", "generate"]


def takes_text(unet_config: Mapping[str, Any]) -> bool:
    """Whether a UNet reads prompt embeddings (:func:`~editflow.stages.diffusion.is_unconditional`
    on a config, so that a check needs no weights)."""
    return "cross_attention_dim" in unet_config


def is_inpainting(unet_config: Mapping[str, Any]) -> bool:
    """A text-conditioned UNet with 9 input channels: latent, mask and masked latent."""
    return takes_text(unet_config) and unet_config.get("in_channels") == INPAINTING_CHANNELS


def inpainting_predictor(
    unet: Any, inpaint_mask: torch.Tensor, masked_latents: torch.Tensor
) -> NoisePredictor:
    """A 9-channel inpainting UNet as a noise predictor: ``[x_t, mask, masked latent]`` in,
    as Stable Diffusion's inpainting pipeline feeds it (mask 1 = region to generate).

    Args:
        unet: The inpainting UNet (or the same UNet with tuned weights).
        inpaint_mask: (N, 1, h, w) 1 where the model generates.
        masked_latents: (N, 4, h, w) the latent of the image with that region grey.
    """
    extra = torch.cat([inpaint_mask, masked_latents], dim=1)

    def predict(x_t: torch.Tensor, t: torch.Tensor | int, embeds: torch.Tensor) -> torch.Tensor:
        repeats = len(x_t) // len(extra)  # CFG doubles the batch
        model_input = torch.cat([x_t, extra.repeat(repeats, 1, 1, 1)], dim=1)
        return unet(model_input, t, encoder_hidden_states=embeds, return_dict=False)[0]

    return predict


def noise_predictors(
    ctx: StageContext,
    after_window: AfterWindow,
    ratio: Ratio,
    latent_mask: torch.Tensor,
    masked_reference: torch.Tensor | None,
    weights: Sequence[Mapping[str, torch.Tensor]],
) -> tuple[NoisePredictor, NoisePredictor | None]:
    """The noise predictor while guiding, and the one after both windows close (``None``: the
    same), each mixing tuned ``weights`` in by ``ratio``.

    Args:
        ctx: Gives the UNet, the device and the dtype.
        after_window: ``keep`` or ``generate`` (:data:`AfterWindow`); only an inpainting
            UNet has a conditioning to change.
        ratio: How tuned weights mix with the original (:mod:`editflow.stages.tuned`).
        latent_mask: (N, 1, h, w) 1 on the object, at the denoiser's resolution.
        masked_reference: (1, 4, h, w) the masked image's latent (an inpainting UNet's).
        weights: Tuned weights of the UNet (may be empty).
    """
    unet = ctx.models.get("unet")
    if not is_inpainting(unet.config):
        return mixing_predictor(unet, weights, ratio), None
    masked = masked_reference.to(ctx.device, ctx.dtype).expand(len(latent_mask), -1, -1, -1)
    # The inpainting model generates where its mask is 1: everything but the object.
    keep = mixing_predictor(
        unet, weights, ratio, lambda model: inpainting_predictor(model, 1 - latent_mask, masked)
    )
    if after_window == "keep":
        return keep, None
    # On the UNet's device and dtype once, so that both predictors' tuned copies are the
    # same tensors (tuned_module's move is then a no-op) rather than two copies on the GPU.
    parameter = next(getattr(unet, "_orig_mod", unet).parameters())
    weights = [
        {name: value.to(parameter.device, parameter.dtype) for name, value in tuned.items()}
        for tuned in weights
    ]
    everything = torch.ones_like(latent_mask), torch.zeros_like(masked)
    generate = mixing_predictor(
        unet, weights, ratio, lambda model: inpainting_predictor(model, *everything)
    )
    return keep, generate


def denoised_size(view: CheckView, port: str) -> tuple[tuple[int, int] | None, str]:
    """The (height, width) the denoiser works at for the image behind ``port``, and what to
    call it: the latent size (from the model's VAE), or the image's own size on a pixel-space
    model (which has no VAE)."""
    from editflow.models.providers import has_component

    size, model = view.sizes.get(port), view.models.get("model.id")
    # Asking a model without a VAE for its VAE's config fails, so ask only models that have
    # one, and only when there is a size to convert.
    if size is None:
        return None, "latent size"
    if model is not None and not has_component(model, "vae"):
        return size, "image size"
    return view.latent_size(port), "latent size"


def model_problems(params: Any, view: CheckView) -> list[Problem]:
    """The model's UNet against the parameters and inputs: its channels, presets and
    ``inpaint_after_window`` that suit another kind of UNet, and the masked image an
    inpainting UNet needs. (An unconditional UNet's prompts are the text rules' concern.)"""
    unet = view.config("unet")
    if unet is None:  # not known before loading: the preset alone says which UNet is meant
        if params.preset == "background" and "masked_reference" not in view.references:
            message = "preset 'background' needs the latent of compose.paste's masked image"
            return [Problem(message, key="masked_reference")]
        return []
    channels = unet.get("in_channels")
    if not takes_text(unet):
        return _plain_problems(params, channels)
    if channels not in (PLAIN_CHANNELS, INPAINTING_CHANNELS):
        return [Problem("needs a UNet with 4 or 9 input channels, or an unconditional"
                        f" pixel-space UNet; this model's takes {channels}")]  # fmt: skip
    if channels == PLAIN_CHANNELS:
        return _plain_problems(params, channels)
    if params.preset in ("immersion", "scribble"):
        return [
            Problem(f"preset '{params.preset}' guides a plain UNet; this model's is an inpainting"
                    " UNet (9 input channels), which would regenerate everything but the object",
                    key="preset", hint="use preset 'background', or a plain model")
        ]  # fmt: skip
    if "masked_reference" not in view.references:
        return [
            Problem("an inpainting UNet needs the masked_reference input", key="masked_reference",
                    hint="connect the latent of compose.paste's masked image")
        ]  # fmt: skip
    return []


def _plain_problems(params: Any, channels: int | None) -> list[Problem]:
    """What only an inpainting UNet can do, asked of a plain or pixel-space one."""
    problems = []
    if params.preset == "background":
        problems.append(
            Problem(f"preset 'background' needs an inpainting UNet (9 input channels); this"
                    f" model's UNet takes {channels}", key="preset",
                    hint="set model.id to an inpainting model such as 'tiny-inpaint'")
        )  # fmt: skip
    if params.inpaint_after_window != "keep":
        problems.append(
            Problem(f"is '{params.inpaint_after_window}' but this model's UNet is not an"
                    f" inpainting UNet (it takes {channels} input channels): it has no mask"
                    " conditioning to change", key="inpaint_after_window",
                    hint="leave inpaint_after_window out, or use an inpainting model")
        )  # fmt: skip
    return problems
