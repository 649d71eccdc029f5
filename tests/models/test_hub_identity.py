"""Hub identity without downloads: repo id + commit + the hashes the Hub publishes.

A fake Hugging Face cache (refs/, snapshots/ of symlinks, blobs/ named by their hash, as
huggingface_hub lays it out) and a fake Hub metadata answer stand in for the network.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
from huggingface_hub import constants

from editflow.cache import Cache
from editflow.engine.api import plan_recipe, run_recipe
from editflow.errors import ModelUnavailableError
from editflow.models import ModelRegistry, ModelSpec, resolve_model
from editflow.models import identity as model_identity

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "someone/tiny-sd"


def published_hash(path: Path) -> str:
    """What the Hub publishes: LFS sha256 for weights, the git blob id for small files."""
    data = path.read_bytes()
    if path.suffix == ".safetensors":
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def fake_hub_cache(hub: Path, folder: Path, repo: str = REPO, commit: str = COMMIT) -> Path:
    """Lay ``folder`` out as huggingface_hub caches a snapshot; returns the snapshot folder."""
    root = hub / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        blob = root / "blobs" / published_hash(path)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(path.read_bytes())
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every Hub call that could fetch files fails the test; returns the calls made."""
    calls: list[str] = []

    def refuse(name: str):
        def call(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called while planning")

        return call

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse("snapshot_download"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse("hf_hub_download"))
    return calls


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "hub"
    folder.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(folder))
    return folder


def expected_files(tiny_folder: Path) -> dict[str, str]:
    index = model_identity.folder_reader(tiny_folder)
    chosen = model_identity.pipeline_files(model_identity.folder_paths(tiny_folder), index, None)
    return {name: published_hash(tiny_folder / name) for name in chosen}


def test_a_cached_hub_model_is_identified_by_commit_and_published_hashes_unread(
    tiny_folder: Path, hub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network
) -> None:
    snapshot = fake_hub_cache(hub, tiny_folder)

    def no_hashing(path: Path) -> str:
        raise AssertionError(f"{path} was hashed: the blob's name is its hash")

    monkeypatch.setattr(model_identity, "sha256_file", no_hashing)
    resolved = resolve_model(
        ModelSpec(REPO), base_dir=tmp_path, models_dir=tmp_path, hash_memo=None
    )
    assert resolved.folder == snapshot
    assert resolved.identity == {
        "repo": REPO,
        "revision": None,
        "commit": COMMIT,
        "files": expected_files(tiny_folder),
    }
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (
        resolved.identity["files"][weights]
        == hashlib.sha256((tiny_folder / weights).read_bytes()).hexdigest()
    )
    assert resolved.scheduler_config["_class_name"] == "DDIMScheduler"
    assert no_network == []


def test_an_uncached_hub_model_is_identified_from_metadata_without_fetching_weights(
    tiny_folder: Path, hub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    siblings = [
        SimpleNamespace(
            rfilename=path.relative_to(tiny_folder).as_posix(),
            blob_id=published_hash(path) if path.suffix != ".safetensors" else "git-lfs-pointer",
            lfs={"sha256": published_hash(path)} if path.suffix == ".safetensors" else None,
        )
        for path in sorted(tiny_folder.rglob("*"))
        if path.is_file()
    ]
    asked: list[tuple] = []

    def model_info(self, repo_id, revision=None, files_metadata=False):
        asked.append((repo_id, revision, files_metadata))
        return SimpleNamespace(sha=COMMIT, siblings=siblings)

    fetched: list[str] = []

    def hf_hub_download(repo_id, filename, revision=None, cache_dir=None):
        assert revision == COMMIT
        fetched.append(filename)
        return str(tiny_folder / filename)

    def snapshot_download(*args, **kwargs):
        raise AssertionError("weights were downloaded while planning")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    resolved = resolve_model(
        ModelSpec(REPO), base_dir=tmp_path, models_dir=tmp_path, hash_memo=None
    )
    assert asked == [(REPO, None, True)]
    assert sorted(fetched) == ["model_index.json", "scheduler/scheduler_config.json"]
    assert resolved.folder is None  # nothing is on disk until a stage loads a component
    assert resolved.identity == {
        "repo": REPO,
        "revision": None,
        "commit": COMMIT,
        "files": expected_files(tiny_folder),
    }

    # Loading is what downloads, pinned to the commit the plan resolved.
    snapshot = fake_hub_cache(hub, tiny_folder)
    downloads: list[dict] = []

    def download_snapshot(repo_id, **kwargs):
        downloads.append({"repo": repo_id, "revision": kwargs["revision"]})
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download_snapshot)
    import torch

    registry = ModelRegistry(
        resolved, device=torch.device("cpu"), dtype=torch.float32, models_dir=tmp_path
    )
    assert type(registry.get("vae")).__name__ == "AutoencoderKL"
    assert downloads == [{"repo": REPO, "revision": COMMIT}]


def test_offline_with_nothing_cached_says_how_to_get_the_captioner(
    hub: Path, tmp_path: Path
) -> None:
    recipe = tmp_path / "caption.toml"
    recipe.write_text(
        'schema_version = 1\n[model]\ncaptioner = "someone/blip"\n'
        '[inputs.photo]\nimage = "skimage:chelsea"\nsize = [64, 64]\n'
        '[stages.caption]\nkind = "caption.blip"\nimages = "inputs.photo"\n'
    )
    with pytest.raises(ModelUnavailableError) as error:
        plan_recipe(recipe, cache=Cache(tmp_path / "c"))
    assert str(error.value) == (
        f"{recipe}:3: model.captioner: captioner 'someone/blip' is not available offline "
        "(run 'hf download someone/blip' with network access, give the caption in the "
        "recipe, or set model.captioner to a local folder)"
    )


def test_a_recipe_on_a_cached_hub_model_plans_offline_and_runs_from_the_snapshot(
    tiny_folder: Path, hub: Path, tmp_path: Path, no_network
) -> None:
    fake_hub_cache(hub, tiny_folder)
    recipe = tmp_path / "encode.toml"
    recipe.write_text(
        f'schema_version = 1\n[model]\nid = "{REPO}"\n'
        '[inputs.photo]\nimage = "skimage:chelsea"\nsize = [64, 64]\n'
        '[stages.encode]\nkind = "encode.vae"\nimages = "inputs.photo"\n'
    )
    cache = Cache(tmp_path / "c")
    plan = plan_recipe(recipe, cache=cache)
    model = plan.stages["encode"].preimage["models"]["model.id"]
    assert model["identity"]["commit"] == COMMIT
    result = run_recipe(recipe, cache=cache, out_dir=None, device="cpu")
    assert result.computed == ["encode"]
    assert result.registry.loads == ["model.id:vae"]
    assert no_network == []
