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
import logging
import pickle
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

from editflow.errors import ModelUnavailableError
from editflow.models.identity import is_component, read_json_file
from editflow.models.pickle_scan import refused

if TYPE_CHECKING:
    from editflow.models.references import ResolvedModel
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
    """One component of a diffusers pipeline, of the class its ``model_index.json`` names
    (from a single-file checkpoint when the model is one)."""
    import torch

    if registry.resolved.checkpoint is not None:
        return load_single_file_part(registry, component)
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
    return _ready(loaded, registry, class_name) if is_module else loaded


def _ready(module: Any, registry: ModelRegistry, class_name: str) -> Any:
    """A loaded module on the registry's device, in eval mode, without gradients (compiled
    when the recipe asks and it is the denoiser)."""
    import torch

    module = module.to(registry.device)
    module.eval()
    module.requires_grad_(False)
    if registry.resolved.compiled and class_name in DENOISERS:
        # Channels-last feeds the convolutions' fast kernels; compile fuses the rest.
        module = torch.compile(module.to(memory_format=torch.channels_last))
    return module


# ---------------------------------------------------------------------------------------
# Single-file checkpoints

# Where each class's tensors lie in an original (LDM) Stable Diffusion checkpoint, by name
# prefix (the prefixes diffusers' single_file_utils converts from): a load reads only these.
LDM_PREFIXES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "UNet2DConditionModel": ("model.diffusion_model.",),
        "AutoencoderKL": ("first_stage_model.", "vae."),
        "CLIPTextModel": ("cond_stage_model.", "conditioner.embedders."),
        "CLIPTextModelWithProjection": ("cond_stage_model.", "conditioner.embedders."),
    }
)


def load_single_file_part(registry: ModelRegistry, component: str) -> Any:
    """One component of a single-file checkpoint, through diffusers' single-file loading.

    The class and config come from the config folder (``model.config``, its
    ``model_index.json`` checked against :data:`ALLOWED_CLASSES`); the weights only from the
    checkpoint, converted from the original layout by ``from_single_file`` (diffusers models)
    or ``create_diffusers_clip_model_from_ldm`` (the CLIP text encoder). Tokenizers are
    configs and vocabularies, loaded from the config folder.
    """
    import torch

    folder, resolved = registry.folder, registry.resolved
    library, class_name = _component_class(folder, component, resolved.spec.id)
    cls = getattr(importlib.import_module(library), class_name)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        return cls.from_pretrained(folder, subfolder=component, local_files_only=True)
    missing = ModelUnavailableError(
        f"model '{resolved.spec.id}': the checkpoint holds no weights for '{component}'"
        f" ({class_name})",
        key=resolved.provider,
        hint="editflow reads UNet, VAE and CLIP text encoder weights in the original Stable"
        " Diffusion layout from a single file",
    )
    if class_name not in LDM_PREFIXES or resolved.checkpoint is None:
        raise missing
    checkpoint = read_checkpoint(resolved.checkpoint, LDM_PREFIXES[class_name], resolved)
    incomplete = ModelUnavailableError(
        f"model '{resolved.spec.id}': the checkpoint lacks some of the '{component}' tensors"
        " its config calls for",
        key=resolved.provider,
        hint="check that model.config describes this checkpoint",
    )
    try:
        model = _from_single_file(cls, checkpoint, folder, component, registry.dtype)
    except NotImplementedError as error:
        # A tensor the checkpoint lacks stays on accelerate's meta device, which cannot
        # be moved: never fill it with anything else.
        if "meta tensor" not in str(error):
            raise
        raise incomplete from None
    except ValueError as error:  # a tensor's shape differs from what the config builds
        raise ModelUnavailableError(
            f"model '{resolved.spec.id}': the checkpoint does not fit the '{component}' config:"
            f" {' '.join(_first_line(error).split('. ')[0].split())}",
            key=resolved.provider,
            hint="check that model.config describes this checkpoint",
        ) from None
    if model is None:
        raise missing
    if any(tensor.is_meta for tensor in model.state_dict().values()):
        raise incomplete  # the text encoder is not moved while loading: same check here
    return _ready(model, registry, class_name)


def _from_single_file(
    cls: type, checkpoint: dict[str, Any], folder: Path, component: str, dtype: Any
) -> Any | None:
    """A module of class ``cls`` from an original-layout state dict, with its config from
    ``folder/component``; ``None`` when the checkpoint holds no weights for it."""
    from diffusers.loaders.single_file_model import FromOriginalModelMixin
    from diffusers.loaders.single_file_utils import (
        SingleFileComponentError,
        create_diffusers_clip_model_from_ldm,
        is_clip_model_in_single_file,
    )

    if not checkpoint:
        return None
    kwargs: dict[str, Any] = {
        "config": str(folder),
        "subfolder": component,
        "torch_dtype": dtype,
        "local_files_only": True,
    }
    if issubclass(cls, FromOriginalModelMixin):
        try:
            with _without_empty_float32_warning():
                return cls.from_single_file(checkpoint, **kwargs)
        except SingleFileComponentError:
            return None
    if is_clip_model_in_single_file(cls, checkpoint):
        return create_diffusers_clip_model_from_ldm(cls, checkpoint, **kwargs)
    return None


@contextmanager
def _without_empty_float32_warning() -> Iterator[None]:
    """Drop diffusers' warning about modules to keep in float32 when there are none.

    ``from_single_file`` casts with ``.to(dtype)``, and diffusers then warns "There are
    modules in ... that should be kept in float32: []" on every load: noise in progress.
    """
    logger = logging.getLogger("diffusers.models.modeling_utils")

    def keep(record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def read_checkpoint(
    path: Path, prefixes: tuple[str, ...], resolved: ResolvedModel
) -> dict[str, Any]:
    """The tensors of a single-file checkpoint whose names start with one of ``prefixes``.

    A safetensors file is read tensor by tensor, only those asked for. A pickled PyTorch
    checkpoint is read only through ``torch.load(weights_only=True)``, which rebuilds tensors
    and plain containers and refuses anything else: a checkpoint can never run code here.

    Raises:
        ModelUnavailableError: The file cannot be read, or holds objects other than tensors.
    """
    import torch

    name, key = resolved.spec.id, resolved.provider
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as tensors:
                return {k: tensors.get_tensor(k) for k in tensors.keys() if k.startswith(prefixes)}
        except Exception as error:  # safetensors raises its own SafetensorError, among others
            raise ModelUnavailableError(
                f"cannot read checkpoint '{name}': {_first_line(error)}", key=key
            ) from None
    try:
        state = torch.load(
            path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
        )
    except pickle.UnpicklingError:
        raise refused(name, key) from None
    except (OSError, RuntimeError, EOFError, ValueError) as error:
        raise ModelUnavailableError(
            f"cannot read checkpoint '{name}': {_first_line(error)}", key=key
        ) from None
    # Training checkpoints (PyTorch Lightning) keep the weights under "state_dict".
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelUnavailableError(f"checkpoint '{name}' holds no state dict", key=key)
    return {
        k: tensor
        for k, tensor in state.items()
        if isinstance(k, str) and k.startswith(prefixes) and isinstance(tensor, torch.Tensor)
    }


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


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
