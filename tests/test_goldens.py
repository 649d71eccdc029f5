"""Stage-version guards: every kind keeps the numbers of its golden at its version."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from goldens import MANIFESTS, REGENERATE, compare, sources, stage_outputs

from editflow.cache import Cache
from editflow.stages import STAGE_KINDS
from editflow.stages.decode import DecodeVae


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Cache:
    return Cache(tmp_path_factory.mktemp("goldens") / "cache")


def test_every_stage_kind_has_an_example_and_a_golden() -> None:
    assert sorted(sources()) == sorted(kind.kind for kind in STAGE_KINDS)
    folder = Path(__file__).parent / "goldens"
    assert sorted(path.stem for path in folder.glob("*.safetensors")) == sorted(sources())


@pytest.mark.parametrize("kind", sorted(sources()))
def test_each_kind_keeps_its_golden_at_its_version(cache: Cache, kind: str) -> None:
    recipe, stage = sources()[kind]
    found, outputs = stage_outputs(cache, recipe, stage)
    assert compare(found, outputs) is None


def test_changed_numbers_under_the_same_version_fail_with_the_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = DecodeVae.run

    def brighter(self, ctx, params, *, latents: torch.Tensor):
        outputs = original(self, ctx, params, latents=latents)
        return {"images": (outputs["images"] + 0.01).clamp(0, 1)}

    monkeypatch.setattr(DecodeVae, "run", brighter)
    kind, outputs = stage_outputs(
        Cache(tmp_path / "c"), MANIFESTS / "quickstart.toml", "decode_edit"
    )
    assert compare(kind, outputs) == (
        "decode.vae computes other numbers than its golden at version 1: bump DecodeVae.version"
        f" and regenerate the goldens with `{REGENERATE}`"
    )
    monkeypatch.setattr(DecodeVae, "version", "2")
    assert compare(kind, outputs) == (
        f"decode.vae is at version 2 but its golden at 1: regenerate them with `{REGENERATE}`"
    )
