"""Loading: each declared component on first use, once, through ``from_pretrained``.

:class:`ModelRegistry` holds ONE resolved model's loaded parts; :class:`RunModels` holds one
registry per provider for a run; a stage sees a :class:`StageModels` view that loads only the
components its kind declared. Each component loads through its provider's loader
(:mod:`editflow.models.loading`): the ordinary ``from_pretrained`` of diffusers or
transformers, restricted to an allow-list of classes, never with remote code. The model's
LoRA files and textual-inversion embeddings (:mod:`editflow.models.adapters`) are applied as
a part loads; they are part of the model's fingerprint, so a model with other adapters, or
none, is held by another registry and never sees them.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from editflow.errors import ModelUnavailableError
from editflow.models.adapters import apply_adapters, needs_pair
from editflow.models.identity import hub_cache_dir, hub_offline, quiet_libraries
from editflow.models.loading import Captioner as Captioner
from editflow.models.loading import ModelWithProcessor as ModelWithProcessor
from editflow.models.providers import PROVIDERS, ResolvedModel
from editflow.models.specs import ComponentSpec
from editflow.models.tiny import TINY_VARIANTS

if TYPE_CHECKING:
    import torch

SCHEDULER_CONFIG = "scheduler_config"


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
        provider: Its entry in the provider table: how its components load.
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
        self.provider = PROVIDERS[resolved.provider]
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
                self._folder = self.provider.tiny_folder(self._models_dir, self.resolved.spec.id)
            else:
                self._folder = self._download()
        return self._folder

    def _download(self) -> Path:
        """Fetch the resolved commit of a hub model (weights are fetched only here)."""
        from huggingface_hub import snapshot_download

        spec, identity = self.resolved.spec, self.resolved.identity
        allow, ignore = self.provider.layout.download_patterns(spec)
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
        ``model_index.json`` (modules moved to the device, in eval mode, without gradients),
        with the model's LoRA files fused and its embeddings' tokens added (the tokenizer and
        text encoder then load together); later calls return the same object. ``scheduler_config`` is the read-only config.

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
        if component == "scheduler":
            # Schedulers hold per-run state (set_timesteps), so one shared instance is a bug.
            raise ValueError("build schedulers from ModelRegistry.scheduler_config instead")
        if not self.resolved.adapters:
            return self.provider.load(self, component)
        # LoRA files and embeddings change the parts as they load, never a part that was
        # handed out: a model with other adapters (or none) is another registry's.
        parts = {component: self.provider.load(self, component)}
        partner = needs_pair(self.resolved, component)
        if partner is not None:  # a new token's id and its embedding row are made together
            parts[partner] = self.provider.load(self, partner)
        apply_adapters(self.resolved, parts)
        if partner is not None:
            self._components[partner] = parts[partner]
            self.loads.append(partner)
        return parts[component]


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

    def for_stage(
        self,
        specs: Iterable[ComponentSpec],
        loading: Callable[[str], AbstractContextManager[Any]] | None = None,
    ) -> StageModels:
        return StageModels(self, specs, loading)


class StageModels:
    """What a running stage sees: exactly the components its kind declared, loaded lazily.

    ``loading(component)``: a context entered around a component's first load (the engine
    says 'loading' and names the stage: imports and weights take seconds before a step)."""

    def __init__(
        self,
        models: RunModels,
        specs: Iterable[ComponentSpec],
        loading: Callable[[str], AbstractContextManager[Any]] | None = None,
    ) -> None:
        self._models = models
        self._specs = {spec.name: spec for spec in specs}
        self._loading = loading

    def get(self, component: str) -> Any:
        spec = self._specs.get(component)
        if spec is None:  # a stage bug: its declaration and its code disagree
            raise KeyError(
                f"component {component!r} was not declared by this stage "
                f"(declared: {', '.join(sorted(self._specs)) or 'none'})"
            )
        registry = self._models.registry(spec.provider)
        if self._loading is None or component in registry.loads:
            return registry.get(component)
        with self._loading(component):
            return registry.get(component)

    @property
    def scheduler_config(self) -> Mapping[str, Any]:
        """The model's scheduler config (declare ``SCHEDULER_CONFIG``), read-only."""
        return self.get(SCHEDULER_CONFIG)
