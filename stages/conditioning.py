"""What a sampler conditions on: a prompt, or embeddings from another stage, plus an edit
direction; and the rules the plan checks for them.

The conditional embedding ``cond`` is

- the prompt, encoded by the model's text encoder (the default);
- ``prompt_embeds``, an embedding from another stage (a textual inversion's per-image
  embeddings, an inversion's own prompt embeddings), which replaces the prompt;
- either of them plus a ``direction`` (pix2pix-zero's ``mean(target) - mean(source)``):
  pix2pix-zero's edited embedding ``c_edit = c + direction`` (Parmar et al. 2023, sec. 3.2),
  which an edit-friendly edit can follow too (LEDITS, Tsaban & Passos 2023).

An embedding of batch 1 serves every image; otherwise there is one per image. Under CFG the
unconditional embedding is always the negative prompt's.

A model without a text encoder (an unconditional pixel-space ``UNet2DModel``) takes no text
at all: the plan refuses a prompt, an embedding or a direction for it (:func:`text_problems`),
which it would otherwise silently ignore.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from editflow.errors import EditflowError, Problem
from editflow.lazy import lazy
from editflow.stages.checks import CheckView
from editflow.stages.diffusion import encode_prompts_once, is_unconditional, prompt_pair

torch = lazy("torch")

# The input ports that carry text into a sampler, besides its prompt parameters.
TEXT_PORTS = ("prompt_embeds", "direction")


def match_batch(embeds: torch.Tensor, batch: int, port: str, stage: str) -> torch.Tensor:
    """``embeds`` (n, tokens, D) for ``batch`` images: n = 1 serves all, n = batch one each.

    Raises:
        EditflowError: Any other n, located at ``stages.STAGE.PORT``.
    """
    if embeds.dim() != 3:
        raise EditflowError(
            f"{port} is {tuple(embeds.shape)}, not (n, tokens, D) embeddings",
            key=f"stages.{stage}.{port}",
        )
    if embeds.shape[0] == batch:
        return embeds
    if embeds.shape[0] == 1:
        return embeds.expand(batch, -1, -1)
    raise EditflowError(
        f"{port} holds {embeds.shape[0]} embeddings but the latents hold {batch} images",
        key=f"stages.{stage}.{port}",
        hint="give one embedding for all images or one per image",
    )


def _same_shape(embeds: torch.Tensor, like: torch.Tensor, port: str, what: str, stage: str) -> None:
    if embeds.shape[1:] != like.shape[1:]:
        raise EditflowError(
            f"{port} has {tuple(embeds.shape[1:])} (tokens, D) per image but {what} has"
            f" {tuple(like.shape[1:])}",
            key=f"stages.{stage}.{port}",
            hint="make it with this recipe's model",
        )


def text_conditioning(
    models: Any,
    prompt: str,
    negative_prompt: str,
    batch: int,
    *,
    guided: bool,
    prompt_embeds: torch.Tensor | None = None,
    direction: torch.Tensor | None = None,
    stage: str,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(cond, uncond) for ``batch`` images (see the module); ``uncond`` is None without CFG,
    both are None for a model without a text encoder.

    Args:
        models: Gives ``unet``, ``tokenizer`` and ``text_encoder`` through ``get``.
        prompt: Encoded for ``cond`` unless ``prompt_embeds`` replaces it.
        negative_prompt: Encoded for ``uncond`` when ``guided``.
        batch: Number of images.
        guided: Whether CFG is used.
        prompt_embeds: (1 or batch, tokens, D) embeddings that replace the prompt.
        direction: (1 or batch, tokens, D) added to the conditional embedding.
        stage: The stage's name, to locate errors.
        device: Where the embeddings go.
        dtype: Their dtype.

    Raises:
        EditflowError: An embedding of another batch or shape (:func:`match_batch`).
    """
    if prompt_embeds is None and direction is None:
        # The path every recipe took before these inputs existed: same calls, same bytes.
        return prompt_pair(models, prompt, negative_prompt, batch, guided)
    if is_unconditional(models.get("unet")):
        return None, None  # the plan refuses text for such a model (text_problems)
    tokenizer, text_encoder = models.get("tokenizer"), models.get("text_encoder")
    if prompt_embeds is None:
        cond = encode_prompts_once(tokenizer, text_encoder, [prompt] * batch).to(device, dtype)
    else:
        cond = match_batch(prompt_embeds.to(device, dtype), batch, "prompt_embeds", stage)
    uncond = None
    if guided:
        uncond = encode_prompts_once(tokenizer, text_encoder, [negative_prompt] * batch)
        uncond = uncond.to(device, dtype)
        if prompt_embeds is not None:
            _same_shape(cond, uncond, "prompt_embeds", "the negative prompt's embedding", stage)
    if direction is not None:
        direction = match_batch(direction.to(device, dtype), batch, "direction", stage)
        conditional = "prompt_embeds" if prompt_embeds is not None else "the prompt's embedding"
        _same_shape(direction, cond, "direction", conditional, stage)
        cond = cond + direction
    return cond, uncond


def text_problems(
    view: CheckView,
    prompts: Mapping[str, str],
    ports: Sequence[str] = TEXT_PORTS,
    replaced: str | None = None,
) -> list[Problem]:
    """The plan's rules for a stage's text: a model without a text encoder takes none, and
    ``prompt_embeds`` and the prompt it replaces are not both given.

    Args:
        view: The stage's check view.
        prompts: Prompt parameter -> its value (empty: not given).
        ports: The stage's input ports that carry text (connected or not).
        replaced: The prompt parameter ``prompt_embeds`` replaces.
    """
    given = {name: value for name, value in prompts.items() if value}
    connected = [port for port in ports if port in view.references]
    model = view.text_free_model()
    if model is not None:
        why = f"{model} has no text encoder (an unconditional UNet)"
        return [
            Problem(f"is {value!r}, but {why}: the prompt would be ignored", key=name,
                    hint=f"leave {name} empty")
            for name, value in given.items()
        ] + [
            Problem(f"{why}: {port} would be ignored", key=port, hint="disconnect it")
            for port in connected
        ]  # fmt: skip
    if replaced in given and "prompt_embeds" in connected:
        message = f"is {given[replaced]!r}, but prompt_embeds is connected and replaces it"
        hint = f"leave {replaced} empty or disconnect prompt_embeds"
        return [Problem(message, key=replaced, hint=hint)]
    return []
