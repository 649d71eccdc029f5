"""Loaders: how one component of a resolved model is loaded, through ``from_pretrained``.

Each provider (:mod:`editflow.models.providers`) names its loader; the registry calls it with
itself (for the folder, device and dtype) and the component's name. Loading goes through the
ordinary ``from_pretrained`` of diffusers or transformers, restricted to an allow-list of
classes, never with remote code. torch and the model libraries are imported here only when a
loader runs: planning must not pay for them.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

from editflow.errors import ModelUnavailableError
from editflow.models.identity import is_component, read_json_file

if TYPE_CHECKING:
    from editflow.models.registry import ModelRegistry

# The only classes model_index.json (or a component config) may name: loading goes through
# importlib, and this list is what keeps a model folder from importing arbitrary code.
ALLOWED_CLASSES: Mapping[str, str] = MappingProxyType(
    {
        "UNet2DConditionModel": "diffusers",
        "UNet2DModel": "diffusers",
        "AutoencoderKL": "diffusers",
        "AutoencoderTiny": "diffusers",
        "ControlNetModel": "diffusers",
        "CLIPTextModel": "transformers",
        "CLIPTextModelWithProjection": "transformers",
        "CLIPVisionModelWithProjection": "transformers",
        "CLIPModel": "transformers",
        "CLIPTokenizer": "transformers",
        "CLIPTokenizerFast": "transformers",
        "CLIPImageProcessor": "transformers",
        "CLIPProcessor": "transformers",
        "BlipForConditionalGeneration": "transformers",
        "BlipProcessor": "transformers",
    }
)
# The components model.compile compiles.
DENOISERS = frozenset({"UNet2DConditionModel", "UNet2DModel"})


class ModelWithProcessor(NamedTuple):
    """A transformers model and its processor (a BLIP captioner, a CLIP)."""

    model: Any
    processor: Any


Captioner = ModelWithProcessor


def load_pipeline_part(registry: ModelRegistry, component: str) -> Any:
    """One component of a diffusers pipeline, of the class its ``model_index.json`` names."""
    import torch

    folder, resolved = registry.folder, registry.resolved
    library, class_name = _component_class(folder, component, resolved.spec.id)
    cls = getattr(importlib.import_module(library), class_name)
    kwargs: dict[str, Any] = {"subfolder": component, "local_files_only": True}
    is_module = isinstance(cls, type) and issubclass(cls, torch.nn.Module)
    if is_module:
        kwargs["torch_dtype" if library == "diffusers" else "dtype"] = registry.dtype
        if resolved.spec.variant is not None:
            kwargs["variant"] = resolved.spec.variant
        if library == "diffusers" and importlib.util.find_spec("accelerate") is None:
            kwargs["low_cpu_mem_usage"] = False  # the default, minus a warning per load
    try:
        loaded = cls.from_pretrained(folder, **kwargs)
    except OSError as error:
        raise ModelUnavailableError(
            f"model '{resolved.spec.id}': cannot load '{component}': {str(error).splitlines()[0]}",
            key=resolved.provider,
        ) from None
    if is_module:
        loaded = loaded.to(registry.device)
        loaded.eval()
        loaded.requires_grad_(False)
        if resolved.compiled and class_name in DENOISERS:
            # Channels-last feeds the convolutions' fast kernels; compile fuses the rest.
            loaded = torch.compile(loaded.to(memory_format=torch.channels_last))
    return loaded


def load_controlnet(registry: ModelRegistry, component: str) -> Any:
    """A diffusers ``ControlNetModel`` kept in one folder."""
    from diffusers import ControlNetModel

    kwargs: dict[str, Any] = {"torch_dtype": registry.dtype, "local_files_only": True}
    if importlib.util.find_spec("accelerate") is None:
        kwargs["low_cpu_mem_usage"] = False
    try:
        model = ControlNetModel.from_pretrained(registry.folder, **kwargs)
    except OSError as error:
        raise ModelUnavailableError(
            f"controlnet '{registry.resolved.spec.id}' cannot be loaded: "
            f"{str(error).splitlines()[0]}",
            key=registry.resolved.provider,
        ) from None
    return model.to(registry.device).eval().requires_grad_(False)


def load_with_processor(
    model_class: str, processor_class: str, registry: ModelRegistry, component: str
) -> ModelWithProcessor:
    """A transformers model and its processor from one folder (a captioner, a CLIP).

    Providers bind the two class names with ``functools.partial``.
    """
    import transformers

    folder, resolved = registry.folder, registry.resolved
    try:
        model = getattr(transformers, model_class).from_pretrained(
            folder, dtype=registry.dtype, local_files_only=True
        )
        processor = getattr(transformers, processor_class).from_pretrained(
            folder, local_files_only=True
        )
    except OSError as error:
        raise ModelUnavailableError(
            f"{registry.provider.name} '{resolved.spec.id}' cannot be loaded: "
            f"{str(error).splitlines()[0]}",
            key=resolved.provider,
        ) from None
    model = model.to(registry.device).eval().requires_grad_(False)
    return ModelWithProcessor(model, processor)


def _component_class(folder: Path, component: str, model_id: str) -> tuple[str, str]:
    """The (library, class name) of a component, checked against the allow-list."""
    index_path = folder / "model_index.json"
    if index_path.is_file():
        index = read_json_file(index_path)
        available = sorted(name for name, entry in index.items() if is_component(entry))
        entry = index.get(component)
        library, class_name = entry if is_component(entry) else (None, None)
    else:
        available = sorted(path.name for path in folder.iterdir() if path.is_dir())
        class_name = (
            _class_from_configs(folder / component) if (folder / component).is_dir() else None
        )
        if class_name is None and (folder / component).is_dir():
            raise ModelUnavailableError(
                f"model '{model_id}': the config in {component}/ names no class",
                key="model.id",
                hint="add a model_index.json that names each component's class",
            )
        library = ALLOWED_CLASSES.get(class_name or "")
    if class_name is None or not (folder / component).is_dir():
        raise ModelUnavailableError(
            f"model '{model_id}' has no component '{component}'",
            key="model.id",
            hint=f"it has: {', '.join(available) or 'nothing'}",
        )
    if ALLOWED_CLASSES.get(class_name) != library:
        raise ModelUnavailableError(
            f"model '{model_id}': component '{component}' is {library}.{class_name}, "
            "which editflow does not load",
            key="model.id",
            hint=f"editflow loads only: {', '.join(sorted(ALLOWED_CLASSES))}",
        )
    return library, class_name


def _class_from_configs(subfolder: Path) -> str | None:
    """The class a component folder's own config names (for folders without an index)."""
    for name, key in (
        ("config.json", "_class_name"),  # diffusers models
        ("config.json", "architectures"),  # transformers models
        ("tokenizer_config.json", "tokenizer_class"),
        ("preprocessor_config.json", "image_processor_type"),
    ):
        path = subfolder / name
        if path.is_file():
            value = read_json_file(path).get(key)
            if isinstance(value, list) and value:
                value = value[0]
            if isinstance(value, str):
                return value
    return None
