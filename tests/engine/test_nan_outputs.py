"""A stage whose output holds NaN fails, names the output (or, where the stage knows, the
reason), and caches nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support import MANIFESTS, invert_recipe

from editflow.cache import Cache
from editflow.cli import main
from editflow.engine.api import plan_recipe
from editflow.errors import EditflowError
from editflow.stages.nan import check_no_nan


def test_a_nan_output_fails_its_stage_in_one_line_and_is_not_cached(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # pix2pix-zero's regularised inversion on a 2x2 latent (16 px): the KL step (lambda 20
    # over 16 values) overshoots and diverges, so every value of x_T is NaN.
    recipe = invert_recipe(tmp_path, size=16, invert_lines="regularize = true")
    cache = tmp_path / "cache"
    code = main(["run", str(recipe), "--cache", str(cache), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"{recipe}: stages.invert: stage 'invert' (invert.ddim) failed: the noise"
        " regularisation diverged on a 2x2 latent (lambda_kl = 20 over 16 values per sample):"
        " use a larger image or a smaller lambda_kl"
    )
    assert "Traceback" not in err
    plan = plan_recipe(recipe, cache=Cache(cache))
    assert Cache(cache).has(plan.stages["encode"].key), "the stage before it is kept"
    assert not Cache(cache).has(plan.stages["invert"].key)
    assert not (tmp_path / "out").exists()


def test_float16_nan_hints_at_float32_and_infinity_passes() -> None:
    half = torch.tensor([1.0, float("nan"), 2.0], dtype=torch.float16)
    with pytest.raises(EditflowError) as raised:
        check_no_nan({"images": [torch.zeros(2), half]}, torch.float16)
    assert raised.value.render() == (
        "output 'images' has 1 NaN values of 3"
        ' (float16 can overflow where float32 does not: try model.dtype = "float32")'
    )
    check_no_nan({"psnr": torch.tensor([float("inf"), 31.5]), "steps": torch.arange(3)},
                 torch.float32)  # fmt: skip


def test_scores_may_say_not_ranked_with_nan(tmp_path: Path) -> None:
    """sample.interpolate's scores are NaN for frames nobody ranked: a value, not a failure."""
    from editflow.engine.api import run_recipe

    recipe = MANIFESTS / "interpolation" / "photos.toml"
    result = run_recipe(recipe, cache=Cache(tmp_path / "c"), out_dir=None, device="cpu",
                        targets=["interpolate"])  # fmt: skip
    scores = Cache(tmp_path / "c").get(result.keys["interpolate"]).tensor("scores")
    assert torch.isnan(scores).any() and torch.isfinite(scores).any()
