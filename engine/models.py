"""Model references: what a recipe names, what it is (its identity), and lazy loading.

:func:`resolve_model` turns a :class:`ModelSpec` (``tiny``, a local folder or a hub id) into
a :class:`ResolvedModel`: the local folder, a JSON identity for cache keys and the
scheduler config. It reads configs and hashes files but never loads weights, so planning
stays cheap. A :class:`ModelRegistry`, owned by one run, then loads each component on first
use, once, through the ordinary ``from_pretrained`` of diffusers or transformers.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

from editflow.engine.tiny import ensure_tiny, tiny_folder_name, tiny_identity, tiny_scheduler_config
from editflow.errors import ModelUnavailableError

if TYPE_CHECKING:
    import torch

TINY_ID = "tiny"

# Files that make a model what it is. Tokenizer vocabularies (merges.txt, spiece.model)
# change outputs as much as weights do, so they count too.
WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".ckpt", ".pt", ".pth"})
CONFIG_SUFFIXES = frozenset({".json", ".txt", ".model"})

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

# What a hub download fetches: configs, vocabularies and safetensors weights. Pickled .bin
# weights are never downloaded.
_HUB_ALLOW_PATTERNS = ["model_index.json", "*/*.json", "*/*.txt", "*/*.model", "*/*.safetensors"]
_HUB_VARIANTS = ("fp16", "bf16", "fp32", "ema", "non_ema")
# The syntax of "name" or "org/name" on the Hub; anything else can only be a path.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
_SHARD_SUFFIX = re.compile(r"-\d+-of-\d+$")

_HASH_MEMO_VERSION = 1
# A file modified this recently may change again within the same mtime tick (as in git's
# "racy clean" problem), so its hash is used but not memoised.
_RACY_WINDOW_NS = 2_000_000_000


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
        folder: The local folder in the diffusers layout; ``None`` for ``tiny`` until it is
            built.
        identity: JSON-able description of exactly which model this is (for cache keys).
        scheduler_config: The model's ``scheduler/scheduler_config.json`` with its
            ``_class_name`` (bookkeeping keys such as ``_diffusers_version`` dropped: the
            library version enters keys separately); empty when the model has none.
    """

    spec: ModelSpec
    folder: Path | None
    identity: dict[str, Any]
    scheduler_config: dict[str, Any]


def resolve_model(
    spec: ModelSpec, *, base_dir: Path, models_dir: Path, hash_memo: Path | None
) -> ResolvedModel:
    """Pin down the model a recipe names; reads configs and hashes files, loads no weights.

    Args:
        spec: The recipe's model reference.
        base_dir: The recipe's folder; relative paths in ``spec.id`` start there.
        models_dir: Where built-in models (``tiny``) live.
        hash_memo: A JSON file memoising file hashes by (path, size, mtime), so that big
            weights are hashed once; ``None`` hashes every time.

    Returns:
        The resolved model.

    Raises:
        ModelUnavailableError: The folder does not exist or is not a model, or a hub model
            is not downloaded and cannot be (offline), or does not exist.
    """
    if spec.id == TINY_ID:
        if spec.revision is not None or spec.variant is not None:
            raise ModelUnavailableError(
                "the built-in model 'tiny' has no revisions or variants",
                key="model.revision" if spec.revision is not None else "model.variant",
                hint="remove the key, or name a hub model or a local folder",
            )
        built = Path(models_dir) / tiny_folder_name()
        return ResolvedModel(
            spec=spec,
            folder=built if (built / "model_index.json").is_file() else None,
            identity={"tiny": tiny_identity()},
            scheduler_config=tiny_scheduler_config(),
        )
    local = _local_path(spec.id, Path(base_dir))
    if local is not None:
        return _resolve_folder(spec, local, hash_memo)
    return _resolve_hub(spec, hash_memo)


DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-base"
# A transformers model repo keeps everything at its top level.
_CAPTIONER_PATTERNS = ("*.json", "*.txt", "*.safetensors")


def resolve_captioner(
    captioner_id: str, *, main: ResolvedModel, base_dir: Path, hash_memo: Path | None
) -> ResolvedModel:
    """Pin down the BLIP captioner a recipe uses (``model.captioner``); loads no weights.

    With the built-in ``tiny`` model, the default captioner (or ``"tiny"``) is tiny's own BLIP.
    Otherwise it is a transformers BLIP folder or hub id, hashed like any model.

    Raises:
        ModelUnavailableError: The folder is missing or not a model, or the hub id is not
            downloaded and cannot be (offline).
    """
    if captioner_id == TINY_ID or (main.spec.id == TINY_ID and captioner_id == DEFAULT_CAPTIONER):
        return ResolvedModel(ModelSpec(TINY_ID), None, {"tiny": tiny_identity()}, {})
    folder = _local_path(captioner_id, Path(base_dir))
    if folder is None:
        folder = _download_captioner(captioner_id)
    if not (folder / "config.json").is_file():
        raise ModelUnavailableError(
            f"captioner '{captioner_id}' has no config.json",
            key="model.captioner",
            hint="use a BLIP folder as transformers' save_pretrained writes it, or a hub id",
        )
    files = sorted({path for pattern in _CAPTIONER_PATTERNS for path in folder.glob(pattern)})
    identity = {"files": _hash_files(folder, files, hash_memo)}
    return ResolvedModel(ModelSpec(captioner_id), folder, identity, {})


def _download_captioner(captioner_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return Path(
            snapshot_download(
                captioner_id,
                cache_dir=_hub_cache_dir(),
                local_files_only=_hub_offline(),
                allow_patterns=list(_CAPTIONER_PATTERNS),
            )
        )
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise ModelUnavailableError(
            f"captioner '{captioner_id}' is not available offline",
            key="model.captioner",
            hint=f"run 'hf download {captioner_id}' with network access, give the caption "
            "in the recipe, or set model.captioner to a local folder",
        ) from None
    except HfHubHTTPError as error:
        raise ModelUnavailableError(
            f"captioner '{captioner_id}' could not be downloaded: {str(error).splitlines()[0]}",
            key="model.captioner",
        ) from None


def _local_path(model_id: str, base_dir: Path) -> Path | None:
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
    identity: dict[str, Any] = {
        "files": _hash_files(folder, _identity_files(folder, spec.variant), hash_memo)
    }
    if spec.variant is not None:
        identity["variant"] = spec.variant
    return ResolvedModel(
        spec=spec, folder=folder, identity=identity, scheduler_config=_scheduler_config(folder)
    )


def _resolve_hub(spec: ModelSpec, hash_memo: Path | None) -> ResolvedModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = _hub_offline()
    revision = f" --revision {spec.revision}" if spec.revision else ""
    try:
        folder = snapshot_download(
            spec.id,
            revision=spec.revision,
            cache_dir=_hub_cache_dir(),
            local_files_only=offline,
            allow_patterns=_HUB_ALLOW_PATTERNS,
            ignore_patterns=_hub_ignore_patterns(spec.variant),
        )
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        where = "offline" if offline else "here and the Hugging Face Hub cannot be reached"
        raise ModelUnavailableError(
            f"model '{spec.id}' is not available {where}",
            key="model.id",
            hint=f"run 'hf download {spec.id}{revision}' with network access, "
            "or set model.id to a local folder",
        ) from None
    except RevisionNotFoundError:
        raise ModelUnavailableError(
            f"model '{spec.id}' has no revision '{spec.revision}'",
            key="model.revision",
            hint="use a branch, tag or commit of the repository",
        ) from None
    except RepositoryNotFoundError:
        raise ModelUnavailableError(
            f"model '{spec.id}' was not found on the Hugging Face Hub (or is gated)",
            key="model.id",
            hint="check the id; for a gated model accept its terms and run 'hf auth login'",
        ) from None
    except HfHubHTTPError as error:
        raise ModelUnavailableError(
            f"model '{spec.id}' could not be downloaded: {str(error).splitlines()[0]}",
            key="model.id",
        ) from None
    snapshot = Path(folder)
    resolved = _resolve_folder(spec, snapshot, hash_memo)
    identity = {"repo": spec.id, "revision": spec.revision, "commit": snapshot.name}
    return ResolvedModel(
        spec=spec,
        folder=snapshot,
        identity={**identity, **resolved.identity},
        scheduler_config=resolved.scheduler_config,
    )


def _hub_offline() -> bool:
    """Whether the Hub may not be contacted, read now rather than at import time."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or flag.upper() in {"1", "ON", "YES", "TRUE"}


def _hub_cache_dir() -> Path:
    """The hub cache folder, following huggingface_hub's variables but read now.

    huggingface_hub reads HF_HOME and HF_HUB_CACHE once, at import; reading them here lets a
    changed environment (a test, a command-line flag) take effect.
    """
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface"
    )
    cache = (
        os.environ.get("HF_HUB_CACHE")
        or os.environ.get("HUGGINGFACE_HUB_CACHE")
        or os.path.join(home, "hub")
    )
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def _hub_ignore_patterns(variant: str | None) -> list[str]:
    """Skip the weight variants we will not load (each is as big as the plain weights)."""
    return [f"*/*.{name}[.-]*" for name in _HUB_VARIANTS if name != variant]


def _scheduler_config(folder: Path) -> dict[str, Any]:
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return {}
    config = _read_json(path)
    return {
        key: value
        for key, value in config.items()
        if key == "_class_name" or not key.startswith("_")
    }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelUnavailableError(f"cannot read {path}: {error}", key="model.id") from None
    if not isinstance(value, dict):
        raise ModelUnavailableError(f"{path} does not hold a JSON object", key="model.id")
    return value


# ---------------------------------------------------------------------------------------
# Identity: which files make the model, and their hashes.


def _identity_files(folder: Path, variant: str | None) -> list[Path]:
    """The files that determine what the model computes, sorted.

    With a ``model_index.json``: it and the folders of the components it lists (a hub
    snapshot may also hold single-file checkpoints that are never loaded). Within each
    component, the configs plus the weights ``from_pretrained`` would read: those of the
    requested variant, safetensors when present.
    """
    if (folder / "model_index.json").is_file():
        index = _read_json(folder / "model_index.json")
        roots = [folder / name for name, entry in index.items() if _is_component(entry)]
        files = [folder / "model_index.json"]
    else:
        roots = [path for path in folder.iterdir() if path.is_dir()]
        files = []
    for root in sorted(roots):
        if not root.is_dir() or root.name.startswith("."):
            continue
        inside = sorted(
            path
            for path in root.rglob("*")
            if path.is_file()
            and not any(part.startswith(".") for part in path.relative_to(root).parts)
        )
        files += [path for path in inside if path.suffix in CONFIG_SUFFIXES]
        files += _loaded_weights(
            [path for path in inside if path.suffix in WEIGHT_SUFFIXES], variant
        )
    return files


def _is_component(entry: Any) -> bool:
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


def _loaded_weights(weights: list[Path], variant: str | None) -> list[Path]:
    """The weight files ``from_pretrained`` reads: matching variant, safetensors preferred."""

    def variant_of(path: Path) -> str | None:
        # "diffusion_pytorch_model.fp16.safetensors" or "model.fp16-00001-of-00002.safetensors"
        parts = path.name.split(".")
        return _SHARD_SUFFIX.sub("", parts[-2]) if len(parts) >= 3 else None

    chosen = [path for path in weights if variant_of(path) == variant] or weights
    return [path for path in chosen if path.suffix == ".safetensors"] or chosen


def sha256_file(path: Path) -> str:
    """The sha256 hex digest of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _hash_files(folder: Path, files: Iterable[Path], memo_path: Path | None) -> dict[str, str]:
    """Hash each file, keyed by its path relative to ``folder`` (so moving a model is free)."""
    memo = _HashMemo(memo_path)
    hashes = {path.relative_to(folder).as_posix(): memo.sha256(path) for path in files}
    memo.save()
    return hashes


class _HashMemo:
    """File hashes remembered in a JSON file by absolute path, size and mtime."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries = self._load()
        self.changed = False

    def _load(self) -> dict[str, dict[str, Any]]:
        if self.path is None:
            return {}
        try:
            stored = json.loads(Path(self.path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}  # a missing or damaged memo only costs re-hashing
        if not isinstance(stored, dict) or stored.get("version") != _HASH_MEMO_VERSION:
            return {}
        entries = stored.get("entries")
        return entries if isinstance(entries, dict) else {}

    def sha256(self, file: Path) -> str:
        real = file.resolve()  # hub snapshots are symlinks into blobs/
        stat = real.stat()
        entry = self.entries.get(str(real))
        if (
            isinstance(entry, dict)
            and entry.get("size") == stat.st_size
            and entry.get("mtime_ns") == stat.st_mtime_ns
        ):
            return entry["sha256"]
        digest = sha256_file(real)
        if time.time_ns() - stat.st_mtime_ns > _RACY_WINDOW_NS:
            self.entries[str(real)] = {
                "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
                "sha256": digest,
            }
            self.changed = True
        return digest

    def save(self) -> None:
        """Merge our entries into the file and replace it atomically (last writer wins)."""
        if self.path is None or not self.changed:
            return
        path = Path(self.path)
        # Merge with what other processes wrote meanwhile; forget files that are gone.
        merged = {**self._load(), **self.entries}
        entries = {name: entry for name, entry in merged.items() if os.path.exists(name)}
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
        staging.write_text(
            json.dumps({"version": _HASH_MEMO_VERSION, "entries": entries}, sort_keys=True),
            encoding="utf-8",
        )
        os.replace(staging, path)
        self.changed = False


# ---------------------------------------------------------------------------------------
# Loading.


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
        captioner: ResolvedModel | None = None,
    ) -> None:
        """Create an empty registry; nothing is built or loaded until :meth:`get`.

        Args:
            resolved: The model, from :func:`resolve_model`.
            device: Where modules are moved after loading.
            dtype: The dtype modules are loaded in.
            models_dir: Where ``tiny`` is built when it is first needed.
            on_load: Called with (component, seconds) after each load.
            captioner: The BLIP behind ``get("captioner")``, from :func:`resolve_captioner`.
        """
        self.resolved = resolved
        self.captioner = captioner
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
        """The model's folder; building ``tiny`` on first access."""
        if self._folder is None:
            if self.resolved.spec.id != TINY_ID:
                raise ValueError(f"resolved model {self.resolved.spec.id!r} has no folder")
            self._folder = ensure_tiny(self._models_dir)
        return self._folder

    def get(self, component: str) -> Any:
        """Return a component (``unet``, ``vae``, ``text_encoder``, ``tokenizer`` ...).

        Loaded on the first call through ``from_pretrained`` of the class named in
        ``model_index.json`` (modules moved to the device, in eval mode, without gradients);
        later calls return the same object.

        Raises:
            ModelUnavailableError: The model has no such component, names a class outside
                :data:`ALLOWED_CLASSES`, or its files cannot be loaded.
        """
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
        if component == "captioner":
            return self._load_captioner()
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
                key="model.id",
            ) from None
        if is_module:
            loaded = loaded.to(self.device)
            loaded.eval()
            loaded.requires_grad_(False)
        return loaded

    def _load_captioner(self) -> Captioner:
        from transformers import BlipForConditionalGeneration, BlipProcessor

        if self.captioner is None:
            raise ValueError("this registry was made without a captioner")  # an engine bug
        if self.captioner.folder is not None:
            folder = self.captioner.folder
        else:
            folder = ensure_tiny(self._models_dir) / "captioner"
        try:
            model = BlipForConditionalGeneration.from_pretrained(
                folder, dtype=self.dtype, local_files_only=True
            )
            processor = BlipProcessor.from_pretrained(folder, local_files_only=True)
        except OSError as error:
            raise ModelUnavailableError(
                f"captioner '{self.captioner.spec.id}' cannot be loaded: "
                f"{str(error).splitlines()[0]}",
                key="model.captioner",
            ) from None
        model = model.to(self.device).eval().requires_grad_(False)
        return Captioner(model, processor)


class Captioner(NamedTuple):
    """A BLIP captioning model and its processor."""

    model: Any
    processor: Any


def _component_class(folder: Path, component: str, model_id: str) -> tuple[str, str]:
    """The (library, class name) of a component, checked against the allow-list."""
    index_path = folder / "model_index.json"
    if index_path.is_file():
        index = _read_json(index_path)
        available = sorted(name for name, entry in index.items() if _is_component(entry))
        entry = index.get(component)
        library, class_name = entry if _is_component(entry) else (None, None)
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
            value = _read_json(path).get(key)
            if isinstance(value, list) and value:
                value = value[0]
            if isinstance(value, str):
                return value
    return None
