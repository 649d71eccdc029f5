"""Model references: what a recipe names (:class:`ModelSpec`) and what it pins down
(:class:`ResolvedModel`: a folder and an identity for cache keys), without loading weights.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TINY_ID = "tiny"  # the built-in models: "tiny" and its variants (TINY_VARIANTS)
MODELS_ENV = "EDITFLOW_MODELS"
# The syntax of "name" or "org/name" on the Hub; anything else can only be a path.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def models_dir(cache_root: Path | None, default_cache: Path) -> Path:
    """Where built-in models (``tiny``) are saved and local weight hashes memoised.

    ``$EDITFLOW_MODELS`` when set; else ``models/`` inside a local cache folder; for a remote
    cache, inside the default local cache folder (weights load from local disk).
    """
    if os.environ.get(MODELS_ENV):
        return Path(os.environ[MODELS_ENV])
    return (cache_root if cache_root is not None else default_cache) / "models"


def local_path(model_id: str, base_dir: Path) -> Path | None:
    """The folder ``model_id`` names, or ``None`` when it reads as a hub id.

    An id is a path when it exists relative to the recipe or cannot be a hub id (absolute,
    ``./``, ``~``, more than one slash); otherwise ``org/name`` means the Hub.
    """
    path = Path(os.path.abspath(base_dir / Path(model_id).expanduser()))
    if path.exists() or not _HUB_ID.match(model_id) or ".." in model_id:
        return path
    return None


@dataclass(frozen=True)
class ModelSpec:
    """The model a recipe names.

    Attributes:
        id: ``tiny``, a hub id (``CompVis/stable-diffusion-v1-4``) or a local folder path
            (relative paths are resolved against the recipe's folder).
        revision: A hub branch, tag or commit; ``None`` for the default branch.
        variant: A weights variant such as ``fp16``; ``None`` for the plain weights.
    """

    id: str
    revision: str | None = None
    variant: str | None = None


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference pinned down without loading any weights.

    What differs between kinds of model (how they load, where their configs lie) belongs to
    the provider this one came from: ``editflow.models.providers.PROVIDERS[provider]``.

    Attributes:
        spec: What the recipe said.
        folder: The local folder; ``None`` while ``tiny`` is not built or a hub model is not
            downloaded (the registry builds or downloads it on first load).
        identity: JSON-able description of exactly which model this is (for cache keys).
        scheduler_config: The model's scheduler config with its ``_class_name``
            (bookkeeping keys such as ``_diffusers_version`` dropped: the library version
            enters keys separately); empty when the model has none.
        provider: The recipe field it resolves (``model.id``, ``model.captioner`` ...).
        compiled: The denoiser runs through ``torch.compile``.
        checkpoint: A single-file checkpoint holding the weights; ``folder`` then holds
            only the configs that describe it (``model.config``).
        adapters: LoRA files and textual-inversion embeddings applied on loading
            (:mod:`editflow.models.adapters`); each has an ``identity()`` for cache keys and
            the ``parts`` (component names) it changes.
    """

    spec: ModelSpec
    folder: Path | None
    identity: dict[str, Any]
    scheduler_config: dict[str, Any]
    provider: str = "model.id"
    compiled: bool = False
    checkpoint: Path | None = None
    adapters: tuple[Any, ...] = ()

    def fingerprint(self, parts: Collection[str] | None = None) -> dict[str, Any]:
        """What enters the cache key of a stage that uses ``parts`` of this model (component
        names; ``None``: all of it). Besides the identity, only what changes those parts: the
        scheduler config for a stage that reads it, compilation for the denoiser, an adapter
        for the parts it changes. A VAE-only stage keeps its key when a LoRA is added."""

        def uses(*names: str) -> bool:
            return parts is None or any(name in parts for name in names)

        fingerprint: dict[str, Any] = {"identity": self.identity}
        if self.scheduler_config and uses("scheduler_config"):
            config = self.scheduler_config
            fingerprint["scheduler"] = {"class": config.get("_class_name"), "config": config}
        if self.compiled and uses("unet"):  # compiled kernels may round differently
            fingerprint["compiled"] = True
        adapters = [adapter.identity() for adapter in self.adapters if uses(*adapter.parts)]
        if adapters:  # absent without any: keys of models without adapters stay as they were
            fingerprint["adapters"] = adapters
        return fingerprint
