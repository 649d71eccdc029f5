"""The provider table: every recipe field that provides model parts resolves and loads from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from editflow.models import (
    PROVIDER_TABLE,
    ModelSection,
    RunModels,
    providers,
    resolve_providers,
    specs,
)
from editflow.models.providers import CAPTIONER, component_config
from editflow.models.tiny import tiny_identity, tiny_lpips_identity

# One declared part per provider: what a stage would ask each of them for.
PARTS = {
    spec.provider: spec
    for spec in (specs.UNET, specs.CAPTIONER, specs.CLIP, specs.CONTROLNET, specs.LPIPS)
}


def test_every_provider_is_a_recipe_field_with_its_default() -> None:
    schema = ModelSection.model_json_schema()["properties"]
    for provider in PROVIDER_TABLE:
        assert provider.field.startswith("model.")
        assert schema[provider.name]["default"] == provider.default, provider.field
        assert provider.field in PARTS, f"{provider.field}: add its part to PARTS"


def test_every_provider_resolves_on_tiny_to_tinys_identity(tmp_path: Path) -> None:
    fields = [provider.field for provider in PROVIDER_TABLE]
    resolved = resolve_providers(ModelSection(), fields, base_dir=tmp_path, models_dir=tmp_path)
    assert sorted(resolved) == sorted(fields)
    for field, model in resolved.items():
        assert model.provider == field
        # LPIPS's built-in network has its own identity: in tiny's, it would change every key.
        own = {"model.lpips": {"tiny_lpips": tiny_lpips_identity()}}
        assert model.fingerprint()["identity"] == own.get(field, {"tiny": tiny_identity()}), field
    assert list(tmp_path.iterdir()) == [], "resolving built or wrote nothing"


def test_every_provider_loads_its_declared_part_from_tiny(
    models_dir: Path, tiny_folder: Path
) -> None:
    fields = [provider.field for provider in PROVIDER_TABLE]
    resolved = resolve_providers(ModelSection(), fields, base_dir=models_dir, models_dir=models_dir)
    view = RunModels(
        resolved, device=torch.device("cpu"), dtype=torch.float32, models_dir=models_dir
    ).for_stage(PARTS.values())
    for spec in PARTS.values():
        loaded = view.get(spec.name)
        model = getattr(loaded, "model", loaded)  # helpers come with their processor
        assert type(model).__name__ == spec.family, spec


# The diffusers parts whose built-in config is their config.json (transformers helpers keep
# a builder's config instead): what ControlNet stages compare, before anything is built.
DIFFUSERS_CONFIGS = [(providers.MODEL, "unet", "id"), (providers.CONTROLNET, "", "controlnet")]


@pytest.mark.parametrize("provider, component, key", DIFFUSERS_CONFIGS, ids=["unet", "controlnet"])
def test_a_config_reads_the_same_from_the_built_in_table_and_from_the_built_folder(
    provider: Any, component: str, key: str, tiny_folder: Path, models_dir: Path
) -> None:
    folder = tiny_folder / (provider.tiny_part or "")
    as_tiny, as_folder = (
        resolve_providers(section, [provider.field], base_dir=models_dir, models_dir=models_dir)[
            provider.field
        ]
        for section in (ModelSection(), ModelSection(**{key: str(folder)}))
    )
    built_in, on_disk = component_config(as_tiny, component), component_config(as_folder, component)
    assert as_folder.folder == folder and built_in is not None and on_disk is not None
    assert built_in == {name: on_disk[name] for name in built_in}


def test_the_captioner_provider_measures_prompts_alike_from_tiny_and_from_its_folder(
    tiny_folder: Path, models_dir: Path
) -> None:
    as_tiny, as_folder = (
        resolve_providers(
            ModelSection(captioner=captioner), [CAPTIONER.field],
            base_dir=models_dir, models_dir=models_dir,
        )[CAPTIONER.field]
        for captioner in ("tiny", str(tiny_folder / "captioner"))
    )  # fmt: skip
    prompt = "a photo of a cat"
    assert as_tiny.folder is None and as_folder.folder is not None
    assert CAPTIONER.text_positions(as_tiny) == CAPTIONER.text_positions(as_folder) > 0
    assert CAPTIONER.prompt_tokens(as_tiny, prompt) == CAPTIONER.prompt_tokens(as_folder, prompt)
    assert CAPTIONER.prompt_tokens(as_tiny, prompt) > 1


def test_a_part_a_built_in_model_lacks_has_no_config(tmp_path: Path) -> None:
    # tiny-pixel denoises pixels: asking for its VAE's config (a latent size) is None, not
    # a KeyError, so a check can ask any model.
    pixel = resolve_providers(
        ModelSection(id="tiny-pixel"), ["model.id"], base_dir=tmp_path, models_dir=tmp_path
    )["model.id"]
    assert component_config(pixel, "vae") is None
    assert component_config(pixel, "unet")["in_channels"] == 3


def test_an_unreachable_hub_is_one_line_and_offline_says_how_to_get_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from huggingface_hub import constants

    from editflow.cli import main

    # As on a machine with no network and nothing set: the Hub is asked, and cannot answer
    # (a closed port here, so the test is as fast offline as online).
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    recipe = tmp_path / "r.toml"
    recipe.write_text('schema_version = 1\n[model]\nid = "org/model"\n[stages.bank]\n'
                      'kind = "direction.bank_mean"\nword = "cat"\n')  # fmt: skip
    argv = ["validate", str(recipe), "--cache", str(tmp_path / "c")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith(
        f"{recipe}:3: model.id: cannot reach the Hugging Face Hub for 'org/model': "
    )
    assert err.rstrip().endswith("(set HF_HUB_OFFLINE=1 or pass --offline to use only the local"
                                 " cache, or set model.id to a local folder)")  # fmt: skip
    assert main([*argv, "--offline"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"{recipe}:3: model.id: model 'org/model' is not available offline (run 'hf download"
        " org/model' with network access, or set model.id to a local folder)"
    )
