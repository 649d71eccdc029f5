"""Model identity: which files make a model, and their hashes, without loading or downloading.

A local folder is hashed by editflow (sha256 per file, memoised by path, size and mtime). A
hub model is identified by its repo id, the commit its revision resolves to and the hashes
the Hub itself publishes for each file (the LFS sha256 of weights, the git blob id of small
files). Those come from the local Hugging Face cache, where every snapshot file links to a
blob named by exactly that hash, or, when the model is not cached and the Hub can be
reached, from the Hub's file metadata. Planning therefore never fetches weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from editflow.errors import ModelUnavailableError

if TYPE_CHECKING:
    from huggingface_hub import CachedRevisionInfo

# Files that make a model what it is. Tokenizer vocabularies (merges.txt, spiece.model)
# change outputs as much as weights do, so they count too.
WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".ckpt", ".pt", ".pth"})
CONFIG_SUFFIXES = frozenset({".json", ".txt", ".model"})
_SHARD_SUFFIX = re.compile(r"-\d+-of-\d+$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")

_HASH_MEMO_VERSION = 1
# A file modified this recently may change again within the same mtime tick (as in git's
# "racy clean" problem), so its hash is used but not memoised.
_RACY_WINDOW_NS = 2_000_000_000

# Chooses, from a model's relative file paths, those that determine what it computes;
# ``read_json`` reads one of those files (model_index.json) when the choice depends on it.
FileSelector = Callable[[list[str], Callable[[str], dict[str, Any] | None]], list[str]]


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1]


def is_component(entry: Any) -> bool:
    """Whether a ``model_index.json`` entry names a component (``[library, class]``)."""
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


def pipeline_files(
    paths: list[str], read_json: Callable[[str], dict[str, Any] | None], variant: str | None
) -> list[str]:
    """The files of a diffusers pipeline that determine what it computes, in order.

    With a ``model_index.json``: it and the folders of the components it lists (a hub repo
    may also hold single-file checkpoints that are never loaded); without one, every
    top-level folder. Within each component: the configs plus the weights
    ``from_pretrained`` would read (the requested variant, safetensors when present).
    """
    paths = [path for path in paths if not any(part.startswith(".") for part in path.split("/"))]
    index = read_json("model_index.json") if "model_index.json" in paths else None
    if index is not None:
        roots = {name for name, entry in index.items() if is_component(entry)}
        chosen = ["model_index.json"]
    else:
        roots = {path.split("/", 1)[0] for path in paths if "/" in path}
        chosen = []
    for root in sorted(roots):
        inside = sorted(path for path in paths if path.startswith(root + "/"))
        chosen += [path for path in inside if _suffix(path) in CONFIG_SUFFIXES]
        chosen += _loaded_weights([p for p in inside if _suffix(p) in WEIGHT_SUFFIXES], variant)
    return chosen


def single_folder_files(paths: list[str], read_json: Any = None) -> list[str]:
    """The files of a transformers model kept at a folder's top level (configs, vocabularies,
    safetensors weights)."""
    return sorted(
        path
        for path in paths
        if "/" not in path
        and not path.startswith(".")
        and _suffix(path) in {*CONFIG_SUFFIXES, ".safetensors"}
    )


def _loaded_weights(weights: list[str], variant: str | None) -> list[str]:
    """The weight files ``from_pretrained`` reads: matching variant, safetensors preferred."""

    def variant_of(path: str) -> str | None:
        # "diffusion_pytorch_model.fp16.safetensors" or "model.fp16-00001-of-00002.safetensors"
        parts = path.rsplit("/", 1)[-1].split(".")
        return _SHARD_SUFFIX.sub("", parts[-2]) if len(parts) >= 3 else None

    chosen = [path for path in weights if variant_of(path) == variant] or weights
    return [path for path in chosen if _suffix(path) == ".safetensors"] or chosen


def folder_paths(folder: Path) -> list[str]:
    """Every file under ``folder`` as a relative posix path, sorted."""
    return sorted(
        path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()
    )


def read_json_file(path: Path, key: str = "model.id") -> dict[str, Any]:
    """A JSON object from a model's file; a damaged file is the user's model problem."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelUnavailableError(f"cannot read {path}: {error}", key=key) from None
    if not isinstance(value, dict):
        raise ModelUnavailableError(f"{path} does not hold a JSON object", key=key)
    return value


def folder_reader(folder: Path, key: str = "model.id") -> Callable[[str], dict[str, Any] | None]:
    def read(relative: str) -> dict[str, Any] | None:
        path = folder / relative
        return read_json_file(path, key) if path.is_file() else None

    return read


# ---------------------------------------------------------------------------------------
# Hashing local files


def sha256_file(path: Path) -> str:
    """The sha256 hex digest of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(folder: Path, files: Iterable[str], memo_path: Path | None) -> dict[str, str]:
    """sha256 of each file, keyed by its path relative to ``folder`` (moving a model is free)."""
    memo = _HashMemo(memo_path)
    hashes = {name: memo.sha256(folder / name) for name in files}
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
        real = file.resolve()
        stat = real.stat()
        entry = self.entries.get(str(real))
        if (
            isinstance(entry, dict)
            and entry.get("size") == stat.st_size
            and entry.get("mtime_ns") == stat.st_mtime_ns
        ):
            return entry["sha256"]
        # Looked up through the module so tests can count the files actually read.
        digest = globals()["sha256_file"](real)
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
# Hub models


def quiet_libraries() -> None:
    """Turn off the progress bars diffusers, transformers and huggingface_hub print while
    loading, saving and downloading: editflow reports loads as events of its own."""
    import huggingface_hub.utils
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def hub_offline() -> bool:
    """Whether the Hub may not be contacted, read now rather than at import time."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or flag.upper() in {"1", "ON", "YES", "TRUE"}


def hub_cache_dir() -> Path:
    """The hub cache folder: ``huggingface_hub.constants.HF_HUB_CACHE``, unless the
    environment names another one now.

    huggingface_hub reads HF_HUB_CACHE and HF_HOME once, at import; reading them again here
    lets a changed environment (a test, a command-line flag) take effect.
    """
    from huggingface_hub import constants

    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if not cache and os.environ.get("HF_HOME"):
        cache = os.path.join(os.environ["HF_HOME"], "hub")
    return Path(os.path.expandvars(os.path.expanduser(cache or constants.HF_HUB_CACHE)))


@dataclass(frozen=True)
class HubModel:
    """A hub model pinned to a commit, with the published hash of each file that counts.

    Attributes:
        commit: The commit the revision resolved to.
        files: Relative path -> LFS sha256 (weights) or git blob id (small files).
        snapshot: The local snapshot folder when the files are cached, else ``None``.
        configs: The small JSON files read while resolving (``model_index.json``, the
            scheduler config), relative path -> content.
    """

    commit: str
    files: dict[str, str]
    snapshot: Path | None
    configs: dict[str, dict[str, Any]]


def resolve_hub(
    repo_id: str,
    revision: str | None,
    select: FileSelector,
    *,
    key: str,
    what: str,
    otherwise: str,
    hash_memo: Path | None,
    configs: tuple[str, ...] = (),
) -> HubModel:
    """Pin a hub model down from the local cache, else from the Hub's metadata; no weights.

    Args:
        repo_id: ``org/name``.
        revision: A branch, tag or commit; ``None`` for ``main``.
        select: Chooses the files that count (:func:`pipeline_files` ...).
        key: The recipe key that names the model, for errors.
        what: What the model is, for errors (``model``, ``captioner``).
        otherwise: The end of the hint when it is not available (``or set model.id to ...``).
        hash_memo: Memo for files the cache holds as plain copies (hashed by editflow).
        configs: Small JSON files to read as well (for example the scheduler config).

    Raises:
        ModelUnavailableError: Offline and not cached (the hint says how to get it), or the
            repository or revision does not exist.
    """
    cached = cached_hub(repo_id, revision, select, key=key, hash_memo=hash_memo, configs=configs)
    if cached is not None:
        return cached
    offline = hub_offline()
    fetch = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    if offline:
        raise ModelUnavailableError(
            f"{what} '{repo_id}' is not available offline",
            key=key,
            hint=f"run '{fetch}' with network access, {otherwise}",
        )
    return _from_metadata(repo_id, revision, select, key, configs, f"run '{fetch}'", otherwise)


def cached_hub(
    repo_id: str,
    revision: str | None,
    select: FileSelector,
    *,
    key: str,
    hash_memo: Path | None,
    configs: tuple[str, ...] = (),
) -> HubModel | None:
    """A hub model pinned down from the local Hugging Face cache alone; ``None`` when the
    revision is not cached there. Nothing is fetched.

    The cache is read through huggingface_hub's ``scan_cache_dir``: a revision is a commit
    or a ref pointing at one, and each snapshot file links to a blob named by the hash the
    Hub publishes, so no cached weights are hashed by editflow.
    """
    revision_info = _cached_revision(repo_id, revision)
    if revision_info is None:
        return None
    snapshot = revision_info.snapshot_path
    blobs = {
        file.file_path.relative_to(snapshot).as_posix(): file.blob_path
        for file in revision_info.files
    }
    read = folder_reader(snapshot, key)
    files: dict[str, str] = {}
    plain: list[str] = []
    for name in select(sorted(blobs), read):
        if blobs[name].parent.name == "blobs":
            files[name] = blobs[name].name  # the cache names each blob by its Hub hash
        else:
            plain.append(name)  # a plain copy (a cache without symlinks): hashed here
    files.update(hash_files(snapshot, plain, hash_memo))
    read_configs = {name: value for name in configs if (value := read(name)) is not None}
    return HubModel(revision_info.commit_hash, dict(sorted(files.items())), snapshot, read_configs)


def _cached_revision(repo_id: str, revision: str | None) -> CachedRevisionInfo | None:
    """The ``CachedRevisionInfo`` of ``repo_id`` at ``revision`` (a commit, or a branch or tag
    the cache's refs resolve; ``main`` by default), or ``None``."""
    from huggingface_hub import CacheNotFound, scan_cache_dir

    try:
        scanned = scan_cache_dir(hub_cache_dir())
    except (CacheNotFound, ValueError):  # no cache folder yet (or a file in its place)
        return None
    ref = revision or "main"
    for repo in scanned.repos:
        if repo.repo_type != "model" or repo.repo_id != repo_id:
            continue
        for cached in repo.revisions:
            if ref in cached.refs or (_COMMIT.match(ref) and cached.commit_hash == ref):
                return cached
    return None


# What a failure to reach the Hub is called by the HTTP libraries huggingface_hub may use
# underneath (httpx, requests, urllib3): matched by class name, so none need be imported.
_NETWORK_ERRORS = frozenset({
    "ConnectError", "ConnectTimeout", "ConnectionError", "NetworkError", "ProxyError",
    "ReadTimeout", "TimeoutException", "Timeout", "TransportError", "OfflineModeIsEnabled",
})  # fmt: skip


def _unreachable(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) says the Hub could not be reached."""
    while error is not None:
        if {cls.__name__ for cls in type(error).__mro__} & _NETWORK_ERRORS:
            return True
        error = error.__cause__ or error.__context__
    return False


def _from_metadata(
    repo_id: str,
    revision: str | None,
    select: FileSelector,
    key: str,
    configs: tuple[str, ...],
    fetch: str,
    otherwise: str = "",
) -> HubModel:
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
        published: dict[str, str] = {}
        for sibling in info.siblings or []:
            lfs = sibling.lfs
            sha256 = lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
            published[sibling.rfilename] = sha256 or sibling.blob_id or ""
        small: dict[str, dict[str, Any] | None] = {}

        def read(relative: str) -> dict[str, Any] | None:
            # Small JSON files only (model_index.json, a scheduler config): never weights.
            if relative not in small:
                try:
                    path = hf_hub_download(
                        repo_id, relative, revision=info.sha, cache_dir=hub_cache_dir()
                    )
                except EntryNotFoundError:
                    small[relative] = None
                else:
                    small[relative] = read_json_file(Path(path), key)
            return small[relative]

        chosen = select(sorted(published), read)
        read_configs = {
            name: value for name in configs if name in published and (value := read(name))
        }
    except RevisionNotFoundError:
        raise ModelUnavailableError(
            f"'{repo_id}' has no revision '{revision}'",
            key="model.revision" if key == "model.id" else key,
            hint="use a branch, tag or commit of the repository",
        ) from None
    except RepositoryNotFoundError:
        raise ModelUnavailableError(
            f"'{repo_id}' was not found on the Hugging Face Hub (or is gated)",
            key=key,
            hint="check the id; for a gated model accept its terms and run 'hf auth login'",
        ) from None
    except Exception as error:
        if not _unreachable(error) and not isinstance(error, HfHubHTTPError | OSError):
            raise
        first = (str(error).splitlines() or [type(error).__name__])[0]
        if _unreachable(error):
            raise ModelUnavailableError(
                f"cannot reach the Hugging Face Hub for '{repo_id}': {first}",
                key=key,
                hint=f"set HF_HUB_OFFLINE=1 or pass --offline to use only the local cache, {otherwise}",
            ) from None
        raise ModelUnavailableError(
            f"'{repo_id}' could not be looked up: {first}",
            key=key,
            hint=f"{fetch} once the Hub can be reached, {otherwise}",
        ) from None
    return HubModel(str(info.sha), {name: published[name] for name in chosen}, None, read_configs)
