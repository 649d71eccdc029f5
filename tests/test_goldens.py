"""Stage-version guards: every kind keeps the numbers of its golden at its version."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from goldens import MANIFESTS, REGENERATE, compare, sources, stage_outputs

from editflow.cache import Cache
from editflow.stages import STAGE_KINDS
from editflow.stages.io.decode import DecodeVae


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
        f" and regenerate its golden with `{REGENERATE} decode.vae`"
    )
    monkeypatch.setattr(DecodeVae, "version", "2")
    assert compare(kind, outputs) == (
        f"decode.vae is at version 2 but its golden at 1: regenerate it with `{REGENERATE} decode.vae`"
    )


class _Maps:
    """Attention maps with every value moved (as the stage's output would be)."""

    def __init__(self, maps, move) -> None:
        self.maps, self.move = maps, move

    def __len__(self) -> int:
        return len(self.maps)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {layer: self.move(value) for layer, value in self.maps[index].items()}


def _moved(outputs: dict, kind, fraction: float, alternating: bool = False) -> dict:
    """Every tensor output moved by ``fraction`` of its scale (its largest magnitude; at least
    1 for scores), stored back in its own dtype; ``alternating`` moves neighbours in opposite
    directions, as rounding noise does, instead of all one way, as a change of method does."""
    from editflow.stages import ArtifactType

    scores = {port.name for port in kind.outputs if port.type == ArtifactType.SCORES}

    def mover(name: str, scale: float):
        def move(value: torch.Tensor) -> torch.Tensor:
            step = fraction * (max(scale, 1.0) if name in scores else scale)
            if alternating:
                signs = torch.ones(value.numel())
                signs[1::2] = -1
                return (value.float() + step * signs.reshape(value.shape)).to(value.dtype)
            return (value.float() + step).to(value.dtype)

        return move

    moved = {}
    for name, value in outputs.items():
        if isinstance(value, torch.Tensor):
            moved[name] = mover(name, value.float().abs().nan_to_num(0).max().item())(value)
        elif isinstance(value, dict):
            scale = max(v.float().abs().max().item() for v in value.values())
            moved[name] = {key: mover(name, scale)(v) for key, v in value.items()}
        elif hasattr(value, "__getitem__"):  # attention maps, step by step
            first = value[0]
            scale = max(v.float().abs().max().item() for v in first.values())
            moved[name] = _Maps(value, mover(name, scale))
        else:
            moved[name] = value
    return moved


@pytest.mark.parametrize(
    "kind", ["decode.vae", "guide.attention_reference", "rank.clip", "finetune.diffusionclip"]
)
def test_a_move_of_a_thousandth_of_the_scale_fails_and_noise_of_a_hundred_thousandth_passes(
    cache: Cache, kind: str
) -> None:
    """The tolerance tells platform rounding (noise of at most ~5e-5 of the scale, measured)
    from a change of method: float32 outputs, float16 attention maps, scores and tuned
    weights."""
    recipe, stage = sources()[kind]
    found, outputs = stage_outputs(cache, recipe, stage)
    assert compare(found, outputs) is None
    assert compare(found, _moved(outputs, found, 1e-5, alternating=True)) is None
    assert compare(found, _moved(outputs, found, 1e-3)).startswith(
        f"{kind} computes other numbers than its golden"
    )
