"""Component specs: what a stage declares about the model parts it uses.

A stage kind lists :class:`ComponentSpec` values; the engine collects them, asks this package
to resolve the recipe fields they name (``model.id``, ``model.captioner`` ...) and hands the
stage a view that loads exactly the declared parts. The engine never names a part itself, so a
new part (a CLIP scorer, a ControlNet) is a new spec here and a new provider in
:mod:`editflow.models.providers`, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ComponentSpec:
    """One model part a stage needs, like a diffusers modular pipeline's ``ComponentSpec``.

    Attributes:
        name: How the stage asks for it (``ctx.models.get(name)``).
        family: What it is, for people and docs (``"UNet2DConditionModel"``, ``"BLIP"`` ...).
        provider: The recipe field that says which model provides it (``"model.id"``).
    """

    name: str
    family: str
    provider: str

    def describe(self) -> str:
        """``unet (UNet2DConditionModel, from model.id)``: for the README's stage reference."""
        return f"{self.name} ({self.family}, from {self.provider})"


# The parts of a Stable-Diffusion-shaped pipeline, all provided by the recipe's model.id.
UNET = ComponentSpec("unet", "UNet2DConditionModel", "model.id")
VAE = ComponentSpec("vae", "AutoencoderKL", "model.id")
TEXT_ENCODER = ComponentSpec("text_encoder", "CLIPTextModel", "model.id")
TOKENIZER = ComponentSpec("tokenizer", "CLIPTokenizer", "model.id")
# Schedulers hold per-run state, so a stage gets the (read-only) config and builds its own.
SCHEDULER_CONFIG = ComponentSpec("scheduler_config", "scheduler config", "model.id")
# pix2pix-zero's captioner: a transformers BLIP folder with its processor.
CAPTIONER = ComponentSpec("captioner", "BlipForConditionalGeneration", "model.captioner")

# A CLIP model and its processor, for scoring images against prompts.
CLIP = ComponentSpec("clip", "CLIPModel", "model.clip")
# A ControlNet that steers the denoiser with a condition image (a pose drawing ...).
CONTROLNET = ComponentSpec("controlnet", "ControlNetModel", "model.controlnet")
# LPIPS's network (Zhang et al. 2018), for the perceptual distance metric.lpips computes.
LPIPS = ComponentSpec("lpips", "LpipsNetwork", "model.lpips")

# What most samplers need: the denoiser, the prompt encoder and the scheduler config.
DENOISER = (UNET, TEXT_ENCODER, TOKENIZER, SCHEDULER_CONFIG)
