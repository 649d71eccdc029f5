"""The one check hook: the plan runs each kind's ``check`` once, with what it knows, and a
run never checks again (docs/checks.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from support import ROOT

from editflow.cache import Cache
from editflow.engine.api import plan_recipe, run_recipe
from editflow.errors import Problem
from editflow.stages import STAGE_KINDS, StageKind
from editflow.stages.checks import CheckView
from editflow.stages.compositing.kinds import LocalIlvrParams, SampleLocalIlvr

QUICKSTART = ROOT / "manifests" / "quickstart.toml"
FAST = ["stages.invert.num_inference_steps=2", "stages.edit.num_inference_steps=2",
        "stages.reconstruct.num_inference_steps=2"]  # fmt: skip


def _vae(down_blocks: int) -> CheckView:
    """A view of a 64x64 reference and mask on a model whose VAE has ``down_blocks`` blocks."""
    configs = {"vae": {"block_out_channels": [32] * down_blocks}, "unet": {"in_channels": 4}}
    return CheckView(
        references={"reference": "encode.latents", "mask": "inputs.mask"},
        sizes={"reference": (64, 64), "mask": (64, 64)},
        configs=lambda component, provider: configs.get(component),
    )


def test_latent_sizes_come_from_the_models_vae_config_not_a_constant() -> None:
    params = LocalIlvrParams(n_in=16)
    # Three down blocks halve twice: 64 px is 16 latent pixels, which 16 divides.
    assert _vae(3).vae_factor == 4 and _vae(3).latent_size("reference") == (16, 16)
    assert SampleLocalIlvr.check(params, _vae(3)) == []
    # Four halve three times (Stable Diffusion, tiny): 8 latent pixels.
    assert SampleLocalIlvr.check(params, _vae(4)) == [
        Problem("n_in = 16 does not divide the latent size 8x8", key="n_in")
    ]
    # A view that does not know the VAE (a pixel model, a model not on disk) skips the rule.
    assert SampleLocalIlvr.check(params, CheckView(sizes={"reference": (64, 64)})) == []


def test_the_plan_checks_each_stage_once_and_a_run_never_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    for kind in STAGE_KINDS:
        original = kind.check.__func__

        def counted(cls: type[StageKind], params, view, original=original):  # noqa: ANN001
            calls.append(cls.kind)
            return original(cls, params, view)

        monkeypatch.setattr(kind, "check", classmethod(counted))
    cache = Cache(tmp_path / "cache")
    plan = plan_recipe(QUICKSTART, FAST, cache=cache)
    planned = sorted(stage.kind.kind for stage in plan.stages.values())
    assert sorted(calls) == planned
    calls.clear()
    result = run_recipe(QUICKSTART, FAST, cache=cache, out_dir=tmp_path / "out")
    assert len(result.computed) == len(plan.stages)
    assert sorted(calls) == planned  # the run's own plan, and nothing while running


def test_a_check_problem_is_located_at_the_stage_key_and_reported_with_the_others(
    tmp_path: Path,
) -> None:
    from editflow.errors import RecipeError

    overrides = [*FAST, 'stages.figure.labels=["one"]', "stages.edit.ratio=0.5"]
    with pytest.raises(RecipeError) as error:
        plan_recipe(QUICKSTART, overrides, cache=Cache(tmp_path / "cache"))
    assert str(error.value).splitlines() == [
        f"{QUICKSTART}:45: stages.figure: labels has 1 entries but images has 3",
        "--set stages.edit.ratio=0.5: stages.edit.ratio: mixes tuned weights with the original,"
        " but no weights are connected: connect weights or remove ratio",
    ]


def test_call_checks_like_a_plan_before_anything_loads() -> None:
    import torch

    from editflow.errors import EditflowError
    from editflow.stages.base import StageContext
    from editflow.stages.pix2pix_zero.sample import SamplePix2PixZero, SamplePix2PixZeroParams

    ctx = StageContext("guided", 0, torch.device("cpu"), torch.float32, models=None)
    inputs = {"x_T": torch.zeros(1, 4, 8, 8), "prompt_embeds": torch.zeros(1, 77, 32),
              "direction": torch.zeros(1, 77, 32)}  # fmt: skip
    with pytest.raises(EditflowError) as error:
        SamplePix2PixZero().call(ctx, SamplePix2PixZeroParams(xa_guidance=0.1), inputs)
    assert str(error.value) == (
        "stages.guided.attention_maps: xa_guidance is 0.1 but no attention_maps are connected"
        " (connect a guide.attention_reference stage or set xa_guidance = 0)"
    )


MANIFESTS = ROOT / "manifests"


def _two_inversions(folder: Path) -> Path:
    """text_edit.toml with a second inversion that the edit takes its path from."""
    recipe = MANIFESTS / "edit_friendly" / "text_edit.toml"
    text = recipe.read_text().replace(
        '[stages.edit]\n', '[stages.invert2]\nkind = "invert.edit_friendly"\nlatents = "encode.latents"\n\n[stages.edit]\n'
    ).replace('auxiliary_path = "invert.auxiliary_path"', 'auxiliary_path = "invert2.auxiliary_path"', 1)  # fmt: skip
    for item in recipe.parent.iterdir():
        if not item.name.startswith("text_edit"):
            (folder / item.name).symlink_to(item)
    (folder / "edit.toml").write_text(text)
    return folder / "edit.toml"


def _quickstart_with(stages: str) -> Callable[[Path], Path]:
    """The quick start with more stages appended (its stages: encode, invert (DDIM) ...)."""

    def write(folder: Path) -> Path:
        path = folder / "quickstart.toml"
        path.write_text((MANIFESTS / "quickstart.toml").read_text() + stages)
        return path

    return write


_EF = '\n[stages.ef]\nkind = "invert.edit_friendly"\nlatents = "encode.latents"\n'

# Each misuse that used to run and give a wrong result: refused by validate, one located line.
MISUSES = [
    ("RePaint without a jump", lambda d: MANIFESTS / "compositing" / "immersion.toml",
     ["--set", "stages.immerse.repaint_jump=10"],
     "{f}:35: stages.immerse.repaint_start: is 0.2 but the last 20% of 20 steps hold no multiple"
     " of repaint_jump = 10: RePaint would never resample (use more steps or a shorter"
     " repaint_jump)"),
    ("immersion on an inpainting UNet", lambda d: MANIFESTS / "compositing" / "immersion.toml",
     ["--set", 'model.id="tiny-inpaint"'],
     "{f}:40: stages.immerse.preset: preset 'immersion' guides a plain UNet; this model's is an"
     " inpainting UNet (9 input channels), which would regenerate everything but the object (use"
     " preset 'background', or a plain model)"),
    ("t0 against the inversions", lambda d: MANIFESTS / "diffusionclip" / "finetune.toml",
     ["--set", "stages.finetune.t0=600"],
     "--set stages.finetune.t0=600: stages.finetune.t0: is 600 but inverted come from"
     " 'invert_cat', which has 400 (leave it out to take the producer's)"),
    ("one-model ratio table", lambda d: MANIFESTS / "diffusionclip" / "mix.toml",
     ["--set", "stages.edit_half.ratio={0=[0.3]}"],
     "--set stages.edit_half.ratio={{0=[0.3]}}: stages.edit_half.ratio: is a table, but with one"
     " tuned model each threshold's weights are normalised to 1: the original model is never"
     " mixed in (give one number, such as ratio = 0.3, to mix one tuned model with the"
     " original)"),
    ("maps and path of two inversions", _two_inversions, [],
     "{f}:32: stages.edit.auxiliary_path: comes from 'invert2' but noise_maps from 'invert': the"
     " edit retraces one inversion (connect both to the same invert.edit_friendly stage)"),
    # What the data is (a clean x0, a DDIM x_T, an edit-friendly x_T) is its artifact type.
    ("edit-friendly x_T into pix2pix-zero",
     _quickstart_with(_EF + '[stages.guide]\nkind = "guide.attention_reference"\nx_T = "ef.x_T"\n'
                      'prompt_embeds = "invert.prompt_embeds"\n'),
     [], "{f}:56: stages.guide.x_T: 'ef.x_T' is a stochastic x_T (an edit-friendly inversion), but"
         " this input takes a deterministic x_T (a DDIM inversion)"),
    ("edit-friendly x_T into sample.ddim", _quickstart_with(_EF),
     ["--set", "stages.edit.latents=ef.x_T"],
     "--set stages.edit.latents=ef.x_T: stages.edit.latents: 'ef.x_T' is a stochastic x_T (an"
     " edit-friendly inversion), but this input takes a deterministic x_T (a DDIM inversion)"),
    ("inverted x_T as interpolation frames",
     _quickstart_with('\n[stages.between]\nkind = "sample.interpolate"\n'
                      'latents = ["encode.latents", "invert.latents"]\n'),
     [], "{f}:53: stages.between.latents.1: 'invert.latents' is a deterministic x_T (a DDIM"
         " inversion), but this input takes a clean latent (x0)"),
    ("a plain-UNet kind on an inpainting UNet", lambda d: MANIFESTS / "quickstart.toml",
     ["--set", 'model.id="tiny-inpaint"', "--target", "invert"],
     "{f}:17: stages.invert: model 'tiny-inpaint' has an inpainting UNet (9 input channels for"
     " 4): invert.ddim gives it no mask or masked image (use a plain model; sample.local_ilvr"
     " drives this one)"),
    ("pix2pix-zero on a model without text", lambda d: MANIFESTS / "pix2pix_zero" / "cat2dog.toml",
     ["--set", 'model.id="tiny-pixel"', "--target", "direction"],
     "{f}:31: stages.direction: direction.pix2pix_zero works with text embeddings, but model"
     " 'tiny-pixel' has no text encoder (an unconditional UNet)"),
    ("clean latents as sample.ddim's start", lambda d: MANIFESTS / "quickstart.toml",
     ["--set", "stages.edit.latents=encode.latents"],
     "--set stages.edit.latents=encode.latents: stages.edit.latents: 'encode.latents' is a clean"
     " latent (x0), but this input takes a deterministic x_T (a DDIM inversion)"),
]  # fmt: skip


@pytest.mark.parametrize("recipe, args, expected", [case[1:] for case in MISUSES],
                         ids=[case[0] for case in MISUSES])  # fmt: skip
def test_silent_misuses_are_refused_by_validate_in_one_located_line(
    recipe, args: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from editflow.cli import main

    path = recipe(tmp_path)
    code = main(["validate", str(path), "--cache", str(tmp_path / "c"), *args])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [expected.format(f=path)]


def test_a_step_count_unlike_the_inversion_is_a_note_not_a_refusal(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from editflow.cli import main

    recipe, cache = MANIFESTS / "quickstart.toml", str(tmp_path / "c")
    change = "stages.edit.num_inference_steps=10"
    note = (f"note: --set {change}: stages.edit.num_inference_steps: is 10 but latents come from"
            " 'invert', which inverted in 20: sampling will not retrace the inversion")  # fmt: skip
    for command in ("validate", "plan"):
        assert main([command, str(recipe), "--cache", cache, "--set", change]) == 0
        assert capsys.readouterr().err.splitlines() == [note]
    # The same steps: nothing to say.
    assert main(["plan", str(recipe), "--cache", cache]) == 0
    assert capsys.readouterr().err == ""
