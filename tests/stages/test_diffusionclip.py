"""DiffusionCLIP: the t0 grid against diffusers, mixing invariants, fine-tuning, the
weights artifact in the cache, and the recipes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel
from support import MANIFESTS

from editflow.cache import Cache
from editflow.cache.artifacts import read_outputs, write_outputs
from editflow.cli import main
from editflow.engine.api import plan_recipe, run_recipe
from editflow.models.registry import ModelWithProcessor
from editflow.models.tiny import ensure_tiny
from editflow.stages.ddim_loops import ddim_invert, ddim_sample
from editflow.stages.diffusion import unet_noise_predictor
from editflow.stages.diffusionclip.finetuning import (
    clip_pixels,
    directional_clip_loss,
    finetune,
    image_features,
    text_direction,
)
from editflow.stages.grid_scheduler import GridScheduler, t0_grid
from editflow.stages.tuned import mix_coefficients, mixing_predictor

FINETUNE = MANIFESTS / "diffusionclip" / "finetune.toml"
MIX = MANIFESTS / "diffusionclip" / "mix.toml"
MULTI = MANIFESTS / "diffusionclip" / "multi_attribute.toml"


@pytest.fixture(scope="module")
def pixel(models_dir: Path):
    folder = ensure_tiny(models_dir, "tiny-pixel")
    unet = UNet2DModel.from_pretrained(folder / "unet").eval().requires_grad_(False)
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return unet, scheduler, images


@pytest.fixture(scope="module")
def clip(tiny_folder: Path):
    from transformers import CLIPModel, CLIPProcessor

    folder = tiny_folder / "clip"
    model = CLIPModel.from_pretrained(folder).eval().requires_grad_(False)
    return ModelWithProcessor(model, CLIPProcessor.from_pretrained(folder))


def _tuned_state(unet: UNet2DModel, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: value + 0.02 * torch.randn(value.shape, generator=generator)
        for name, value in unet.state_dict().items()
    }


def test_generation_on_the_grid_equals_a_diffusers_ddim_loop(pixel) -> None:
    unet, scheduler, images = pixel
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    grid = GridScheduler.from_scheduler(scheduler, t0_grid(400, 41))
    ours = ddim_sample(unet_noise_predictor(unet), x, grid, None)
    # diffusers' DDIM with 100 of 1000 steps walks the same 10-step grid; from 400 to 0 and
    # then to the clean image (set_alpha_to_one).
    peer = DDIMScheduler.from_config(scheduler.config)
    peer.set_timesteps(100)
    theirs = x
    with torch.no_grad():
        for t in [t for t in peer.timesteps if t <= 400]:
            theirs = peer.step(unet(theirs, t).sample, t, theirs).prev_sample
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_inversion_to_t0_and_back_reconstructs_better_with_more_steps(pixel) -> None:
    unet, scheduler, images = pixel
    predict = unet_noise_predictor(unet)
    errors = []
    for steps in (4, 12, 40):
        grid = t0_grid(400, steps)
        up = GridScheduler.from_scheduler(scheduler, grid, inverse=True)
        x_t0, trajectory = ddim_invert(predict, images, up, None)
        assert trajectory.shape == (steps, *images.shape)  # x0 and x after each step
        generated = ddim_sample(predict, x_t0, GridScheduler.from_scheduler(scheduler, grid), None)
        errors.append(float((generated - images).abs().mean()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.05  # of a [-1, 1] range


def test_ratio_0_is_the_original_and_1_the_tuned_model_exactly(pixel) -> None:
    unet, scheduler, images = pixel
    before = {name: value.clone() for name, value in unet.state_dict().items()}
    tuned = _tuned_state(unet, 0)
    copy = UNet2DModel.from_config(unet.config).eval()
    copy.load_state_dict(tuned)
    x, t = images[:1], torch.tensor(300)
    original = unet_noise_predictor(unet)(x, t, None)
    with torch.no_grad():
        assert torch.equal(mixing_predictor(unet, [tuned], 0.0)(x, t, None), original)
        assert torch.equal(mixing_predictor(unet, [tuned], 1.0)(x, t, None), copy(x, t).sample)
        half = mixing_predictor(unet, [tuned], 0.5)(x, t, None)
    torch.testing.assert_close(half, 0.5 * original + 0.5 * copy(x, t).sample.detach())
    assert all(torch.equal(before[name], value) for name, value in unet.state_dict().items())


def test_one_hot_multi_attribute_weights_equal_the_single_model(pixel) -> None:
    unet, _, images = pixel
    first, second = _tuned_state(unet, 1), _tuned_state(unet, 2)
    x = images[:1]
    table = {"300": [0.0, 2.0], "0": [1.0, 0.0]}
    mixed = mixing_predictor(unet, [first, second], table)
    with torch.no_grad():
        for t, alone in ((500, second), (300, second), (200, first), (0, first)):
            single = mixing_predictor(unet, [alone], 1.0)(x, torch.tensor(t), None)
            assert torch.equal(mixed(x, torch.tensor(t), None), single)


def test_the_first_threshold_not_above_t_applies_normalised() -> None:
    table = {"300": [0.4, 0.6], "0": [0.15, 0.85]}
    assert mix_coefficients(table, 2, 999) == [(0, 0.4), (1, 0.6)]
    assert mix_coefficients(table, 2, 300) == [(0, 0.4), (1, 0.6)]
    assert mix_coefficients(table, 2, 299) == [(0, 0.15), (1, 0.85)]
    assert mix_coefficients({"100": [1, 3]}, 2, 50) == [(0, 0.25), (1, 0.75)]
    assert mix_coefficients(0.25, 1, 10) == [(-1, 0.75), (0, 0.25)]
    assert mix_coefficients(1.0, 1, 10) == [(0, 1.0)]


def test_clip_preprocessing_matches_clips_processor(clip) -> None:
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    ours = clip_pixels(clip.processor, images * 2 - 1)
    arrays = [(image * 255).round().byte().permute(1, 2, 0).numpy() for image in images]
    theirs = clip.processor(images=arrays, return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape
    # PIL's bicubic and torch's antialiased bicubic differ by rounding and edge handling.
    assert float((ours - theirs).abs().mean()) < 0.05


@pytest.mark.parametrize("mode", ["full", "light"])
def test_fine_tuning_lowers_the_directional_clip_loss(pixel, clip, mode: str) -> None:
    unet, scheduler, images = pixel
    tuned = UNet2DModel.from_config(unet.config)
    tuned.load_state_dict(unet.state_dict())
    generation = GridScheduler.from_scheduler(scheduler, t0_grid(400, 6))
    inversion = GridScheduler.from_scheduler(scheduler, t0_grid(400, 10), inverse=True)
    x_t0, _ = ddim_invert(unet_noise_predictor(unet), images, inversion, None)
    direction = text_direction(clip.model, clip.processor, "photo", "sketch")
    sources = image_features(clip.model, clip.processor, images)

    def loss(x0: torch.Tensor, index: int) -> torch.Tensor:
        return 3 * directional_clip_loss(
            clip.model, clip.processor, x0, sources[index : index + 1], direction
        )

    def clip_loss() -> float:
        with torch.no_grad():
            generated = ddim_sample(unet_noise_predictor(tuned), x_t0, generation, None)
            return float(
                directional_clip_loss(clip.model, clip.processor, generated, sources, direction)
            )

    before = clip_loss()
    losses = finetune(
        unet_noise_predictor(tuned), list(tuned.parameters()), x_t0, generation, loss,
        epochs=3, learning_rate=2e-4, mode=mode,
    )  # fmt: skip
    assert len(losses) == 3 * 2 * (1 if mode == "full" else 6)
    assert clip_loss() < before - 0.05
    assert all(torch.equal(a, b) for a, b in zip(unet.parameters(), unet.parameters(), strict=True))


def test_checkpointed_fine_tuning_recomputes_the_same_chain(pixel) -> None:
    unet, scheduler, images = pixel
    # A v-prediction reading of the model and a grid that repeats a timestep: each step is
    # recomputed by its index, whatever its timestep.
    generation = GridScheduler(
        scheduler.alphas_cumprod, [0, 0, 200, 400], prediction_type="v_prediction"
    )
    tuned = []
    for checkpointing in (True, False):
        model = UNet2DModel.from_config(unet.config)
        model.load_state_dict(unet.state_dict())
        losses = finetune(
            unet_noise_predictor(model), list(model.parameters()), images, generation,
            lambda x0, index: x0.square().mean(), epochs=2, learning_rate=1e-3,
            checkpointing=checkpointing,
        )  # fmt: skip
        tuned.append((losses, list(model.parameters())))
    (losses, checkpointed), (plain_losses, plain) = tuned
    torch.testing.assert_close(losses, plain_losses, rtol=1e-6, atol=0.0)
    for a, b in zip(checkpointed, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_weights_round_trip_through_the_cache_bit_for_bit(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    weights = {
        "conv_in.weight": torch.randn(16, 3, 3, 3, generator=generator),
        "down_blocks.0.resnets.0.norm1.bias": torch.tensor([1e-38, -0.0, 3.4e38, 1 / 3]),
    }
    cache = Cache(tmp_path / "c")
    key = "ab" * 32
    with cache.writer(key, {}) as writer:
        write_outputs(writer, {"weights": weights}, {"weights": "tensors"}, {}, 0.0)
    back = read_outputs(cache, cache.get(key), {"weights": "tensors"})["weights"]
    assert sorted(back) == sorted(weights)
    for name, value in weights.items():
        assert back[name].dtype == torch.float32
        assert back[name].view(torch.int32).equal(value.view(torch.int32))


def test_changing_the_ratio_reuses_the_fine_tune_and_tuned_weights_key_downstream(
    tmp_path: Path,
) -> None:
    cache = Cache(tmp_path / "c")
    fast = ["stages.finetune.epochs=1"]
    first = run_recipe(MIX, fast, cache=cache, out_dir=None, device="cpu")
    assert "finetune" in first.computed
    edits = {name: cache.get(first.keys[name]).tensor("latents") for name in ("edit_0", "edit_1")}
    # r = 0 is the original model: the inversion regenerated without tuned weights.
    reconstruct = run_recipe(
        FINETUNE, fast, cache=cache, out_dir=None, device="cpu", targets=["reconstruct"]
    )
    assert torch.equal(
        edits["edit_0"], cache.get(reconstruct.keys["reconstruct"]).tensor("latents")
    )
    assert not torch.equal(edits["edit_0"], edits["edit_1"])

    again = run_recipe(MIX, [*fast, "stages.edit_half.ratio=0.25"], cache=cache, out_dir=None,
                       device="cpu")  # fmt: skip
    assert again.computed == ["edit_half", "decode_half", "figure"]

    other = plan_recipe(MIX, ["stages.finetune.epochs=2"], cache=cache)
    changed = {name for name, stage in other.stages.items() if stage.key != first.keys.get(name)}
    # Every stage downstream of the weights, even r = 0's, whose numbers do not change.
    assert changed == {"finetune", "edit_0", "edit_half", "edit_1", "decode_0", "decode_half",
                       "decode_1", "figure"}  # fmt: skip


def test_a_pixel_model_with_fewer_training_steps_refuses_a_later_t0(
    tmp_path: Path, models_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    model = tmp_path / "recipe" / "short-ddpm"
    shutil.copytree(ensure_tiny(models_dir, "tiny-pixel"), model)
    config_path = model / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["num_train_timesteps"] = 300
    config_path.write_text(json.dumps(config))
    recipe = shutil.copy(FINETUNE, tmp_path / "recipe" / "finetune.toml")
    code = main(["validate", str(recipe), "--cache", str(tmp_path / "c"), "--set",
                 'model.id="short-ddpm"', "--set", 'model.clip="tiny"'])  # fmt: skip
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    expected = "t0: is 400 but model 'short-ddpm' has 300 training steps (timesteps 0 to 299)"
    # Every stage on the grid, those that take t0 from their inversion too.
    stages = ["invert_cat", "invert_astronaut", "finetune", "invert", "reconstruct", "edit"]
    assert [line.split(": ", 1)[1] for line in lines] == [
        f"stages.{stage}.{expected}" for stage in stages
    ]
    assert all(line.startswith(f"{recipe}:") for line in lines)


def test_the_directional_loss_and_text_direction_forms_follow_their_formulas():
    """DiffusionCLIP (Kim et al. 2022): L_dir = 1 - cos(dI, dT); the released code trains
    -log((2 - L_dir) / 2) and forms dT as the mean of per-template differences. float64
    references written from those formulas."""
    import numpy as np

    from editflow.stages.diffusionclip.finetuning import direction_from_features, loss_of_cosine

    cosine = torch.tensor([-0.5, 0.1, 0.9])
    c = cosine.double().numpy()
    assert np.allclose(loss_of_cosine(cosine, "direction").item(), np.mean(1 - c), rtol=1e-6)
    assert np.allclose(loss_of_cosine(cosine, "log").item(), np.mean(-np.log((2 - (1 - c)) / 2)),
                       rtol=1e-6)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    source, target = (
        torch.randn(16, 8, generator=generator),
        torch.randn(16, 8, generator=generator),
    )
    s, t = source.double().numpy(), target.double().numpy()
    unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
    ours = unit(unit(unit(t).mean(0)) - unit(unit(s).mean(0)))
    released = unit((unit(t) - unit(s)).mean(0))
    assert np.allclose(direction_from_features(source, target).double().numpy(), ours, atol=1e-6)
    assert np.allclose(direction_from_features(source, target, "released").double().numpy(),
                       released, atol=1e-6)  # fmt: skip
    assert float(ours @ released) < 0.99  # two different directions


def test_the_released_loss_form_reaches_the_fine_tune(tmp_path: Path) -> None:
    """The first optimiser step's loss (before any update) in the log form is -log of
    (2 - L) / 2 of the direction form's, times w_clip = 3: L = loss / 3."""
    import math

    cache = Cache(tmp_path / "c")
    losses = {}
    for form in ("direction", "log"):
        overrides = ["stages.finetune.epochs=1", f'stages.finetune.clip_loss="{form}"']
        result = run_recipe(FINETUNE, overrides, cache=cache, out_dir=None, device="cpu",
                            targets=["finetune"])  # fmt: skip
        losses[form] = cache.get(result.keys["finetune"]).tensor("losses")
    direction = float(losses["direction"][0]) / 3
    assert math.isclose(float(losses["log"][0]) / 3, -math.log((2 - direction) / 2), rel_tol=1e-4)


def test_the_imagenet_80_set_is_clips_80_distinct_templates() -> None:
    from editflow.stages.diffusionclip.templates import EDITFLOW_16, IMAGENET_80, TEMPLATE_SETS

    assert len(IMAGENET_80) == len(set(IMAGENET_80)) == 80
    assert all(template.count("{}") == 1 for template in IMAGENET_80)
    # Spot checks against CLIP's notebook: its first, a middle and its last template.
    assert IMAGENET_80[0] == "a bad photo of a {}."
    assert IMAGENET_80[35] == "a {} in a video game."
    assert IMAGENET_80[-1] == "a tattoo of the {}."
    assert set(EDITFLOW_16) < set(IMAGENET_80) and len(EDITFLOW_16) == 16
    assert TEMPLATE_SETS == {"editflow-16": EDITFLOW_16, "imagenet-80": IMAGENET_80}


@pytest.mark.parametrize("form", ["template-means", "released"])
def test_the_imagenet_80_text_direction_equals_a_float64_computation(clip, form: str) -> None:
    """Each template's text features taken one prompt at a time (no padding), then the
    direction formed in float64 over all 80."""
    import numpy as np

    from editflow.stages.clip import projected
    from editflow.stages.diffusionclip.templates import IMAGENET_80

    def features(text: str) -> np.ndarray:
        rows = []
        for template in IMAGENET_80:
            tokens = clip.processor.tokenizer([template.format(text)], return_tensors="pt")
            with torch.no_grad():
                rows.append(projected(clip.model.get_text_features(**tokens))[0].double().numpy())
        return np.stack(rows)  # (80, D)

    unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
    source, target = unit(features("photo")), unit(features("sketch"))
    if form == "released":
        expected = unit((target - source).mean(0))
    else:
        expected = unit(unit(target.mean(0)) - unit(source.mean(0)))
    ours = text_direction(clip.model, clip.processor, "photo", "sketch", form, IMAGENET_80)
    assert ours.dtype == torch.float32 and ours.shape == expected.shape
    assert np.allclose(ours.double().numpy(), expected, atol=1e-5)
    sixteen = text_direction(clip.model, clip.processor, "photo", "sketch", form)
    assert not np.allclose(sixteen.double().numpy(), expected, atol=1e-3)
