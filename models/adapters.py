"""Adapters: what a recipe adds to its diffusion model's weights, on top of ``model.id``.

``[[model.lora]]`` (:mod:`editflow.models.lora`) changes the UNet's and text encoder's
weights; ``[[model.embedding]]`` (:mod:`editflow.models.embeddings`) adds tokens to the
tokenizer and text encoder. Both are resolved with the model (checked and hashed, nothing
loaded) into its ``adapters``, whose identities are part of its fingerprint and so of the key
of every stage that uses ``model.id``; the registry applies them to each part as it loads it.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from editflow.errors import ModelUnavailableError, Problem
from editflow.models.embeddings import EmbeddingFile, load_embeddings, resolve_embeddings
from editflow.models.lora import LoraFile, apply_lora, resolve_lora
from editflow.models.references import ResolvedModel

if TYPE_CHECKING:
    from editflow.models.section import ModelSection

# The parts textual inversion changes together: a token's id must match its embedding row.
TEXT_PARTS = EmbeddingFile.parts
# Set on a text encoder that adapters changed: their identities, for memos of its outputs.
ADAPTERS_ATTRIBUTE = "editflow_adapters"
_NO_TEXT = {
    "model.lora": "LoRA files change a text-conditioned UNet and its text encoder",
    "model.embedding": "no prompt can use an embedding's token",
}


def with_adapters(
    model: ResolvedModel, section: ModelSection, *, base_dir: Path, hash_memo: Path | None
) -> ResolvedModel:
    """``model`` (the resolved ``model.id``) with the recipe's LoRA files and embeddings.

    Raises:
        ModelUnavailableError: Listing every entry that cannot be used.
    """
    if model.provider != "model.id" or not (section.lora or section.embedding):
        return model
    from editflow.models.providers import component_config

    unet = component_config(model, "unet")
    takes_text = unet is None or "cross_attention_dim" in unet  # None: not on disk yet
    problems: list[Problem] = []
    loras: list[LoraFile] = []
    embeddings: list[EmbeddingFile] = []
    if section.lora and takes_text:
        loras, found = resolve_lora(section.lora, base_dir=base_dir, hash_memo=hash_memo)
        problems += found
    elif section.lora:
        problems.append(_not_for(model, "model.lora"))
    if section.embedding and takes_text:
        text_encoder = component_config(model, "text_encoder") or {}
        embeddings, found = resolve_embeddings(
            section.embedding, base_dir=base_dir, width=text_encoder.get("hidden_size")
        )
        problems += found
    elif section.embedding:
        problems.append(_not_for(model, "model.embedding"))
    if problems:
        raise ModelUnavailableError(problems=problems)
    return replace(model, adapters=(*loras, *embeddings))


def _not_for(model: ResolvedModel, key: str) -> Problem:
    """Adapters on a model without text conditioning (a pixel-space ``UNet2DModel``)."""
    reason = _NO_TEXT[key]
    return Problem(f"model '{model.spec.id}' takes no text: {reason}", key=key)


def apply_adapters(model: ResolvedModel, parts: dict[str, Any]) -> None:
    """Apply the model's adapters, in place, to parts that were just loaded from disk.

    Args:
        model: The resolved model whose ``adapters`` say what to apply.
        parts: Component name -> the loaded part; ``tokenizer`` and ``text_encoder`` come
            together when the model has embeddings.
    """
    loras = [adapter for adapter in model.adapters if isinstance(adapter, LoraFile)]
    embeddings = [adapter for adapter in model.adapters if isinstance(adapter, EmbeddingFile)]
    for component, part in parts.items():
        apply_lora(part, component, loras)
    if embeddings and "text_encoder" in parts:
        load_embeddings(parts["tokenizer"], _module(parts["text_encoder"]), embeddings)
    if "text_encoder" in parts:
        # Prompt memos key on this too (editflow.stages.diffusion.encode_prompts_once).
        setattr(_module(parts["text_encoder"]), ADAPTERS_ATTRIBUTE, adapter_identities(model))


def needs_pair(model: ResolvedModel, component: str) -> str | None:
    """The part that must load together with ``component`` (the tokenizer with the text
    encoder, and back, when embeddings add tokens), or None."""
    if component in TEXT_PARTS and any(isinstance(a, EmbeddingFile) for a in model.adapters):
        return TEXT_PARTS[1 - TEXT_PARTS.index(component)]
    return None


def adapter_identities(model: ResolvedModel) -> str:
    """The adapters' identities, in the order they apply, as one (hashable) string."""
    return json.dumps([adapter.identity() for adapter in model.adapters], sort_keys=True)


def _module(part: Any) -> Any:
    return getattr(part, "_orig_mod", part)  # a compiled module: the original's weights
