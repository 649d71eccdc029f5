"""What interpolation asks of the model, checked while planning from its identity alone.

An unconditional pixel-space model (DDPM's ``UNet2DModel``, ``tiny-pixel``, a DiffusionCLIP
model) has no text encoder: frames between two images need none, and CLIP ranking scores
decoded pixels with the recipe's own CLIP (``model.clip``), but a prompt, text embeddings
(a textual inversion's) and pose guidance (a ControlNet steers a text-conditioned UNet)
have nothing to condition. Each is refused by ``validate`` with one line at its key, in the
words of :func:`editflow.stages.conditioning.text_problems` that every sampler uses, rather
than failing mid-run or being ignored. A ControlNet must match the model's UNet.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from editflow.errors import Problem
from editflow.models import specs
from editflow.stages.checks import CheckView
from editflow.stages.conditioning import text_problems

MODEL = "model.id"
_CONTROLNET_PARTS = ("block_out_channels", "down_block_types", "layers_per_block")
TEXT_PORTS = ("prompt_embeds", "negative_embeds")
POSE_PORTS = ("keypoints", "poses")


def textless_problems(
    view: CheckView, *, prompt: str, negative_prompt: str, ranked: bool
) -> list[Problem]:
    """One problem per use of text or poses that a model without a text encoder cannot run
    (none for a model with one).

    Args:
        view: The stage's check view.
        prompt: The stage's ``prompt``.
        negative_prompt: The stage's ``negative_prompt``; CLIP ranking scores against it
            too, so it is refused only when nothing is ``ranked``.
        ranked: Whether candidates are ranked by CLIP (variant ``quality``).
    """
    model = view.text_free_model()
    if model is None:
        return []
    prompts = {"prompt": prompt, "negative_prompt": "" if ranked else negative_prompt}
    problems = text_problems(view, prompts, TEXT_PORTS)
    why = f"{model} has no text encoder (an unconditional UNet)"
    for port in POSE_PORTS:
        if view.references.get(port):
            problems.append(Problem(f"{why}: pose guidance needs a ControlNet, which steers a"
                                    " text-conditioned UNet", key=port,
                                    hint="disconnect it"))  # fmt: skip
    return problems


def textual_inversion_problems(view: CheckView) -> list[Problem]:
    """Textual inversion fits prompt embeddings: nothing to fit without a text encoder."""
    model = view.text_free_model()
    if model is None:
        return []
    return [Problem(f"invert.textual_inversion fits prompt embeddings, but {model} has no text"
                    " encoder (an unconditional UNet): sample.interpolate needs none on it")]  # fmt: skip


def controlnet_problems(models: Mapping[str, Any]) -> list[Problem]:
    """A ControlNet must match the model's UNet (from both configs; nothing loads)."""
    from editflow.models.providers import component_config

    model, controlnet = models.get(MODEL), models.get(specs.CONTROLNET.provider)
    if model is None or controlnet is None:
        return []
    unet, control = component_config(model, "unet"), component_config(controlnet, "")
    if unet is None or control is None:
        return []  # not on disk yet: the first load finds out
    different = [
        part
        for part in (*_CONTROLNET_PARTS, "cross_attention_dim")
        if _listed(unet.get(part)) != _listed(control.get(part))
    ]
    if different:
        return [
            Problem(
                f"the ControlNet '{controlnet.spec.id}' does not match the model's UNet"
                f" ({', '.join(different)} differ): use a ControlNet trained for"
                f" '{model.spec.id}'"
            )
        ]
    return []


def _listed(value: Any) -> Any:
    return list(value) if isinstance(value, list | tuple) else value
