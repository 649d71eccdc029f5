"""Layouts: how a model's files are arranged, and so how a reference to it is pinned down.

A diffusers pipeline keeps ``model_index.json`` and one subfolder per component
(:data:`PIPELINE`), or is one single-file checkpoint in the original layout
(``model.id = "./model.safetensors"``) described by the configs ``model.config`` names; a
helper model (a BLIP captioner, a CLIP, a ControlNet) is one model in one folder with its
``config.json`` at the top (:data:`FOLDER`). A layout resolves a provider's recipe field into
a :class:`ResolvedModel` by reading configs, headers and published hashes only, says where a
component's config lies, and what a hub download fetches. Nothing here loads or downloads
weights.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from editflow.errors import ModelUnavailableError
from editflow.models.identity import (
    CONFIG_SUFFIXES,
    cached_hub,
    folder_paths,
    folder_reader,
    hash_files,
    pipeline_files,
    resolve_hub,
)
from editflow.models.pickle_scan import foreign_globals, refused
from editflow.models.references import TINY_ID, ModelSpec, ResolvedModel, local_path
from editflow.models.tiny import (
    TINY_VARIANTS,
    tiny_folder_name,
    tiny_identity,
    tiny_scheduler_config,
)

if TYPE_CHECKING:
    from editflow.models.providers import Provider
    from editflow.models.section import ModelSection

SCHEDULER_CONFIG_FILE = "scheduler/scheduler_config.json"
# What a hub download fetches for a pipeline: configs, vocabularies and safetensors weights.
# Pickled .bin weights are never downloaded.
_PIPELINE_PATTERNS = ["model_index.json", "*/*.json", "*/*.txt", "*/*.model", "*/*.safetensors"]
_FOLDER_PATTERNS = ["*.json", "*.txt", "*.safetensors"]
_HUB_VARIANTS = ("fp16", "bf16", "fp32", "ema", "non_ema")


class Layout:
    """How a provider's model is laid out; one instance per layout (:data:`PIPELINE` ...)."""

    name: str

    def __repr__(self) -> str:
        return f"<{self.name} layout>"

    def resolve(
        self,
        provider: Provider,
        section: ModelSection,
        *,
        base_dir: Path,
        models_dir: Path,
        hash_memo: Path | None,
    ) -> ResolvedModel:
        """Pin down the model ``provider``'s field of ``section`` names; loads no weights.

        Args:
            provider: The recipe field and its table entry.
            section: The recipe's ``[model]`` table.
            base_dir: The recipe's folder; relative paths start there.
            models_dir: Where built-in models (``tiny``) live.
            hash_memo: A JSON file memoising file hashes by (path, size, mtime), so that big
                local weights are hashed once; ``None`` hashes every time.

        Raises:
            ModelUnavailableError: The folder is missing or not a model, or the hub id is
                neither cached nor reachable, or does not exist.
        """
        raise NotImplementedError

    def config_file(self, component: str) -> str:
        """Where a component's ``config.json`` lies inside the model's folder."""
        raise NotImplementedError

    def download_patterns(self, spec: ModelSpec) -> tuple[list[str], list[str] | None]:
        """(allow, ignore) patterns of a hub download: what loading needs, nothing else."""
        raise NotImplementedError


class PipelineLayout(Layout):
    """A diffusers pipeline: ``model_index.json`` and one subfolder per component."""

    name = "pipeline"

    def resolve(
        self,
        provider: Provider,
        section: ModelSection,
        *,
        base_dir: Path,
        models_dir: Path,
        hash_memo: Path | None,
    ) -> ResolvedModel:
        model_id = getattr(section, provider.name)
        checkpoint = _checkpoint_path(model_id, Path(base_dir))
        if checkpoint is not None:
            resolved = _resolve_single_file(
                provider, section, checkpoint, base_dir=Path(base_dir), hash_memo=hash_memo
            )
        elif section.config is not None:
            raise ModelUnavailableError(
                "is read only for a single-file checkpoint in model.id",
                key=CONFIG_KEY,
                hint=f"remove it: model '{model_id}' brings its own configs",
            )
        else:
            spec = ModelSpec(model_id, section.revision, section.variant)
            resolved = self.resolve_spec(
                provider, spec, base_dir=base_dir, models_dir=models_dir, hash_memo=hash_memo
            )
        return replace(resolved, compiled=section.compile)

    def resolve_spec(
        self,
        provider: Provider,
        spec: ModelSpec,
        *,
        base_dir: Path,
        models_dir: Path,
        hash_memo: Path | None,
    ) -> ResolvedModel:
        """:meth:`resolve` for a spec with its revision and variant (not compiled)."""
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
                scheduler_config=tiny_scheduler_config(spec.id),
                provider=provider.field,
            )
        local = local_path(spec.id, Path(base_dir))
        if local is not None:
            return _resolve_pipeline_folder(provider, spec, local, hash_memo)
        hub = resolve_hub(
            spec.id,
            spec.revision,
            lambda paths, read: provider.files(paths, read, spec.variant),
            key=provider.field,
            what="model",
            otherwise=provider.offline_hint,
            hash_memo=hash_memo,
            configs=(SCHEDULER_CONFIG_FILE,),
        )
        identity: dict[str, Any] = {
            "repo": spec.id,
            "revision": spec.revision,
            "commit": hub.commit,
        }
        identity["files"] = hub.files
        if spec.variant is not None:
            identity["variant"] = spec.variant
        scheduler = _scheduler_config(hub.configs.get(SCHEDULER_CONFIG_FILE))
        return ResolvedModel(spec, hub.snapshot, identity, scheduler, provider.field)

    def config_file(self, component: str) -> str:
        return f"{component}/config.json"

    def download_patterns(self, spec: ModelSpec) -> tuple[list[str], list[str] | None]:
        ignore = [f"*/*.{name}[.-]*" for name in _HUB_VARIANTS if name != spec.variant]
        return _PIPELINE_PATTERNS, ignore


def _resolve_pipeline_folder(
    provider: Provider, spec: ModelSpec, folder: Path, hash_memo: Path | None
) -> ResolvedModel:
    if not folder.exists():
        raise ModelUnavailableError(
            f"model folder '{spec.id}' does not exist",
            key=provider.field,
            hint=f"looked for {folder}; relative paths are resolved against the recipe's folder",
        )
    if not (folder / "model_index.json").is_file() and not (folder / "unet").is_dir():
        raise ModelUnavailableError(
            f"model folder '{spec.id}' has no model_index.json or unet/",
            key=provider.field,
            hint="point model.id at a folder in the diffusers layout, as save_pretrained writes it",
        )
    read = folder_reader(folder)
    files = provider.files(folder_paths(folder), read, spec.variant)
    identity: dict[str, Any] = {"files": hash_files(folder, files, hash_memo)}
    if spec.variant is not None:
        identity["variant"] = spec.variant
    scheduler = _scheduler_config(read(SCHEDULER_CONFIG_FILE))
    return ResolvedModel(spec, folder, identity, scheduler, provider.field)


def _scheduler_config(config: dict[str, Any] | None) -> dict[str, Any]:
    if not config:
        return {}
    return {k: v for k, v in config.items() if k == "_class_name" or not k.startswith("_")}


# ---------------------------------------------------------------------------------------
# Single-file checkpoints: one .safetensors (or .ckpt) file in the original Stable Diffusion
# (LDM) key layout, read through diffusers' from_single_file with the configs model.config
# names. Nothing here reads tensors: the file is hashed and its header checked.

CONFIG_KEY = "model.config"
SAFETENSORS_SUFFIX = ".safetensors"
# PyTorch's pickled checkpoints, only ever read with torch.load(weights_only=True).
PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth"})
CHECKPOINT_SUFFIXES = frozenset({SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES})
# Every Stable Diffusion checkpoint in the original layout keeps its UNet under this prefix.
LDM_UNET_PREFIX = "model.diffusion_model."
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on a header


def _checkpoint_path(model_id: str, base_dir: Path) -> Path | None:
    """The file ``model_id`` names when it is one (or is named like a checkpoint), else None.

    A name ending in a checkpoint suffix is a path even when it does not exist, so that a
    missing file is reported as such rather than looked up on the Hub.
    """
    if model_id in TINY_VARIANTS:
        return None
    path = local_path(model_id, base_dir)
    if path is None and Path(model_id).suffix.lower() in CHECKPOINT_SUFFIXES:
        path = Path(os.path.abspath(base_dir / Path(model_id).expanduser()))
    if path is not None and (path.is_file() or path.suffix.lower() in CHECKPOINT_SUFFIXES):
        return path
    return None


def _resolve_single_file(
    provider: Provider,
    section: ModelSection,
    file: Path,
    *,
    base_dir: Path,
    hash_memo: Path | None,
) -> ResolvedModel:
    """A single-file checkpoint: identified by its sha256 and the identity of its configs."""
    model_id, key = section.id, provider.field
    if not file.is_file():
        raise ModelUnavailableError(
            f"checkpoint '{model_id}' does not exist",
            key=key,
            hint=f"looked for {file}; relative paths are resolved against the recipe's folder",
        )
    for name in ("revision", "variant"):
        if getattr(section, name) is not None:
            raise ModelUnavailableError(
                f"a single-file checkpoint has no {name}s",
                key=f"model.{name}",
                hint=f"remove the key: model.id is the file '{model_id}'",
            )
    _check_checkpoint(file, model_id, key)
    if section.config is None:
        raise ModelUnavailableError(
            f"the single-file checkpoint '{model_id}' needs the configs that describe it",
            key=CONFIG_KEY,
            hint="set model.config to a diffusers folder (relative to the recipe) or to a hub"
            " id in the local Hugging Face cache, e.g. 'stable-diffusion-v1-5/"
            "stable-diffusion-v1-5' for a Stable Diffusion 1.5 checkpoint",
        )
    folder, config_identity, scheduler = _resolve_config(section.config, base_dir, hash_memo)
    identity = {
        "checkpoint_sha256": hash_files(file.parent, [file.name], hash_memo)[file.name],
        "config": config_identity,
    }
    spec = ModelSpec(model_id)
    return ResolvedModel(spec, folder, identity, scheduler, key, checkpoint=file)


def _check_checkpoint(file: Path, model_id: str, key: str) -> None:
    """Refuse a file that is not a checkpoint editflow can read, from its header alone."""
    suffix = file.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        try:
            names = safetensors_names(file)
        except (OSError, ValueError) as error:
            raise ModelUnavailableError(
                f"'{model_id}' is not a safetensors file: {error}", key=key
            ) from None
        if not any(name.startswith(LDM_UNET_PREFIX) for name in names):
            raise ModelUnavailableError(
                f"'{model_id}' holds no Stable Diffusion UNet in the original layout"
                f" (no '{LDM_UNET_PREFIX}*' tensors)",
                key=key,
                hint="model.id takes a whole-pipeline checkpoint; a LoRA, a VAE or one"
                " component's weights are not one",
            )
    elif suffix in PICKLE_SUFFIXES:
        if not zipfile.is_zipfile(file) and not _legacy_torch_file(file):
            raise ModelUnavailableError(f"'{model_id}' is not a PyTorch checkpoint", key=key)
        stat = file.stat()
        try:
            foreign = foreign_globals(file, stat.st_size, stat.st_mtime_ns)
        except (ValueError, OSError, zipfile.BadZipFile) as error:
            raise ModelUnavailableError(
                f"'{model_id}' is not a PyTorch checkpoint: {error}", key=key
            ) from None
        if foreign:  # refused now, not when its weights load after other stages ran
            raise refused(model_id, key, foreign)
    else:
        raise ModelUnavailableError(
            f"'{model_id}' is a file but not a single-file checkpoint",
            key=key,
            hint="use a .safetensors (or .ckpt) checkpoint, or a folder in the diffusers layout",
        )


def safetensors_names(file: Path) -> list[str]:
    """The tensor names a safetensors file declares, read from its header without torch.

    The format: an 8-byte little-endian header length, then that many bytes of JSON mapping
    each tensor name to its dtype, shape and offsets (plus an optional ``__metadata__``).

    Raises:
        ValueError: The file does not start with a safetensors header.
    """
    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError("too short for a header")
        (length,) = struct.unpack("<Q", head)
        if length > min(_MAX_HEADER_BYTES, file.stat().st_size - 8):
            raise ValueError("the header length is impossible")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError("the header is not JSON") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return [name for name in header if name != "__metadata__"]


def _legacy_torch_file(file: Path) -> bool:
    """Whether a file is in torch.save's pre-1.6 format: a pickle (protocol 2) at the start."""
    with open(file, "rb") as handle:
        return handle.read(2) == b"\x80\x02"


def _resolve_config(
    config_id: str, base_dir: Path, hash_memo: Path | None
) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """(folder, identity, scheduler config) of the configs ``model.config`` names, offline.

    Only the configs and vocabularies count: a config folder's weights are never read.
    """
    folder = local_path(config_id, base_dir)
    if folder is not None:
        if not folder.is_dir():
            raise ModelUnavailableError(
                f"config folder '{config_id}' does not exist",
                key=CONFIG_KEY,
                hint=f"looked for {folder}; relative paths are resolved against the recipe's"
                " folder",
            )
        if not (folder / "model_index.json").is_file() and not (folder / "unet").is_dir():
            raise ModelUnavailableError(
                f"config folder '{config_id}' has no model_index.json or unet/",
                key=CONFIG_KEY,
                hint="use a folder in the diffusers layout, as save_pretrained writes it",
            )
        read = folder_reader(folder, CONFIG_KEY)
        files = hash_files(folder, config_files(folder_paths(folder), read), hash_memo)
        return folder, {"files": files}, _scheduler_config(read(SCHEDULER_CONFIG_FILE))
    hub = cached_hub(
        config_id,
        None,
        config_files,
        key=CONFIG_KEY,
        hash_memo=hash_memo,
        configs=(SCHEDULER_CONFIG_FILE,),
    )
    if hub is None or "model_index.json" not in hub.files:
        raise ModelUnavailableError(
            f"config '{config_id}' is not in the local Hugging Face cache",
            key=CONFIG_KEY,
            hint=f'run \'hf download {config_id} --include "*.json" "*.txt"\' with network'
            " access (configs only), or set model.config to a local diffusers folder",
        )
    identity = {"repo": config_id, "commit": hub.commit, "files": hub.files}
    return hub.snapshot, identity, _scheduler_config(hub.configs.get(SCHEDULER_CONFIG_FILE))


def config_files(paths: list[str], read: Any) -> list[str]:
    """A pipeline's configs and vocabularies (:func:`pipeline_files` without weights)."""
    return [
        path
        for path in pipeline_files(paths, read, None)
        if os.path.splitext(path)[1] in CONFIG_SUFFIXES
    ]


class FolderLayout(Layout):
    """One model in one folder with its processor, as ``save_pretrained`` writes it.

    With a built-in model as ``model.id``, a provider left at its default (or set to
    ``"tiny"``) is the built-in's own part (the provider's ``tiny_part``).
    """

    name = "folder"

    def resolve(
        self,
        provider: Provider,
        section: ModelSection,
        *,
        base_dir: Path,
        models_dir: Path,
        hash_memo: Path | None,
    ) -> ResolvedModel:
        model_id, key, what = getattr(section, provider.name), provider.field, provider.name
        if model_id == TINY_ID or (section.id in TINY_VARIANTS and model_id == provider.default):
            return ResolvedModel(ModelSpec(TINY_ID), None, {"tiny": tiny_identity()}, {}, key)
        spec = ModelSpec(model_id)
        folder = local_path(model_id, Path(base_dir))
        if folder is None:
            hub = resolve_hub(
                model_id,
                None,
                lambda paths, read: provider.files(paths, read, None),
                key=key,
                what=what,
                otherwise=provider.offline_hint,
                hash_memo=hash_memo,
            )
            identity = {"repo": model_id, "commit": hub.commit, "files": hub.files}
            return ResolvedModel(spec, hub.snapshot, identity, {}, key)
        if not (folder / "config.json").is_file():
            raise ModelUnavailableError(
                f"{what} '{model_id}' has no config.json",
                key=key,
                hint="use a folder as transformers' save_pretrained writes it, or a hub id",
            )
        files = provider.files(folder_paths(folder), folder_reader(folder, key), None)
        identity = {"files": hash_files(folder, files, hash_memo)}
        return ResolvedModel(spec, folder, identity, {}, key)

    def config_file(self, component: str) -> str:
        return "config.json"

    def download_patterns(self, spec: ModelSpec) -> tuple[list[str], list[str] | None]:
        return _FOLDER_PATTERNS, None


PIPELINE = PipelineLayout()
FOLDER = FolderLayout()
