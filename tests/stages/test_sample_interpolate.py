"""sample.interpolate: METHODS.md section 4's invariants, hand computations of both
variants, batched candidates, pose guidance, and the stage in recipes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel, DDIMScheduler, UNet2DConditionModel, UNet2DModel
from PIL import Image
from support import MANIFESTS
from transformers import CLIPTextModel, CLIPTokenizer

from editflow.cache import Cache
from editflow.engine.api import run_recipe
from editflow.engine.events import CollectEvents
from editflow.errors import Problem
from editflow.models.tiny import ensure_tiny
from editflow.stages.checks import CheckView
from editflow.stages.ddim_loops import ddim_sample
from editflow.stages.diffusion import encode_prompts, unet_noise_predictor
from editflow.stages.interpolation.frames import (
    denoise,
    interpolate_frames,
    interpolate_keypoints,
    level_steps,
    slerp,
)
from editflow.stages.interpolation.pose import draw_pose, read_openpose
from editflow.stages.interpolation.sample import (
    SampleInterpolate,
    SampleInterpolateParams,
    controlled_predictor,
)

PHOTOS = MANIFESTS / "interpolation" / "photos.toml"
POSE = MANIFESTS / "interpolation" / "pose.toml"
STEPS = 10


@pytest.fixture(scope="module")
def tiny(tiny_folder: Path):
    unet = UNet2DConditionModel.from_pretrained(tiny_folder / "unet").eval().requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(tiny_folder / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(tiny_folder / "text_encoder").eval()
    embeds = encode_prompts(tokenizer, text_encoder, ["a photo of a cat", "a photo of a dog", ""])
    ends = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    return unet, ends, embeds[:2], embeds[2:]


def _scheduler(tiny_folder: Path) -> DDIMScheduler:
    scheduler = DDIMScheduler.from_pretrained(tiny_folder / "scheduler")
    scheduler.set_timesteps(STEPS)
    return scheduler


def _generator(frame: int) -> torch.Generator:
    return torch.Generator().manual_seed(100 + frame)


def _score(latents: torch.Tensor) -> torch.Tensor:
    # Any function of the candidates ranks them; this one needs no decoder or CLIP.
    return latents.mean(dim=(1, 2, 3))


def _interpolate(tiny, tiny_folder: Path, **overrides):
    unet, ends, cond, negative = tiny
    options = dict(
        levels=2, fractions=[0.6, 0.3], variant="quality", candidates=[4, 3],
        guidance_scale=7.5, generator=_generator, score=_score,
    )  # fmt: skip
    options.update(overrides)
    predictor = options.pop("predictor", lambda frame: unet_noise_predictor(unet))
    return interpolate_frames(predictor, ends, _scheduler(tiny_folder), cond, negative, **options)


def _noise(frame: int, count: int) -> torch.Tensor:
    return torch.randn((count, 4, 8, 8), generator=_generator(frame))


def test_denoise_over_the_whole_schedule_is_ddim_sampling(tiny, tiny_folder: Path) -> None:
    unet, ends, cond, negative = tiny
    scheduler = _scheduler(tiny_folder)
    predict = unet_noise_predictor(unet)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = denoise(predict, x, scheduler, list(scheduler.timesteps), cond[:1], negative, 7.5)
    theirs = ddim_sample(predict, x, _scheduler(tiny_folder), cond[:1], negative,
                         guidance_scale=7.5)  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["quality", "plain"])
def test_frames_are_2_to_the_l_plus_1_with_the_inputs_at_the_ends(
    tiny, tiny_folder: Path, variant: str
) -> None:
    _, ends, _, _ = tiny
    frames, scores = _interpolate(tiny, tiny_folder, variant=variant)
    assert frames.shape == (5, 4, 8, 8)
    assert torch.equal(frames[0], ends[0]) and torch.equal(frames[-1], ends[1])
    assert scores[0].isnan() and scores[-1].isnan()
    ranked = ~scores[1:-1].isnan()
    assert bool(ranked.all()) if variant == "quality" else not bool(ranked.any())
    # The new frames are neither input nor each other.
    assert all((frames[i] - frames[j]).abs().max() > 1e-3 for i in range(5) for j in range(i))


@pytest.mark.parametrize(
    ("form", "rounding", "finest"),
    [("unit-direction", "half-even", 0.3), ("raw", "half-up", 0.25), ("raw", "half-even", 0.25)],
)
def test_quality_frames_are_the_best_of_candidates_computed_by_hand(
    tiny, tiny_folder: Path, form: str, rounding: str, finest: float
) -> None:
    unet, ends, cond, negative = tiny
    # finest 0.25 of 10 steps is the tie 2.5: 2 steps half to even, 3 half up.
    frames, scores = _interpolate(
        tiny, tiny_folder, fractions=[0.6, finest], slerp_form=form, rounding=rounding
    )
    scheduler = _scheduler(tiny_folder)
    timesteps = list(scheduler.timesteps)
    predict = unet_noise_predictor(unet)

    def by_hand(frame: int, left: torch.Tensor, right: torch.Tensor, fraction: float, count: int):
        start = STEPS - level_steps(fraction, STEPS, rounding)
        noise = _noise(frame, count)
        t = timesteps[start]
        mixed = slerp(
            scheduler.add_noise(left.expand(count, -1, -1, -1), noise, t),
            scheduler.add_noise(right.expand(count, -1, -1, -1), noise, t),
            0.5,
            form=form,
        )
        text = slerp(cond[:1], cond[1:], frame / 4, form=form).expand(count, -1, -1)
        clean = denoise(predict, mixed, scheduler, timesteps[start:], text,
                        negative.expand(count, -1, -1), 7.5)  # fmt: skip
        return clean, _score(clean)

    middle, middle_scores = by_hand(2, ends[:1], ends[1:], 0.6, 4)
    best = int(middle_scores.argmax())
    torch.testing.assert_close(frames[2:3], middle[best : best + 1], rtol=1e-5, atol=1e-5)
    assert float(scores[2]) == pytest.approx(float(middle_scores.max()), abs=1e-6)
    quarter, quarter_scores = by_hand(1, ends[:1], frames[2:3], finest, 3)
    best = int(quarter_scores.argmax())
    torch.testing.assert_close(frames[1:2], quarter[best : best + 1], rtol=1e-5, atol=1e-5)


def test_plain_branching_denoises_to_the_next_level_computed_by_hand(
    tiny, tiny_folder: Path
) -> None:
    unet, ends, cond, negative = tiny
    frames, _ = _interpolate(tiny, tiny_folder, variant="plain")
    scheduler = _scheduler(tiny_folder)
    timesteps = list(scheduler.timesteps)
    predict = unet_noise_predictor(unet)
    first, second = STEPS - level_steps(0.6, STEPS), STEPS - level_steps(0.3, STEPS)

    def text(frame: int) -> torch.Tensor:
        return slerp(cond[:1], cond[1:], frame / 4)

    def run(x: torch.Tensor, frame: int, start: int, stop: int) -> torch.Tensor:
        return denoise(predict, x, scheduler, timesteps[start:stop], text(frame), negative, 7.5)

    def noised(x: torch.Tensor, frame: int, step: int) -> torch.Tensor:
        return scheduler.add_noise(x, _noise(frame, 1), timesteps[step])

    # Depth 1: the middle frame from the noised inputs, denoised to depth 2's level only.
    middle = run(slerp(noised(ends[:1], 2, first), noised(ends[1:], 2, first), 0.5), 2, first,
                 second)  # fmt: skip
    # Depth 2: each new frame meets the middle frame as it is, then goes to the end.
    quarter = run(slerp(noised(ends[:1], 1, second), middle, 0.5), 1, second, STEPS)
    three = run(slerp(middle, noised(ends[1:], 3, second), 0.5), 3, second, STEPS)
    expected = [quarter, run(middle, 2, second, STEPS), three]
    torch.testing.assert_close(frames[1:4], torch.cat(expected), rtol=1e-5, atol=1e-5)


def test_the_slerp_form_and_the_rounding_each_change_the_frames(tiny, tiny_folder: Path) -> None:
    options = dict(fractions=[0.6, 0.25])
    default, _ = _interpolate(tiny, tiny_folder, **options)
    raw, _ = _interpolate(tiny, tiny_folder, slerp_form="raw", **options)
    half_up, _ = _interpolate(tiny, tiny_folder, rounding="half-up", **options)
    for other in (raw, half_up):
        assert torch.equal(other[0], default[0]) and torch.equal(other[-1], default[-1])
        assert (other[1:-1] - default[1:-1]).abs().max() > 1e-4


@pytest.mark.parametrize("variant", ["quality", "plain"])
def test_an_unconditional_pixel_model_interpolates_without_text_computed_by_hand(
    models_dir: Path, variant: str
) -> None:
    folder = ensure_tiny(models_dir, "tiny-pixel")
    unet = UNet2DModel.from_pretrained(folder / "unet").eval().requires_grad_(False)
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    scheduler.set_timesteps(STEPS)
    ends = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    predict = unet_noise_predictor(unet)
    frames, scores = interpolate_frames(
        lambda frame: predict, ends, scheduler, None, None, levels=1, fractions=[0.5],
        variant=variant, candidates=[3], guidance_scale=7.5, generator=_generator, score=_score,
    )  # fmt: skip
    assert frames.shape == (3, 3, 32, 32)
    assert torch.equal(frames[0], ends[0]) and torch.equal(frames[-1], ends[1])
    # By hand: both inputs noised with one draw per candidate, slerped, denoised without
    # text (no CFG: the UNet takes none) to 0; the best candidate by score is kept.
    timesteps, start = list(scheduler.timesteps), STEPS - level_steps(0.5, STEPS)
    count = 3 if variant == "quality" else 1
    noise = torch.randn((count, 3, 32, 32), generator=_generator(1))
    noised = [scheduler.add_noise(end.expand(count, -1, -1, -1), noise, timesteps[start])
              for end in (ends[:1], ends[1:])]  # fmt: skip
    clean = denoise(predict, slerp(*noised, 0.5), scheduler, timesteps[start:], None, None, 7.5)
    best = int(_score(clean).argmax())
    torch.testing.assert_close(frames[1:2], clean[best : best + 1], rtol=1e-5, atol=1e-5)
    assert scores[1].isnan() == (variant == "plain")


def test_a_direct_call_checks_text_against_the_unets_config() -> None:
    """StageKind.call's view knows the loaded UNet's config, not the recipe's model."""
    params = SampleInterpolateParams(variant="plain", prompt="a cat")
    unconditional = CheckView(references={"keypoints": ["a", "b"]},
                              configs=lambda component, provider: {"in_channels": 3})  # fmt: skip
    why = "the model has no text encoder (an unconditional UNet)"
    assert SampleInterpolate.check(params, unconditional) == [
        Problem(f"is 'a cat', but {why}: the prompt would be ignored", key="prompt",
                hint="leave prompt empty"),
        Problem(f"{why}: pose guidance needs a ControlNet, which steers a text-conditioned UNet",
                key="keypoints", hint="disconnect it"),
    ]  # fmt: skip
    conditional = CheckView(configs=lambda component, provider: {"cross_attention_dim": 32})
    assert SampleInterpolate.check(params, conditional) == []


def test_batched_candidates_equal_candidates_one_at_a_time(tiny, tiny_folder: Path) -> None:
    batched, batched_scores = _interpolate(tiny, tiny_folder)
    single, single_scores = _interpolate(tiny, tiny_folder, batch_size=1)
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched_scores, single_scores, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_the_same_seed_gives_the_same_frames_and_another_seed_others(
    tiny, tiny_folder: Path
) -> None:
    frames, _ = _interpolate(tiny, tiny_folder)
    again, _ = _interpolate(tiny, tiny_folder)
    assert torch.equal(frames, again)
    other, _ = _interpolate(
        tiny, tiny_folder, generator=lambda frame: torch.Generator().manual_seed(7 + frame)
    )
    assert (other[1:-1] - frames[1:-1]).abs().max() > 1e-3


def test_pose_guidance_steers_the_frames(tiny, tiny_folder: Path) -> None:
    unet, _, _, _ = tiny
    controlnet = ControlNetModel.from_pretrained(tiny_folder / "controlnet").eval()
    poses = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    def guided(frame: int):
        return controlled_predictor(unet, controlnet, poses[frame], 1.0)

    def zero(frame: int):
        return controlled_predictor(unet, controlnet, poses[frame], 0.0)

    free, _ = _interpolate(tiny, tiny_folder)
    steered, _ = _interpolate(tiny, tiny_folder, predictor=guided)
    unscaled, _ = _interpolate(tiny, tiny_folder, predictor=zero)
    assert (steered[1:-1] - free[1:-1]).abs().max() > 1e-2
    # At conditioning scale 0 the ControlNet adds nothing.
    torch.testing.assert_close(unscaled, free, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# Keypoints and pose drawing


def test_openpose_json_is_read_as_fractions_of_the_canvas() -> None:
    points = read_openpose((MANIFESTS / "interpolation" / "astronaut_pose.json").read_bytes())
    assert points.shape == (18, 3)
    assert points[0].tolist() == pytest.approx([255 / 512, 120 / 512, 0.9])
    assert int((points[:, 2] > 0).sum()) == 14  # the astronaut's knees and ankles are missing
    fractions = b'{"people": [{"pose_keypoints_2d": [' + b", ".join([b"0.5"] * 54) + b"]}]}"
    assert read_openpose(fractions)[3].tolist() == [0.5, 0.5, 0.5]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"nope", "not JSON (Expecting value: line 1 column 1 (char 0))"),
        (b'{"people": []}',
         'not OpenPose JSON: expected {"people": [{"pose_keypoints_2d": [...]}]}'),
        (b'{"people": [{"pose_keypoints_2d": [1, 2, 3]}]}',
         "people[0].pose_keypoints_2d has 3 numbers; OpenPose's body model has 18 points of "
         "(x, y, confidence), 54 numbers"),
        (b'{"people": [{"pose_keypoints_2d": [' + b", ".join([b"40"] * 54) + b"]}]}",
         "pixel coordinates need the image size: add canvas_width and canvas_height"),
    ],
)  # fmt: skip
def test_files_that_are_not_openpose_json_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(ValueError) as error:
        read_openpose(data)
    assert str(error.value) == message


def test_a_pose_image_draws_present_points_only() -> None:
    points = torch.zeros(18, 3)
    points[1] = torch.tensor([0.5, 0.25, 1.0])  # neck
    points[2] = torch.tensor([0.25, 0.25, 1.0])  # right shoulder
    image = draw_pose(points, 64, 64)
    assert image.shape == (3, 64, 64)
    # The neck's dot has its colour, the limb between them 60% of the limb's colour.
    assert image[:, 16, 32].tolist() == pytest.approx([1.0, 85 / 255, 0.0])
    assert image[:, 16, 24].tolist() == pytest.approx([153 / 255, 0.0, 0.0])
    points[2, 2] = 0  # a missing shoulder takes its limb along
    assert draw_pose(points, 64, 64)[:, 16, 24].tolist() == [0.0, 0.0, 0.0]


# ------------------------------------------------------------------------------------------
# The stage in recipes


def test_photos_recipe_writes_frames_strip_and_gif_and_reuses_the_inversion(
    tmp_path: Path,
) -> None:
    cache, out = Cache(tmp_path / "cache"), tmp_path / "out"
    fast = ["stages.embeddings.iterations=2", "stages.interpolate.num_inference_steps=4"]
    first = run_recipe(PHOTOS, fast, cache=cache, out_dir=out, device="cpu")
    frames = cache.get(first.keys["interpolate"]).tensor("latents")
    assert frames.shape == (9, 4, 8, 8)
    for end, encode in ((0, "encode_left"), (-1, "encode_right")):
        assert torch.equal(frames[end], cache.get(first.keys[encode]).tensor("latents")[0])
    names = sorted(path.name for path in first.written)
    assert names == sorted([f"frames-{i}.png" for i in range(9)] + ["animation.gif", "figure.png"])
    with Image.open(out / "animation.gif") as gif:
        assert gif.n_frames == 9 and gif.info["loop"] == 0

    fewer = run_recipe(
        PHOTOS, [*fast, "stages.interpolate.levels=2"], cache=cache, out_dir=out, device="cpu"
    )
    assert "embeddings" not in fewer.computed and "interpolate" in fewer.computed
    assert cache.get(fewer.keys["interpolate"]).tensor("latents").shape[0] == 5
    # The earlier run's frames 5..8 are gone: the folder holds this run's files only.
    expected = sorted([f"frames-{i}.png" for i in range(5)] + ["animation.gif", "figure.png"])
    assert sorted(path.name for path in out.iterdir()) == expected


def test_pose_recipe_draws_the_interpolated_keypoints_and_loads_the_controlnet(
    tmp_path: Path,
) -> None:
    events = CollectEvents()
    fast = ["stages.interpolate.num_inference_steps=4"]
    result = run_recipe(
        POSE, fast, cache=Cache(tmp_path / "c"), out_dir=None, device="cpu", events=events
    )
    poses = Cache(tmp_path / "c").get(result.keys["interpolate"]).tensor("poses")
    assert poses.shape == (5, 3, 64, 64)
    folder = MANIFESTS / "interpolation"
    a = read_openpose((folder / "astronaut_pose.json").read_bytes())
    b = read_openpose((folder / "camera_pose.json").read_bytes())
    torch.testing.assert_close(poses[2], draw_pose(interpolate_keypoints(a, b, 0.5), 64, 64))
    assert "controlnet" in [event.message for event in events.of("loaded")]


def test_plain_unguided_interpolation_loads_neither_clip_vae_nor_controlnet(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "recipe"
    shutil.copytree(MANIFESTS / "interpolation", folder)
    events = CollectEvents()
    run_recipe(
        folder / "photos.toml",
        ['stages.interpolate.variant="plain"', "stages.interpolate.num_inference_steps=4",
         "stages.embeddings.iterations=2"],
        cache=Cache(tmp_path / "c"), out_dir=None, device="cpu", events=events,
        targets=["interpolate"],
    )  # fmt: skip
    loaded = [event.message for event in events.of("loaded")]
    assert "clip" not in loaded and "controlnet" not in loaded
    assert loaded.count("vae") == 1  # the encode stages' only


def _pose_images_recipe(folder: Path, count: int) -> Path:
    """pose.toml with the drawn pose of each frame as image files on `poses`."""
    shutil.copytree(MANIFESTS / "interpolation", folder)
    a = read_openpose((folder / "astronaut_pose.json").read_bytes())
    b = read_openpose((folder / "camera_pose.json").read_bytes())
    text = (folder / "pose.toml").read_text()
    refs = []
    for frame in range(count):
        pose = draw_pose(interpolate_keypoints(a, b, frame / 4), 64, 64)
        Image.fromarray((pose * 255).round().byte().permute(1, 2, 0).numpy()).save(
            folder / f"pose-{frame}.png"
        )
        text += f'\n[inputs.pose_{frame}]\nimage = "pose-{frame}.png"\n'
        refs.append(f'"inputs.pose_{frame}"')
    text = text.replace(
        'keypoints = ["inputs.astronaut_pose", "inputs.camera_pose"]',
        f"poses = [{', '.join(refs)}]",
    )
    (folder / "pose.toml").write_text(text)
    return folder / "pose.toml"


def test_pose_images_as_inputs_guide_like_the_keypoints_they_draw(tmp_path: Path) -> None:
    fast = ["stages.interpolate.num_inference_steps=4"]
    drawn = run_recipe(POSE, fast, cache=Cache(tmp_path / "a"), out_dir=None, device="cpu")
    given = run_recipe(
        _pose_images_recipe(tmp_path / "recipe", 5), fast, cache=Cache(tmp_path / "b"),
        out_dir=None, device="cpu",
    )  # fmt: skip
    frames = [
        Cache(tmp_path / name).get(result.keys["interpolate"]).tensor("latents")
        for name, result in (("a", drawn), ("b", given))
    ]
    assert torch.equal(frames[0], frames[1])


def test_a_pose_image_count_that_is_not_one_per_frame_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from editflow.cli import main

    recipe = _pose_images_recipe(tmp_path / "recipe", 3)
    code = main(["validate", str(recipe), "--cache", str(tmp_path / "c")])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"{recipe}:38: stages.interpolate.poses: needs 5 entries for levels = 2, got 3"
    )
