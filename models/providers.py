"""Providers: the recipe fields that say which model supplies a stage's declared components.

``model.id`` provides the diffusion pipeline's parts (UNet, VAE, text encoder, tokenizer,
scheduler config); ``model.captioner`` a BLIP captioner, ``model.clip`` a CLIP scorer,
``model.controlnet`` a ControlNet. Each is one :class:`Provider` in :data:`PROVIDER_TABLE`:
its field and default, its layout (how it resolves), the files that identify it, how it loads
and which part of the built-in ``tiny`` provides it. A new kind of part is one entry there
(plus its field in :class:`~editflow.models.section.ModelSection` and its part in ``tiny``).

Resolving turns a field into a :class:`ResolvedModel` (folder, identity for cache keys) from
configs and published hashes only: nothing here loads or downloads weights. Loading is
:class:`editflow.models.registry.ModelRegistry`'s job, on first use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from editflow.errors import ModelUnavailableError
from editflow.models.adapters import with_adapters
from editflow.models.identity import pipeline_files, read_json_file, single_folder_files
from editflow.models.layouts import FOLDER, PIPELINE, Layout
from editflow.models.loading import load_controlnet, load_pipeline_part, load_with_processor
from editflow.models.references import TINY_ID, ModelSpec, ResolvedModel, local_path, models_dir
from editflow.models.section import (
    DEFAULT_CAPTIONER,
    DEFAULT_CLIP,
    DEFAULT_CONTROLNET,
    ModelSection,
)
from editflow.models.tiny import (
    TINY_LPIPS,
    TINY_VARIANTS,
    TinyComponent,
    ensure_tiny,
    ensure_tiny_lpips,
    jsonable,
    tiny_lpips_folder_name,
    tiny_lpips_identity,
)

if TYPE_CHECKING:
    from editflow.models.registry import ModelRegistry

__all__ = [
    "CAPTIONER",
    "CLIP",
    "CONTROLNET",
    "LPIPS",
    "MODEL",
    "PROVIDERS",
    "PROVIDER_TABLE",
    "TINY_ID",
    "CaptionerProvider",
    "ModelSpec",
    "Provider",
    "ResolvedModel",
    "component_config",
    "has_component",
    "local_path",
    "models_dir",
    "resolve_model",
    "resolve_providers",
]

# (relative paths, a reader of the model's JSON files, the weights variant) -> the files
# that identify the model, in order.
FileSelector = Callable[[list[str], Callable[[str], dict[str, Any] | None], str | None], list[str]]


@dataclass(frozen=True)
class Provider:
    """One recipe field that provides model components, with all that differs between fields.

    Attributes:
        field: The recipe key (``model.captioner``); a :class:`ComponentSpec` names it.
        default: The field's default in the recipe schema. With a built-in ``model.id``, a
            helper left at its default is the built-in's own part.
        layout: How the model's files are arranged, and so how it resolves and downloads.
        files: Chooses the files that identify the model (hashed when local, their published
            hashes read from the Hub).
        load: Loads one component: ``load(registry, component)``.
        tiny_part: The component of the built-in ``tiny`` that provides it; ``None`` when
            the built-in model is the provider's whole model (``model.id``).
        offline_hint: How the hint ends when a hub model is unavailable.
    """

    field: str
    default: str | None
    layout: Layout
    files: FileSelector
    load: Callable[[ModelRegistry, str], Any]
    tiny_part: str | None
    offline_hint: str

    @property
    def name(self) -> str:
        """The field inside ``[model]`` (``captioner``); also what error messages call it."""
        return self.field.removeprefix("model.")

    def resolve(
        self, section: ModelSection, *, base_dir: Path, models_dir: Path, hash_memo: Path | None
    ) -> ResolvedModel:
        """Pin down the model this field of ``section`` names (see :meth:`Layout.resolve`)."""
        return self.layout.resolve(
            self, section, base_dir=base_dir, models_dir=models_dir, hash_memo=hash_memo
        )

    def tiny_component(self, variant: str, component: str) -> TinyComponent:
        """The built-in part that provides ``component`` when the recipe names ``variant``."""
        if self.tiny_part is None:
            return TINY_VARIANTS[variant].components[component]
        return TINY_VARIANTS[TINY_ID].components[self.tiny_part]  # helpers are tiny's own

    def tiny_folder(self, models_dir: Path, variant: str) -> Path:
        """The built-in model's folder for this provider, built first when missing."""
        built = ensure_tiny(models_dir, variant)
        return built if self.tiny_part is None else built / self.tiny_part


class CaptionerProvider(Provider):
    """A BLIP captioner's provider: it also answers what the captioner's text has room for."""

    def prompt_tokens(self, model: ResolvedModel, prompt: str) -> int | None:
        """Positions a captioner's prompt takes before the caption (its tokens after the
        start token), from its tokenizer files alone; None when they are not on disk."""
        if model.spec.id in TINY_VARIANTS:
            from editflow.models.tiny import captioner_tokenizer

            tokenizer = captioner_tokenizer()
        elif model.folder is not None and (model.folder / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model.folder, local_files_only=True)
        else:
            return None
        return len(tokenizer(prompt, verbose=False).input_ids) - 1

    def text_positions(self, model: ResolvedModel) -> int | None:
        """A captioner's text decoder positions, from its config (None when unknown)."""
        if model.spec.id in TINY_VARIANTS:
            text = self.tiny_component(model.spec.id, "captioner").config["text"]
            return int(text["max_position_embeddings"])
        config = model.folder / "config.json" if model.folder is not None else None
        if config is None or not config.is_file():
            return None
        text = read_json_file(config, model.provider).get("text_config") or {}
        return text.get("max_position_embeddings")


class LpipsProvider(Provider):
    """LPIPS's network: a folder or hub id (:mod:`editflow.models.lpips`), or the built-in
    random one, which has its own identity and folder (``tiny``'s would change every key)."""

    def resolve(
        self, section: ModelSection, *, base_dir: Path, models_dir: Path, hash_memo: Path | None
    ) -> ResolvedModel:
        model_id = section.lpips
        if model_id == TINY_ID or (model_id is None and section.id in TINY_VARIANTS):
            built = Path(models_dir) / tiny_lpips_folder_name()
            folder = built if (built / "model.safetensors").is_file() else None
            identity = {"tiny_lpips": tiny_lpips_identity()}
            return ResolvedModel(ModelSpec(TINY_ID), folder, identity, {}, self.field)
        if model_id is None:
            raise ModelUnavailableError(
                "metric.lpips needs an LPIPS network, and model.id is not a built-in model",
                key=self.field,
                hint="set model.lpips to a folder holding config.json and model.safetensors"
                " (docs/metrics.md shows how to convert the published weights), or 'tiny'"
                " for the built-in random network",
            )
        folder = local_path(model_id, Path(base_dir))
        if folder is not None and not (folder / "config.json").is_file():
            missing = "does not exist" if not folder.exists() else "has no config.json"
            raise ModelUnavailableError(
                f"lpips folder '{model_id}' {missing}",
                key=self.field,
                hint=f"looked for {folder}; an LPIPS folder holds config.json and"
                " model.safetensors (docs/metrics.md)",
            )
        return super().resolve(
            section, base_dir=base_dir, models_dir=models_dir, hash_memo=hash_memo
        )

    def tiny_component(self, variant: str, component: str) -> TinyComponent:
        return TINY_LPIPS

    def tiny_folder(self, models_dir: Path, variant: str) -> Path:
        return ensure_tiny_lpips(models_dir)


def _load_lpips(registry: ModelRegistry, component: str) -> Any:
    from editflow.models.lpips import load_lpips  # imports torch: only when loading

    return load_lpips(registry, component)


def _folder_files(paths: list[str], read: Any, variant: str | None) -> list[str]:
    return single_folder_files(paths)  # a helper folder has no weight variants


# ---------------------------------------------------------------------------------------
# The provider table

MODEL = Provider(
    field="model.id",
    default=TINY_ID,
    layout=PIPELINE,
    files=pipeline_files,
    load=load_pipeline_part,
    tiny_part=None,
    offline_hint="or set model.id to a local folder",
)
CAPTIONER = CaptionerProvider(
    field="model.captioner",
    default=DEFAULT_CAPTIONER,
    layout=FOLDER,
    files=_folder_files,
    load=partial(load_with_processor, "BlipForConditionalGeneration", "BlipProcessor"),
    tiny_part="captioner",
    offline_hint="give the caption in the recipe, or set model.captioner to a local folder",
)
CLIP = Provider(
    field="model.clip",
    default=DEFAULT_CLIP,
    layout=FOLDER,
    files=_folder_files,
    load=partial(load_with_processor, "CLIPModel", "CLIPProcessor"),
    tiny_part="clip",
    offline_hint="or set model.clip to a local folder",
)
CONTROLNET = Provider(
    field="model.controlnet",
    default=DEFAULT_CONTROLNET,
    layout=FOLDER,
    files=_folder_files,
    load=load_controlnet,
    tiny_part="controlnet",
    offline_hint="or set model.controlnet to a local folder",
)

LPIPS = LpipsProvider(
    field="model.lpips",
    default=None,
    layout=FOLDER,
    files=_folder_files,
    load=_load_lpips,
    tiny_part="lpips",
    offline_hint="or set model.lpips to a local folder",
)

PROVIDER_TABLE: tuple[Provider, ...] = (MODEL, CAPTIONER, CLIP, CONTROLNET, LPIPS)
PROVIDERS: Mapping[str, Provider] = MappingProxyType({p.field: p for p in PROVIDER_TABLE})
if len(PROVIDERS) != len(PROVIDER_TABLE):
    raise ImportError("PROVIDER_TABLE names a field twice")


def resolve_providers(
    section: ModelSection, providers: Iterable[str], *, base_dir: Path, models_dir: Path
) -> dict[str, ResolvedModel]:
    """Resolve each named provider (``model.id`` ...) of a recipe's ``[model]`` table.

    Raises:
        ModelUnavailableError: A model cannot be found; every unavailable one is listed.
    """
    resolved: dict[str, ResolvedModel] = {}
    problems = []
    for field in sorted(set(providers)):
        if field not in PROVIDERS:
            raise KeyError(f"no provider {field!r}; known: {sorted(PROVIDERS)}")  # a stage bug
        try:
            resolved[field] = PROVIDERS[field].resolve(
                section,
                base_dir=base_dir,
                models_dir=models_dir,
                hash_memo=Path(models_dir) / "file-hashes.json",
            )
            resolved[field] = with_adapters(  # model.id's LoRA files and embeddings
                resolved[field],
                section,
                base_dir=base_dir,
                hash_memo=Path(models_dir) / "file-hashes.json",
            )
        except ModelUnavailableError as error:
            problems += error.problems
    if problems:
        raise ModelUnavailableError(problems=problems)
    return resolved


def resolve_model(
    spec: ModelSpec, *, base_dir: Path, models_dir: Path, hash_memo: Path | None
) -> ResolvedModel:
    """Pin down the diffusion model a spec names (``model.id``); reads configs and hashes,
    loads no weights.

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
    return PIPELINE.resolve_spec(
        MODEL, spec, base_dir=base_dir, models_dir=models_dir, hash_memo=hash_memo
    )


def component_config(model: ResolvedModel, component: str) -> dict[str, Any] | None:
    """A model part's ``config.json`` (``unet`` of a pipeline, or a one-folder model's own),
    from the built-in table or the files on disk; ``None`` when it is not on disk yet or the
    model has no such part (a pixel-space model's ``vae``)."""
    provider = PROVIDERS[model.provider]
    if model.spec.id in TINY_VARIANTS:
        if model.provider == "model.id" and not has_component(model, component):
            return None
        return jsonable(provider.tiny_component(model.spec.id, component).config)
    if model.folder is None:
        return None
    path = model.folder / provider.layout.config_file(component)
    return read_json_file(path, model.provider) if path.is_file() else None


def has_component(model: ResolvedModel, component: str) -> bool:
    """Whether a pipeline has a part (``vae`` ...), from its identity: the built-in table or
    the files that identify it; nothing is read or loaded."""
    if model.spec.id in TINY_VARIANTS:
        return component in TINY_VARIANTS[model.spec.id].components
    # A single-file checkpoint's parts are those its configs (model.config) describe.
    files = model.identity.get("files") or model.identity.get("config", {}).get("files", {})
    return any(path.startswith(f"{component}/") for path in files)
