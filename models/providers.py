"""Providers: the recipe fields that say which model supplies a stage's declared components.

``model.id`` provides the diffusion pipeline's parts (UNet, VAE, text encoder, tokenizer,
scheduler config); ``model.captioner`` provides a BLIP captioner. Each provider turns its
recipe field into a :class:`ResolvedModel` (folder, identity for cache keys) by reading
configs and published hashes only: nothing here loads or downloads weights. Loading is
:class:`editflow.models.registry.ModelRegistry`'s job, on first use.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from editflow.errors import ModelUnavailableError
from editflow.models.identity import (
    folder_paths,
    folder_reader,
    hash_files,
    pipeline_files,
    read_json_file,
    resolve_hub,
    single_folder_files,
)
from editflow.models.section import (
    DEFAULT_CAPTIONER,
    DEFAULT_CLIP,
    DEFAULT_CONTROLNET,
    ModelSection,
)
from editflow.models.tiny import (
    TINY_VARIANTS,
    jsonable,
    tiny_folder_name,
    tiny_identity,
    tiny_scheduler_config,
)

TINY_ID = "tiny"  # the built-in models: "tiny" and its variants (TINY_VARIANTS)
MODELS_ENV = "EDITFLOW_MODELS"
SCHEDULER_CONFIG_FILE = "scheduler/scheduler_config.json"
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

    Attributes:
        spec: What the recipe said.
        folder: The local folder; ``None`` while ``tiny`` is not built or a hub model is not
            downloaded (the registry builds or downloads it on first load).
        identity: JSON-able description of exactly which model this is (for cache keys).
        scheduler_config: The model's scheduler config with its ``_class_name``
            (bookkeeping keys such as ``_diffusers_version`` dropped: the library version
            enters keys separately); empty when the model has none.
        provider: The recipe field it resolves (``model.id``, ``model.captioner``).
        layout: How its components load: ``"pipeline"`` (one subfolder per component) or
            ``"captioner"`` (a transformers BLIP folder with its processor).
    """

    spec: ModelSpec
    folder: Path | None
    identity: dict[str, Any]
    scheduler_config: dict[str, Any]
    provider: str = "model.id"
    layout: str = "pipeline"
    compiled: bool = False  # the denoiser runs through torch.compile

    def prompt_tokens(self, prompt: str) -> int | None:
        """Positions a captioner's prompt takes before the caption (its tokens after the
        start token), from its tokenizer files alone; None when they are not on disk."""
        if self.spec.id in TINY_VARIANTS:
            from editflow.models.tiny import captioner_tokenizer

            tokenizer = captioner_tokenizer()
        elif self.folder is not None and (self.folder / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        else:
            return None
        return len(tokenizer(prompt, verbose=False).input_ids) - 1

    def text_positions(self) -> int | None:
        """A captioner's text decoder positions, from its config (None when unknown)."""
        if self.spec.id in TINY_VARIANTS:
            text = TINY_VARIANTS["tiny"].components["captioner"].config["text"]
            return int(text["max_position_embeddings"])
        config = self.folder / "config.json" if self.folder is not None else None
        if config is None or not config.is_file():
            return None
        text = read_json_file(config, self.provider).get("text_config") or {}
        return text.get("max_position_embeddings")

    def fingerprint(self) -> dict[str, Any]:
        """What enters the cache key of a stage that uses this model."""
        fingerprint: dict[str, Any] = {"identity": self.identity}
        if self.scheduler_config:
            config = self.scheduler_config
            fingerprint["scheduler"] = {"class": config.get("_class_name"), "config": config}
        if self.compiled:  # compiled kernels may round differently: another result
            fingerprint["compiled"] = True
        return fingerprint


# ---------------------------------------------------------------------------------------
# model.id: the diffusion pipeline


def resolve_model(
    spec: ModelSpec, *, base_dir: Path, models_dir: Path, hash_memo: Path | None
) -> ResolvedModel:
    """Pin down the model a recipe names; reads configs and hashes, loads no weights.

    Args:
        spec: The recipe's model reference.
        base_dir: The recipe's folder; relative paths in ``spec.id`` start there.
        models_dir: Where built-in models (``tiny``) live.
        hash_memo: A JSON file memoising file hashes by (path, size, mtime), so that big
            local weights are hashed once; ``None`` hashes every time.

    Raises:
        ModelUnavailableError: The folder does not exist or is not a model, or a hub model
            is neither cached nor reachable, or does not exist.
    """
    if spec.id in TINY_VARIANTS:
        if spec.revision is not None or spec.variant is not None:
            raise ModelUnavailableError(
                f"the built-in model '{spec.id}' has no revisions or variants",
                key="model.revision" if spec.revision is not None else "model.variant",
                hint="remove the key, or name a hub model or a local folder",
            )
        built = Path(models_dir) / tiny_folder_name(spec.id)
        return ResolvedModel(
            spec=spec,
            folder=built if (built / "model_index.json").is_file() else None,
            identity={"tiny": tiny_identity(spec.id)},
            scheduler_config=tiny_scheduler_config(),
        )
    local = local_path(spec.id, Path(base_dir))
    if local is not None:
        return _resolve_folder(spec, local, hash_memo)
    hub = resolve_hub(
        spec.id,
        spec.revision,
        lambda paths, read: pipeline_files(paths, read, spec.variant),
        key="model.id",
        what="model",
        otherwise="or set model.id to a local folder",
        hash_memo=hash_memo,
        configs=(SCHEDULER_CONFIG_FILE,),
    )
    identity: dict[str, Any] = {"repo": spec.id, "revision": spec.revision, "commit": hub.commit}
    identity["files"] = hub.files
    if spec.variant is not None:
        identity["variant"] = spec.variant
    scheduler = _scheduler_config(hub.configs.get(SCHEDULER_CONFIG_FILE))
    return ResolvedModel(spec, hub.snapshot, identity, scheduler)


def local_path(model_id: str, base_dir: Path) -> Path | None:
    """The folder ``model_id`` names, or ``None`` when it reads as a hub id.

    An id is a path when it exists relative to the recipe or cannot be a hub id (absolute,
    ``./``, ``~``, more than one slash); otherwise ``org/name`` means the Hub.
    """
    path = Path(os.path.abspath(base_dir / Path(model_id).expanduser()))
    if path.exists() or not _HUB_ID.match(model_id) or ".." in model_id:
        return path
    return None


def _resolve_folder(spec: ModelSpec, folder: Path, hash_memo: Path | None) -> ResolvedModel:
    if not folder.exists():
        raise ModelUnavailableError(
            f"model folder '{spec.id}' does not exist",
            key="model.id",
            hint=f"looked for {folder}; relative paths are resolved against the recipe's folder",
        )
    if not (folder / "model_index.json").is_file() and not (folder / "unet").is_dir():
        raise ModelUnavailableError(
            f"model folder '{spec.id}' has no model_index.json or unet/",
            key="model.id",
            hint="point model.id at a folder in the diffusers layout, as save_pretrained writes it",
        )
    read = folder_reader(folder)
    files = pipeline_files(folder_paths(folder), read, spec.variant)
    identity: dict[str, Any] = {"files": hash_files(folder, files, hash_memo)}
    if spec.variant is not None:
        identity["variant"] = spec.variant
    return ResolvedModel(spec, folder, identity, _scheduler_config(read(SCHEDULER_CONFIG_FILE)))


def _scheduler_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    if not config:
        return {}
    return {k: v for k, v in config.items() if k == "_class_name" or not k.startswith("_")}


# ---------------------------------------------------------------------------------------
# model.captioner: a BLIP captioner


def resolve_captioner(
    section: ModelSection, *, base_dir: Path, models_dir: Path, hash_memo: Path | None
) -> ResolvedModel:
    """Pin down the BLIP captioner a recipe uses (``model.captioner``); loads no weights.

    With a built-in model, the default captioner (or ``"tiny"``) is tiny's own BLIP.
    Otherwise it is a transformers BLIP folder or hub id, identified like any model.

    Raises:
        ModelUnavailableError: The folder is missing or not a model, or the hub id is neither
            cached nor reachable.
    """
    return _resolve_single_folder(
        section, "captioner", DEFAULT_CAPTIONER, base_dir=base_dir, hash_memo=hash_memo,
        otherwise="give the caption in the recipe, or set model.captioner to a local folder",
    )  # fmt: skip


def resolve_clip(
    section: ModelSection, *, base_dir: Path, models_dir: Path, hash_memo: Path | None
) -> ResolvedModel:
    """Pin down the CLIP a recipe scores images with (``model.clip``); loads no weights.

    With a built-in model, the default CLIP (or ``"tiny"``) is tiny's own.
    """
    return _resolve_single_folder(
        section, "clip", DEFAULT_CLIP, base_dir=base_dir, hash_memo=hash_memo,
        otherwise="or set model.clip to a local folder",
    )  # fmt: skip


def resolve_controlnet(
    section: ModelSection, *, base_dir: Path, models_dir: Path, hash_memo: Path | None
) -> ResolvedModel:
    """Pin down the ControlNet a recipe guides with (``model.controlnet``); loads no weights.

    With a built-in model, the default ControlNet (or ``"tiny"``) is tiny's own.
    """
    return _resolve_single_folder(
        section, "controlnet", DEFAULT_CONTROLNET, base_dir=base_dir, hash_memo=hash_memo,
        otherwise="or set model.controlnet to a local folder",
    )  # fmt: skip


def component_config(model: ResolvedModel, component: str) -> dict[str, Any] | None:
    """A model part's ``config.json`` (``unet`` of a pipeline, or a one-folder model's own),
    from the built-in table or the files on disk; ``None`` when it is not on disk yet."""
    if model.spec.id in TINY_VARIANTS:
        variant = model.spec.id if model.layout == "pipeline" else TINY_ID
        part = component if model.layout == "pipeline" else model.layout
        return jsonable(TINY_VARIANTS[variant].components[part].config)
    if model.folder is None:
        return None
    path = model.folder / (
        f"{component}/config.json" if model.layout == "pipeline" else "config.json"
    )
    return read_json_file(path, model.provider) if path.is_file() else None


def has_component(model: ResolvedModel, component: str) -> bool:
    """Whether a pipeline has a part (``vae`` ...), from its identity: the built-in table or
    the files that identify it; nothing is read or loaded."""
    if model.spec.id in TINY_VARIANTS:
        return component in TINY_VARIANTS[model.spec.id].components
    return any(path.startswith(f"{component}/") for path in model.identity.get("files", {}))


def _resolve_single_folder(
    section: ModelSection,
    field: str,
    default: str,
    *,
    base_dir: Path,
    hash_memo: Path | None,
    otherwise: str,
) -> ResolvedModel:
    """A transformers model kept in one folder with its processor (``model.<field>``)."""
    model_id, key = getattr(section, field), f"model.{field}"
    if model_id == TINY_ID or (section.id in TINY_VARIANTS and model_id == default):
        return ResolvedModel(ModelSpec(TINY_ID), None, {"tiny": tiny_identity()}, {}, key, field)
    spec = ModelSpec(model_id)
    folder = local_path(model_id, Path(base_dir))
    if folder is None:
        hub = resolve_hub(
            model_id, None, single_folder_files, key=key, what=field, otherwise=otherwise,
            hash_memo=hash_memo,
        )  # fmt: skip
        identity = {"repo": model_id, "commit": hub.commit, "files": hub.files}
        return ResolvedModel(spec, hub.snapshot, identity, {}, key, field)
    if not (folder / "config.json").is_file():
        raise ModelUnavailableError(
            f"{field} '{model_id}' has no config.json",
            key=key,
            hint="use a folder as transformers' save_pretrained writes it, or a hub id",
        )
    files = single_folder_files(folder_paths(folder))
    identity = {"files": hash_files(folder, files, hash_memo)}
    return ResolvedModel(spec, folder, identity, {}, key, field)


# ---------------------------------------------------------------------------------------
# The provider table


Resolver = Callable[..., ResolvedModel]


def _resolve_main(
    section: ModelSection, *, base_dir: Path, models_dir: Path, hash_memo: Path | None
) -> ResolvedModel:
    spec = ModelSpec(section.id, section.revision, section.variant)
    resolved = resolve_model(spec, base_dir=base_dir, models_dir=models_dir, hash_memo=hash_memo)
    return replace(resolved, compiled=section.compile)


PROVIDERS: Mapping[str, Resolver] = MappingProxyType(
    {
        "model.id": _resolve_main,
        "model.captioner": resolve_captioner,
        "model.clip": resolve_clip,
        "model.controlnet": resolve_controlnet,
    }
)


def resolve_providers(
    section: ModelSection, providers: Iterable[str], *, base_dir: Path, models_dir: Path
) -> dict[str, ResolvedModel]:
    """Resolve each named provider (``model.id`` ...) of a recipe's ``[model]`` table.

    Raises:
        ModelUnavailableError: A model cannot be found; every unavailable one is listed.
    """
    resolved: dict[str, ResolvedModel] = {}
    problems = []
    for provider in sorted(set(providers)):
        if provider not in PROVIDERS:
            raise KeyError(f"no provider {provider!r}; known: {sorted(PROVIDERS)}")  # a stage bug
        try:
            resolved[provider] = PROVIDERS[provider](
                section,
                base_dir=base_dir,
                models_dir=models_dir,
                hash_memo=Path(models_dir) / "file-hashes.json",
            )
        except ModelUnavailableError as error:
            problems += error.problems
    if problems:
        raise ModelUnavailableError(problems=problems)
    return resolved
