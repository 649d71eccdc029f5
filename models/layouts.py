"""Layouts: how a model's files are arranged, and so how a reference to it is pinned down.

A diffusers pipeline keeps ``model_index.json`` and one subfolder per component
(:data:`PIPELINE`); a helper model (a BLIP captioner, a CLIP, a ControlNet) is one model in
one folder with its ``config.json`` at the top (:data:`FOLDER`). A layout resolves a
provider's recipe field into a :class:`ResolvedModel` by reading configs and published hashes
only, says where a component's config lies, and what a hub download fetches. Nothing here
loads or downloads weights.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from editflow.errors import ModelUnavailableError
from editflow.models.identity import folder_paths, folder_reader, hash_files, resolve_hub
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
        spec = ModelSpec(getattr(section, provider.name), section.revision, section.variant)
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
