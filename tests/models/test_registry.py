"""Model references, the built-in tiny model, identities and lazy loading."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from editflow.errors import ModelUnavailableError
from editflow.models import ModelRegistry, ModelSpec, loading, resolve_model, tiny
from editflow.models import identity as model_identity

OLD_NS = 1_600_000_000 * 10**9  # an mtime well outside the "racy" window


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def tiny_registry(models_dir: Path, tiny_folder: Path) -> ModelRegistry:
    resolved = resolve_model(
        ModelSpec("tiny"), base_dir=models_dir, models_dir=models_dir, hash_memo=None
    )
    return ModelRegistry(
        resolved, device=torch.device("cpu"), dtype=torch.float32, models_dir=models_dir
    )


def fake_model_folder(root: Path) -> Path:
    """A diffusers-layout folder whose 'weights' are just bytes (resolving never loads them)."""
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "safety_checker": [None, None],
                "scheduler": ["diffusers", "DDIMScheduler"],
                "unet": ["diffusers", "UNet2DConditionModel"],
            }
        )
    )
    (root / "unet").mkdir()
    (root / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    (root / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights v1")
    (root / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"half weights")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(
        '{"_class_name": "DDIMScheduler", "_diffusers_version": "0.1", "steps_offset": 1}'
    )
    (root / "notes.ckpt").write_bytes(b"a single-file checkpoint nobody loads")
    for path in root.rglob("*"):
        os.utime(path, ns=(OLD_NS, OLD_NS))
    return root


def test_tiny_is_built_once_and_then_reused(
    tiny_folder: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def build_again(folder: Path) -> None:
        raise AssertionError("tiny was built a second time")

    monkeypatch.setattr(tiny, "build_tiny", build_again)
    assert tiny.ensure_tiny(models_dir) == tiny_folder
    assert tiny_folder.name == tiny.tiny_folder_name()
    assert [path.name for path in models_dir.iterdir() if path.name.startswith(".")] == []


def test_tiny_build_is_byte_identical_and_keeps_global_rng(
    tiny_folder: Path, tmp_path: Path
) -> None:
    rng_before = torch.get_rng_state()
    tiny.build_tiny(tmp_path / "again")
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert file_hashes(tmp_path / "again") == file_hashes(tiny_folder)
    assert sorted(file_hashes(tiny_folder)) == [
        "captioner/config.json",
        "captioner/generation_config.json",
        "captioner/model.safetensors",
        "captioner/processor_config.json",
        "captioner/tokenizer.json",
        "captioner/tokenizer_config.json",
        "clip/config.json",
        "clip/model.safetensors",
        "clip/processor_config.json",
        "clip/tokenizer.json",
        "clip/tokenizer_config.json",
        "controlnet/config.json",
        "controlnet/diffusion_pytorch_model.safetensors",
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]


def test_concurrent_tiny_build_keeps_the_first_published_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    final = tmp_path / tiny.tiny_folder_name()

    def build_while_another_process_publishes(staging: Path, variant: str = "tiny") -> None:
        staging.mkdir()
        (staging / "model_index.json").write_text("ours")
        final.mkdir()
        (final / "model_index.json").write_text("theirs")

    monkeypatch.setattr(tiny, "build_tiny", build_while_another_process_publishes)
    assert tiny.ensure_tiny(tmp_path) == final
    assert (final / "model_index.json").read_text() == "theirs"
    assert [path.name for path in tmp_path.iterdir()] == [final.name]


def test_tiny_components_load_through_from_pretrained_with_sd_shapes(
    tiny_registry: ModelRegistry,
) -> None:
    unet = tiny_registry.get("unet")
    vae = tiny_registry.get("vae")
    text_encoder = tiny_registry.get("text_encoder")
    tokenizer = tiny_registry.get("tokenizer")
    with torch.no_grad():
        eps = unet(torch.randn(2, 4, 8, 8), 10, encoder_hidden_states=torch.randn(2, 77, 32))
        latents = vae.encode(torch.rand(1, 3, 64, 64)).latent_dist.mean
        pixels = vae.decode(latents).sample
        tokens = tokenizer(
            ["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt"
        )
        embeddings = text_encoder(tokens.input_ids)[0]
    assert eps.sample.shape == (2, 4, 8, 8)
    assert latents.shape == (1, 4, 8, 8)
    assert pixels.shape == (1, 3, 64, 64)
    assert embeddings.shape == (1, 77, 32)
    assert tokenizer.convert_ids_to_tokens(tokens.input_ids[0, :7].tolist()) == [
        "<|startoftext|>",
        "a</w>",
        "photo</w>",
        "of</w>",
        "a</w>",
        "cat</w>",
        "<|endoftext|>",
    ]
    assert len(tokenizer) == text_encoder.config.vocab_size == 1000
    assert not unet.training and not any(p.requires_grad for p in unet.parameters())


def test_tiny_folder_is_a_stable_diffusion_pipeline(tiny_folder: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(
        tiny_folder, safety_checker=None, requires_safety_checker=False, feature_extractor=None
    )
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(
        "a photo of a cat",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert images.shape == (1, 64, 64, 3)
    assert ((images >= 0) & (images <= 1)).all()


def test_resolving_tiny_loads_nothing_and_identity_is_stable_across_processes(
    tmp_path: Path,
) -> None:
    resolved = resolve_model(
        ModelSpec("tiny"), base_dir=tmp_path, models_dir=tmp_path, hash_memo=None
    )
    registry = ModelRegistry(
        resolved, device=torch.device("cpu"), dtype=torch.float32, models_dir=tmp_path
    )
    assert resolved.folder is None and registry.loads == [] and list(tmp_path.iterdir()) == []
    assert resolved.identity == {"tiny": tiny.tiny_identity()}
    assert registry.scheduler_config["beta_schedule"] == "scaled_linear"
    with pytest.raises(TypeError):
        registry.scheduler_config["steps_offset"] = 0  # type: ignore[index]
    with pytest.raises(TypeError):
        registry.scheduler_config.update(steps_offset=0)  # type: ignore[attr-defined]

    code = (
        "import json, sys; from pathlib import Path\n"
        "from editflow.models import ModelSpec, resolve_model\n"
        f"models_dir = Path({str(tmp_path)!r})\n"
        "r = resolve_model(ModelSpec('tiny'), base_dir=models_dir, models_dir=models_dir,"
        " hash_memo=None)\n"
        "print(json.dumps([r.identity, r.scheduler_config, 'diffusers' in sys.modules]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout
    identity, scheduler_config, imported_diffusers = json.loads(output)
    assert identity == resolved.identity
    assert scheduler_config == resolved.scheduler_config
    assert not imported_diffusers  # resolving tiny stays cheap enough for `plan`


def test_tiny_scheduler_config_matches_the_built_folder(tiny_folder: Path, tmp_path: Path) -> None:
    as_tiny = resolve_model(
        ModelSpec("tiny"), base_dir=tmp_path, models_dir=tmp_path, hash_memo=None
    )
    as_folder = resolve_model(
        ModelSpec(str(tiny_folder)), base_dir=tmp_path, models_dir=tmp_path, hash_memo=None
    )
    assert as_tiny.scheduler_config == as_folder.scheduler_config


# What each built-in model's folder, docs/cli.md and METHODS.md say its schedule is.
DECLARED_SCHEDULES = {
    "tiny": ("scaled_linear", 0.00085, 0.012, False, 1),
    "tiny-inpaint": ("scaled_linear", 0.00085, 0.012, False, 1),
    "sd15-shaped": ("scaled_linear", 0.00085, 0.012, False, 1),
    "tiny-pixel": ("linear", 0.0001, 0.02, True, 0),  # DDPM's betas, landing on the clean image
}


@pytest.mark.parametrize("variant", sorted(DECLARED_SCHEDULES))
def test_each_built_in_model_runs_on_the_schedule_its_folder_declares(
    variant: str, models_dir: Path, tmp_path: Path
) -> None:
    from editflow.models.tiny import TINY_VARIANTS, build_tiny, ensure_tiny

    assert set(DECLARED_SCHEDULES) == set(TINY_VARIANTS)
    resolved = resolve_model(
        ModelSpec(variant), base_dir=tmp_path, models_dir=tmp_path, hash_memo=None
    )
    if variant == "sd15-shaped":  # its scheduler as the build writes it, not 4 GB of weights
        folder = tmp_path / variant
        build_tiny(folder, variant, only={"scheduler"})
    else:
        folder = ensure_tiny(models_dir, variant)
    on_disk = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert {k: v for k, v in on_disk.items() if not k.startswith("_diffusers")} == {
        k: v for k, v in resolved.scheduler_config.items() if not k.startswith("_diffusers")
    }
    config = resolved.scheduler_config
    declared = (config["beta_schedule"], config["beta_start"], config["beta_end"],
                config["set_alpha_to_one"], config["steps_offset"])  # fmt: skip
    assert declared == DECLARED_SCHEDULES[variant]


def test_the_t0_grid_of_tiny_pixel_has_ddpms_alpha_bars() -> None:
    """DiffusionCLIP's t0 = 400 on tiny-pixel: alpha_bar from DDPM's formula in float64,
    prod(1 - beta_i) with beta linear from 1e-4 to 0.02 over 1,000 steps (Ho et al. 2020)."""
    import numpy as np
    from diffusers import DDIMScheduler

    from editflow.stages.grid_scheduler import GridScheduler, t0_grid

    resolved = resolve_model(
        ModelSpec("tiny-pixel"), base_dir=Path("."), models_dir=Path("."), hash_memo=None
    )
    grid = t0_grid(400, 41)
    scheduler = GridScheduler.from_scheduler(
        DDIMScheduler.from_config(resolved.scheduler_config), grid, inverse=True
    )
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    reference = np.cumprod(1 - betas)[grid]
    ours = scheduler.alphas_cumprod.double().numpy()[grid]
    np.testing.assert_allclose(ours, reference, rtol=1e-5)
    assert abs(reference[-1] - 0.1936) < 5e-4  # not Stable Diffusion's 0.4245


def test_schedulers_are_built_from_the_read_only_config(tiny_registry: ModelRegistry) -> None:
    from diffusers import DDIMScheduler

    config = tiny_registry.scheduler_config
    scheduler = DDIMScheduler.from_config(config)
    assert scheduler.config.steps_offset == 1 and scheduler.config.beta_end == 0.012
    rebuild, args = config.__reduce__()  # how it travels to another process (Ray)
    assert rebuild(*args) == config
    assert type(copy.deepcopy(config)) is dict


def test_registry_loads_each_component_once(models_dir: Path, tiny_folder: Path) -> None:
    resolved = resolve_model(
        ModelSpec("tiny"), base_dir=models_dir, models_dir=models_dir, hash_memo=None
    )
    reported: list[str] = []
    registry = ModelRegistry(
        resolved,
        device=torch.device("cpu"),
        dtype=torch.float32,
        models_dir=models_dir,
        on_load=lambda component, seconds: reported.append(component),
    )
    first = registry.get("vae")
    assert registry.get("vae") is first
    registry.get("tokenizer")
    assert registry.loads == reported == ["vae", "tokenizer"]


def test_registry_refuses_missing_and_unlisted_components(
    tiny_registry: ModelRegistry, tmp_path: Path
) -> None:
    with pytest.raises(ModelUnavailableError) as missing:
        tiny_registry.get("controlnet")
    assert str(missing.value) == (
        "model.id: model 'tiny' has no component 'controlnet' "
        "(it has: scheduler, text_encoder, tokenizer, unet, vae)"
    )

    folder = fake_model_folder(tmp_path / "model")
    (folder / "safety_checker").mkdir()
    index = json.loads((folder / "model_index.json").read_text())
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    (folder / "model_index.json").write_text(json.dumps(index))
    resolved = resolve_model(
        ModelSpec("model"), base_dir=tmp_path, models_dir=tmp_path, hash_memo=None
    )
    registry = ModelRegistry(
        resolved, device=torch.device("cpu"), dtype=torch.float32, models_dir=tmp_path
    )
    with pytest.raises(
        ModelUnavailableError,
        match="stable_diffusion.StableDiffusionSafetyChecker, which editflow does not load",
    ):
        registry.get("safety_checker")
    assert registry.loads == []


def test_allow_listed_classes_exist() -> None:
    import importlib

    for class_name, library in loading.ALLOWED_CLASSES.items():
        assert isinstance(getattr(importlib.import_module(library), class_name), type)


def test_folder_identity_follows_weights_and_memo_spares_rehashing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = fake_model_folder(tmp_path / "recipe" / "model")
    memo = tmp_path / "memo" / "file-hashes.json"
    hashed: list[str] = []
    real_sha256 = model_identity.sha256_file

    def counting_sha256(path: Path) -> str:
        hashed.append(path.name)
        return real_sha256(path)

    monkeypatch.setattr(model_identity, "sha256_file", counting_sha256)

    def identity() -> dict:
        return resolve_model(
            ModelSpec("model"), base_dir=tmp_path / "recipe", models_dir=tmp_path, hash_memo=memo
        ).identity

    first = identity()
    assert sorted(first["files"]) == [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ]
    assert len(hashed) == 4

    hashed.clear()
    assert identity() == first
    assert hashed == []  # everything came from the memo

    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"weights v2")  # same size, new content
    os.utime(weights, ns=(OLD_NS + 1, OLD_NS + 1))
    changed = identity()
    assert hashed == [weights.name]
    assert (
        changed["files"][weights.relative_to(folder).as_posix()]
        != first["files"][weights.relative_to(folder).as_posix()]
    )

    hashed.clear()
    weights.write_bytes(b"weights v3")  # just written: same mtime tick risk, so not memoised
    identity()
    identity()
    assert hashed == [weights.name, weights.name]


def test_folder_identity_counts_the_requested_variant_only(tmp_path: Path) -> None:
    fake_model_folder(tmp_path / "model")
    resolved = resolve_model(
        ModelSpec("model", variant="fp16"), base_dir=tmp_path, models_dir=tmp_path, hash_memo=None
    )
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in resolved.identity["files"]
    assert "unet/diffusion_pytorch_model.safetensors" not in resolved.identity["files"]
    assert resolved.identity["variant"] == "fp16"
    assert resolved.scheduler_config == {"_class_name": "DDIMScheduler", "steps_offset": 1}


def test_unknown_hub_model_offline_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    with pytest.raises(ModelUnavailableError) as error:
        resolve_model(
            ModelSpec("nobody/no-such-model"),
            base_dir=tmp_path,
            models_dir=tmp_path,
            hash_memo=None,
        )
    assert str(error.value) == (
        "model.id: model 'nobody/no-such-model' is not available offline "
        "(run 'hf download nobody/no-such-model' with network access, "
        "or set model.id to a local folder)"
    )


def test_downloaded_hub_model_resolves_offline_to_its_commit(
    tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--someone--tiny-sd"
    shutil.copytree(tiny_folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)

    resolved = resolve_model(
        ModelSpec("someone/tiny-sd"), base_dir=tmp_path, models_dir=tmp_path, hash_memo=None
    )
    as_folder = resolve_model(
        ModelSpec(str(tiny_folder)), base_dir=tmp_path, models_dir=tmp_path, hash_memo=None
    )
    assert resolved.folder == repo / "snapshots" / commit
    assert resolved.identity == {
        "repo": "someone/tiny-sd",
        "revision": None,
        "commit": commit,
        "files": as_folder.identity["files"],
    }


def test_missing_local_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailableError) as error:
        resolve_model(
            ModelSpec("./no-such-folder"), base_dir=tmp_path, models_dir=tmp_path, hash_memo=None
        )
    assert str(error.value) == (
        "model.id: model folder './no-such-folder' does not exist "
        f"(looked for {tmp_path / 'no-such-folder'}; "
        "relative paths are resolved against the recipe's folder)"
    )


def test_tiny_takes_no_revision_or_variant(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailableError) as error:
        resolve_model(
            ModelSpec("tiny", variant="fp16"),
            base_dir=tmp_path,
            models_dir=tmp_path,
            hash_memo=None,
        )
    assert str(error.value) == (
        "model.variant: the built-in model 'tiny' has no revisions or variants "
        "(remove the key, or name a hub model or a local folder)"
    )


def test_folder_without_model_index_loads_components_named_by_their_configs(
    tiny_folder: Path, tmp_path: Path
) -> None:
    shutil.copytree(tiny_folder / "unet", tmp_path / "bare" / "unet")
    resolved = resolve_model(
        ModelSpec("bare"), base_dir=tmp_path, models_dir=tmp_path, hash_memo=None
    )
    registry = ModelRegistry(
        resolved, device=torch.device("cpu"), dtype=torch.float32, models_dir=tmp_path
    )
    assert type(registry.get("unet")).__name__ == "UNet2DConditionModel"
    assert resolved.scheduler_config == {}
    with pytest.raises(ModelUnavailableError, match="has no component 'vae' \\(it has: unet\\)"):
        registry.get("vae")


def test_compiled_mode_is_recorded_in_keys_and_compiles_only_the_denoiser(
    models_dir: Path, tiny_folder: Path
) -> None:
    from editflow.models import ModelSection, RunModels, resolve_providers
    from editflow.models.specs import DENOISER

    plain, compiled = (
        resolve_providers(
            ModelSection(compile=flag), ["model.id"], base_dir=models_dir, models_dir=models_dir
        )["model.id"]
        for flag in (False, True)
    )
    assert "compiled" not in plain.fingerprint()
    assert compiled.fingerprint() == {**plain.fingerprint(), "compiled": True}
    # Only the denoiser is compiled: a VAE stage's key, which has no scheduler either, stays.
    assert (
        compiled.fingerprint({"vae"}) == plain.fingerprint({"vae"}) == {"identity": plain.identity}
    )
    assert compiled.fingerprint({"unet", "scheduler_config"}) == compiled.fingerprint()
    view = RunModels(
        {"model.id": compiled}, device=torch.device("cpu"), dtype=torch.float32,
        models_dir=models_dir,
    ).for_stage(DENOISER)  # fmt: skip
    unet = view.get("unet")  # compiled lazily: nothing runs until it is called
    assert type(unet).__name__ == "OptimizedModule"
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert type(view.get("text_encoder")).__name__ == "CLIPTextModel"


@pytest.mark.slow
def test_sd15_shaped_builds_offline_and_loads_into_diffusers_pipeline(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    folder = tiny.ensure_tiny(tmp_path, "sd15-shaped")
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    assert pipe.unet.config.block_out_channels == [320, 640, 1280, 1280]
    assert sum(p.numel() for p in pipe.unet.parameters()) > 8e8
    latents = pipe("a photo", num_inference_steps=1, height=64, width=64, output_type="latent")
    assert latents.images.shape == (1, 4, 8, 8)
