"""Loading: each declared component on first use, once, through ``from_pretrained``.

:class:`ModelRegistry` holds ONE resolved model's loaded parts; :class:`RunModels` holds one
registry per provider for a run; a stage sees a :class:`StageModels` view that loads only the
components its kind declared. Loading goes through the ordinary ``from_pretrained`` of
diffusers or transformers, restricted to an allow-list of classes, never with remote code.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

from editflow.errors import ModelUnavailableError
from editflow.models.identity import (
    hub_cache_dir,
    hub_offline,
    is_component,
    quiet_libraries,
    read_json_file,
)
from editflow.models.providers import ResolvedModel
from editflow.models.specs import ComponentSpec
from editflow.models.tiny import TINY_VARIANTS, ensure_tiny

if TYPE_CHECKING:
    import torch

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

# What a hub download fetches for a pipeline: configs, vocabularies and safetensors weights.
# Pickled .bin weights are never downloaded.
_HUB_ALLOW_PATTERNS = ["model_index.json", "*/*.json", "*/*.txt", "*/*.model", "*/*.safetensors"]
_SINGLE_FOLDER_PATTERNS = ["*.json", "*.txt", "*.safetensors"]
_HUB_VARIANTS = ("fp16", "bf16", "fp32", "ema", "non_ema")
SCHEDULER_CONFIG = "scheduler_config"
# The components model.compile compiles.
DENOISERS = frozenset({"UNet2DConditionModel", "UNet2DModel"})


class ReadOnlyDict(dict):
    """A dict that refuses changes.

    Not a ``MappingProxyType``: diffusers' ``from_config`` treats anything that is not a
    ``dict`` as a path to load from. Copies (``dict(d)``, ``copy.copy``) are plain dicts.
    """

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("this config is read-only; change a copy made with dict(...)")

    __setitem__ = __delitem__ = __ior__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse

    def __copy__(self) -> dict[str, Any]:
        return dict(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:
        return copy.deepcopy(dict(self), memo)

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt through dict.__init__ (which bypasses __setitem__), e.g. for Ray workers.
        return (type(self), (dict(self),))


class ModelRegistry:
    """Holds the loaded components of ONE model for one run; loads each lazily, once.

    Attributes:
        resolved: The model.
        device: Where modules are moved after loading.
        dtype: The dtype of every module (tokenizers and processors have none).
        loads: Component names in the order they were loaded.
    """

    def __init__(
        self,
        resolved: ResolvedModel,
        *,
        device: torch.device,
        dtype: torch.dtype,
        models_dir: Path,
        on_load: Callable[[str, float], None] | None = None,
    ) -> None:
        """Create an empty registry; nothing is built, downloaded or loaded until :meth:`get`.

        Args:
            resolved: The model, from :func:`editflow.models.resolve_providers`.
            device: Where modules are moved after loading.
            dtype: The dtype modules are loaded in.
            models_dir: Where ``tiny`` is built when it is first needed.
            on_load: Called with (component, seconds) after each load.
        """
        self.resolved = resolved
        self.device = device
        self.dtype = dtype
        self.loads: list[str] = []
        self._models_dir = Path(models_dir)
        self._on_load = on_load
        self._folder = resolved.folder
        self._components: dict[str, Any] = {}
        self._scheduler_config = ReadOnlyDict(copy.deepcopy(resolved.scheduler_config))
        # Stages may run in threads; the lock makes "once" hold for them too.
        self._lock = threading.Lock()

    @property
    def scheduler_config(self) -> Mapping[str, Any]:
        """The model's scheduler config, read-only: ``SchedulerClass.from_config(it)``."""
        return self._scheduler_config

    @property
    def folder(self) -> Path:
        """The model's folder: ``tiny`` is built, a hub model downloaded, on first access."""
        if self._folder is None:
            if self.resolved.spec.id in TINY_VARIANTS:
                built = ensure_tiny(self._models_dir, self.resolved.spec.id)
                layout = self.resolved.layout  # a helper model is a folder inside tiny's
                self._folder = built if layout == "pipeline" else built / layout
            else:
                self._folder = self._download()
        return self._folder

    def _download(self) -> Path:
        """Fetch the resolved commit of a hub model (weights are fetched only here)."""
        from huggingface_hub import snapshot_download

        spec, identity = self.resolved.spec, self.resolved.identity
        if self.resolved.layout == "pipeline":
            allow = _HUB_ALLOW_PATTERNS
            ignore = [f"*/*.{name}[.-]*" for name in _HUB_VARIANTS if name != spec.variant]
        else:
            allow, ignore = _SINGLE_FOLDER_PATTERNS, None
        try:
            return Path(
                snapshot_download(
                    spec.id,
                    revision=identity["commit"],
                    cache_dir=hub_cache_dir(),
                    local_files_only=hub_offline(),
                    allow_patterns=allow,
                    ignore_patterns=ignore,
                )
            )
        except Exception as error:  # huggingface_hub raises many types for one cause
            raise ModelUnavailableError(
                f"'{spec.id}' could not be downloaded: {str(error).splitlines()[0]}",
                key=self.resolved.provider,
                hint=f"run 'hf download {spec.id} --revision {identity['commit']}'",
            ) from None

    def get(self, component: str) -> Any:
        """Return a component (``unet``, ``vae``, ``text_encoder``, ``tokenizer`` ...).

        Loaded on the first call through ``from_pretrained`` of the class named in
        ``model_index.json`` (modules moved to the device, in eval mode, without gradients);
        later calls return the same object. ``scheduler_config`` is the read-only config.

        Raises:
            ModelUnavailableError: The model has no such component, names a class outside
                :data:`ALLOWED_CLASSES`, or its files cannot be loaded.
        """
        if component == SCHEDULER_CONFIG:
            return self._scheduler_config
        quiet_libraries()
        with self._lock:
            if component in self._components:
                return self._components[component]
            start = time.perf_counter()
            loaded = self._load(component)
            self._components[component] = loaded
            self.loads.append(component)
        if self._on_load is not None:
            self._on_load(component, time.perf_counter() - start)
        return loaded

    def _load(self, component: str) -> Any:
        import torch

        if component == "scheduler":
            # Schedulers hold per-run state (set_timesteps), so one shared instance is a bug.
            raise ValueError("build schedulers from ModelRegistry.scheduler_config instead")
        if self.resolved.layout == "controlnet":
            return self._load_controlnet()
        if self.resolved.layout != "pipeline":
            return self._load_single_folder(self.resolved.layout)
        folder = self.folder
        library, class_name = _component_class(folder, component, self.resolved.spec.id)
        cls = getattr(importlib.import_module(library), class_name)
        kwargs: dict[str, Any] = {"subfolder": component, "local_files_only": True}
        is_module = isinstance(cls, type) and issubclass(cls, torch.nn.Module)
        if is_module:
            kwargs["torch_dtype" if library == "diffusers" else "dtype"] = self.dtype
            if self.resolved.spec.variant is not None:
                kwargs["variant"] = self.resolved.spec.variant
            if library == "diffusers" and importlib.util.find_spec("accelerate") is None:
                kwargs["low_cpu_mem_usage"] = False  # the default, minus a warning per load
        try:
            loaded = cls.from_pretrained(folder, **kwargs)
        except OSError as error:
            raise ModelUnavailableError(
                f"model '{self.resolved.spec.id}': cannot load '{component}': "
                f"{str(error).splitlines()[0]}",
                key=self.resolved.provider,
            ) from None
        if is_module:
            loaded = loaded.to(self.device)
            loaded.eval()
            loaded.requires_grad_(False)
            if self.resolved.compiled and class_name in DENOISERS:
                # Channels-last feeds the convolutions' fast kernels; compile fuses the rest.
                loaded = torch.compile(loaded.to(memory_format=torch.channels_last))
        return loaded

    def _load_controlnet(self) -> Any:
        """A diffusers ``ControlNetModel`` kept in one folder."""
        from diffusers import ControlNetModel

        kwargs: dict[str, Any] = {"torch_dtype": self.dtype, "local_files_only": True}
        if importlib.util.find_spec("accelerate") is None:
            kwargs["low_cpu_mem_usage"] = False
        try:
            model = ControlNetModel.from_pretrained(self.folder, **kwargs)
        except OSError as error:
            raise ModelUnavailableError(
                f"controlnet '{self.resolved.spec.id}' cannot be loaded: "
                f"{str(error).splitlines()[0]}",
                key=self.resolved.provider,
            ) from None
        return model.to(self.device).eval().requires_grad_(False)

    def _load_single_folder(self, layout: str) -> ModelWithProcessor:
        """A transformers model and its processor from one folder (a captioner, a CLIP)."""
        import transformers

        model_class, processor_class = SINGLE_FOLDER_CLASSES[layout]
        folder = self.folder
        try:
            model = getattr(transformers, model_class).from_pretrained(
                folder, dtype=self.dtype, local_files_only=True
            )
            processor = getattr(transformers, processor_class).from_pretrained(
                folder, local_files_only=True
            )
        except OSError as error:
            raise ModelUnavailableError(
                f"{layout} '{self.resolved.spec.id}' cannot be loaded: "
                f"{str(error).splitlines()[0]}",
                key=self.resolved.provider,
            ) from None
        model = model.to(self.device).eval().requires_grad_(False)
        return ModelWithProcessor(model, processor)


class RunModels:
    """The models of one run: one :class:`ModelRegistry` per provider, made on first use.

    May be shared between runs whose resolved models are the same (``figures``, tests).
    """

    def __init__(
        self,
        resolved: Mapping[str, ResolvedModel],
        *,
        device: torch.device,
        dtype: torch.dtype,
        models_dir: Path,
        on_load: Callable[[str, float], None] | None = None,
    ) -> None:
        self.resolved = dict(resolved)
        self.device, self.dtype = device, dtype
        self.models_dir = Path(models_dir)
        self.on_load = on_load
        self.registries: dict[str, ModelRegistry] = {}

    def serves(self, resolved: Mapping[str, ResolvedModel], dtype: torch.dtype) -> bool:
        """Whether these models can stand in for ``resolved`` (same identities and dtype)."""
        return dtype == self.dtype and all(
            provider in self.resolved
            and self.resolved[provider].fingerprint() == model.fingerprint()
            for provider, model in resolved.items()
        )

    def add(self, resolved: Mapping[str, ResolvedModel]) -> None:
        """Take on providers a later run resolved that this one had not."""
        for provider, model in resolved.items():
            self.resolved.setdefault(provider, model)

    def registry(self, provider: str) -> ModelRegistry:
        if provider not in self.registries:
            self.registries[provider] = ModelRegistry(
                self.resolved[provider],
                device=self.device,
                dtype=self.dtype,
                models_dir=self.models_dir,
                on_load=self.on_load,
            )
        return self.registries[provider]

    @property
    def loads(self) -> list[str]:
        """``provider:component`` for every component loaded so far."""
        return [f"{p}:{name}" for p, registry in self.registries.items() for name in registry.loads]

    def for_stage(self, specs: Iterable[ComponentSpec]) -> StageModels:
        return StageModels(self, specs)


class StageModels:
    """What a running stage sees: exactly the components its kind declared, loaded lazily."""

    def __init__(self, models: RunModels, specs: Iterable[ComponentSpec]) -> None:
        self._models = models
        self._specs = {spec.name: spec for spec in specs}

    def get(self, component: str) -> Any:
        spec = self._specs.get(component)
        if spec is None:  # a stage bug: its declaration and its code disagree
            raise KeyError(
                f"component {component!r} was not declared by this stage "
                f"(declared: {', '.join(sorted(self._specs)) or 'none'})"
            )
        return self._models.registry(spec.provider).get(component)

    @property
    def scheduler_config(self) -> Mapping[str, Any]:
        """The model's scheduler config (declare ``SCHEDULER_CONFIG``), read-only."""
        return self.get(SCHEDULER_CONFIG)


class ModelWithProcessor(NamedTuple):
    """A transformers model and its processor (a BLIP captioner, a CLIP)."""

    model: Any
    processor: Any


Captioner = ModelWithProcessor
# The helper models kept in one folder: layout -> (model class, processor class).
SINGLE_FOLDER_CLASSES: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "captioner": ("BlipForConditionalGeneration", "BlipProcessor"),
        "clip": ("CLIPModel", "CLIPProcessor"),
    }
)


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
