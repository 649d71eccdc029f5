"""Metric kinds: each against a float64 formula written here, the recipe's wiring, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from skimage.metrics import structural_similarity
from support import RECIPES

from editflow.cli import main
from editflow.errors import EditflowError
from editflow.models import RunModels, resolve_providers
from editflow.models.section import ModelSection
from editflow.models.tiny import ensure_tiny_lpips
from editflow.stages import StageContext
from editflow.stages.metrics.clip_metrics import MetricClipDirection, MetricClipScore
from editflow.stages.metrics.common import MaskedParams
from editflow.stages.metrics.perceptual import MetricLpips
from editflow.stages.metrics.pixels import MetricPsnr, masked_mse, psnr, ssim

RECIPE = RECIPES / "metrics.toml"


def _pair(seed: int = 0, n: int = 2, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=generator, dtype=torch.float64)
    noise = 0.1 * torch.randn(images.shape, generator=generator, dtype=torch.float64)
    return images, (images + noise).clamp(0, 1)


def _soft_mask(n: int = 2, size: int = 32) -> torch.Tensor:
    ramp = torch.linspace(0, 1, size, dtype=torch.float64)
    return (ramp[None, :] * ramp[:, None]).expand(n, 1, size, size).clone()


def _ctx(name: str = "metric") -> StageContext:
    return StageContext(name, 0, torch.device("cpu"), torch.float32)


# ---------------------------------------------------------------------------------------
# The math, on random float64 images


def test_mse_and_psnr_equal_their_float64_definitions_whole_and_masked() -> None:
    images, reference = _pair()
    mask = _soft_mask()
    for weights in (None, mask, 1 - mask):
        w = torch.ones_like(mask) if weights is None else weights
        expected_mse = torch.stack(
            [(w[i] * (images[i] - reference[i]) ** 2).sum() / (3 * w[i].sum()) for i in range(2)]
        )
        assert torch.allclose(masked_mse(images, reference, weights), expected_mse, rtol=1e-12)
        expected_psnr = 10 * torch.log10(1 / expected_mse)
        assert torch.allclose(psnr(images, reference, weights), expected_psnr, rtol=1e-12)
    ones = torch.ones_like(mask)
    assert torch.allclose(psnr(images, reference), psnr(images, reference, ones), rtol=1e-13)


def _ssim_reference(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None) -> list[float]:
    """Wang et al. (2004) Eq. 13 over every 11x11 window inside the image, written with
    explicit windows: Gaussian weights (sigma 1.5, normalised), population statistics."""
    offsets = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * 1.5**2))
    g = g / g.sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for n in range(len(x)):
        total = weight_sum = 0.0
        for i in range(x.shape[2] - 10):
            for j in range(x.shape[3] - 10):
                a, b = x[n, :, i : i + 11, j : j + 11], y[n, :, i : i + 11, j : j + 11]
                ma, mb = (g * a).sum((1, 2)), (g * b).sum((1, 2))
                va = (g * (a - ma[:, None, None]) ** 2).sum((1, 2))
                vb = (g * (b - mb[:, None, None]) ** 2).sum((1, 2))
                cov = (g * (a - ma[:, None, None]) * (b - mb[:, None, None])).sum((1, 2))
                s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
                w = 1.0 if weights is None else float(weights[n, 0, i + 5, j + 5])
                total += w * float(s.mean())
                weight_sum += w
        values.append(total / weight_sum)
    return values


def test_ssim_is_wang_et_al_over_valid_windows_and_scikit_image_agrees() -> None:
    images, reference = _pair(n=2, size=16)
    mask = _soft_mask(2, 16)
    for weights in (None, mask):
        expected = torch.tensor(_ssim_reference(images, reference, weights), dtype=torch.float64)
        assert torch.allclose(ssim(images, reference, weights), expected, rtol=1e-10)
    peer = [
        structural_similarity(
            images[i].numpy(),
            reference[i].numpy(),
            channel_axis=0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
        )  # fmt: skip
        for i in range(2)
    ]
    assert torch.allclose(ssim(images, reference), torch.tensor(peer), rtol=1e-10)
    assert torch.equal(ssim(images, images), torch.ones(2, dtype=torch.float64))


def test_a_region_of_a_hard_mask_measures_only_its_pixels() -> None:
    images, reference = _pair(n=1)
    mask = torch.zeros(1, 1, 32, 32, dtype=torch.float64)
    mask[..., 8:24, 8:24] = 1
    changed = reference.clone()
    changed[..., 8:24, 8:24] = 0.5  # only the inside changes
    ctx, inputs = _ctx(), {"images": images, "reference": reference, "mask": mask}
    outside = MetricPsnr().call(ctx, MaskedParams(region="outside"), inputs)
    inputs_changed = {**inputs, "reference": changed}
    assert torch.equal(outside["values"], MetricPsnr().call(ctx, MaskedParams(region="outside"),
                                                            inputs_changed)["values"])  # fmt: skip
    inside = MetricPsnr().call(ctx, MaskedParams(region="inside"), inputs_changed)["values"]
    assert not torch.equal(inside, MetricPsnr().call(ctx, MaskedParams(region="inside"),
                                                     inputs)["values"])  # fmt: skip
    assert outside["values"].dtype == torch.float64 and outside["mean"].shape == (1,)


# ---------------------------------------------------------------------------------------
# LPIPS and CLIP on the tiny models, against float64 formulas


def _lpips_reference(network, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Zhang et al. (2018) Eq. 1 in float64: unit-normalise each tap's activations over
    channels, square the difference, weigh channels by the head, average space, sum taps."""
    network = network.double()
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)
    fx, fy = (x * 2 - 1 - shift) / scale, (y * 2 - 1 - shift) / scale
    total = torch.zeros(len(x), dtype=torch.float64)
    tap = 0
    for index, layer in enumerate(network.features):
        fx, fy = layer(fx), layer(fy)
        if index in network.taps:
            a = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            b = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            w = network.lin[tap].weight.view(1, -1, 1, 1)
            total += (w * (a - b) ** 2).sum(1).mean((1, 2))
            tap += 1
    return total


def test_lpips_on_the_tiny_network_matches_the_float64_formula(models_dir: Path) -> None:
    from editflow.models.lpips import LpipsNetwork

    resolved = resolve_providers(ModelSection(), ["model.lpips"], base_dir=models_dir,
                                 models_dir=models_dir)  # fmt: skip
    models = RunModels(resolved, device=torch.device("cpu"), dtype=torch.float32,
                       models_dir=models_dir)  # fmt: skip
    ctx = StageContext("lpips", 0, torch.device("cpu"), torch.float32,
                       models=models.for_stage(MetricLpips.components))  # fmt: skip
    images, reference = _pair(n=3)
    out = MetricLpips().call(ctx, MetricLpips.params(), {"images": images, "reference": reference})
    expected = _lpips_reference(
        LpipsNetwork.from_pretrained(ensure_tiny_lpips(models_dir)), images, reference
    )
    assert out["values"].dtype == torch.float64 and (expected > 0).all()
    assert torch.allclose(out["values"], expected, rtol=1e-5, atol=0)
    assert torch.allclose(out["mean"], expected.mean().reshape(1), rtol=1e-5)
    # Without a reference, each image is compared with the next.
    steps = MetricLpips().call(ctx, MetricLpips.params(), {"images": images})["values"]
    assert torch.allclose(steps, _lpips_reference(
        LpipsNetwork.from_pretrained(ensure_tiny_lpips(models_dir)), images[:-1], images[1:]
    ), rtol=1e-5)  # fmt: skip
    same = MetricLpips().call(ctx, MetricLpips.params(), {"images": images, "reference": images})
    assert torch.equal(same["values"], torch.zeros(3, dtype=torch.float64))


def _clip_embeddings_float64(clip, images: torch.Tensor, texts: list[str]):
    from editflow.stages.images import to_uint8

    model = clip.model.double()
    arrays = [image.permute(1, 2, 0).numpy() for image in to_uint8(images)]
    pixels = clip.processor(images=arrays, return_tensors="pt")["pixel_values"].double()
    tokens = clip.processor(text=texts, padding=True, return_tensors="pt")
    image = model.get_image_features(pixel_values=pixels)
    text = model.get_text_features(**tokens)
    image = getattr(image, "pooler_output", image)
    text = getattr(text, "pooler_output", text)
    return image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)


def test_clip_score_and_direction_match_float64_formulas(models_dir: Path) -> None:
    resolved = resolve_providers(ModelSection(), ["model.clip"], base_dir=models_dir,
                                 models_dir=models_dir)  # fmt: skip

    def context() -> StageContext:
        models = RunModels(resolved, device=torch.device("cpu"), dtype=torch.float32,
                           models_dir=models_dir)  # fmt: skip
        return StageContext("clip", 0, torch.device("cpu"), torch.float32,
                            models=models.for_stage(MetricClipScore.components))  # fmt: skip

    ctx = context()
    edits, sources = _pair(n=3)
    params = MetricClipScore.params(prompt="a photo of a dog", raw=True)
    raw = MetricClipScore().call(ctx, params, {"images": edits})["values"]
    clip = ctx.models.get("clip")
    params = MetricClipScore.params(prompt="a photo of a dog")
    scaled = MetricClipScore().call(ctx, params, {"images": edits})["values"]
    direction = MetricClipDirection().call(
        ctx,
        MetricClipDirection.params(source_prompt="a cat", target_prompt="a dog"),
        {"images": edits, "reference": sources},
    )["values"]
    with torch.no_grad():  # the float64 copy of the model (the stage's stays float32)
        image, text = _clip_embeddings_float64(clip, edits, ["a photo of a dog"])
        source_image, texts = _clip_embeddings_float64(clip, sources, ["a dog", "a cat"])
    cosine = image @ text[0]
    assert torch.allclose(raw, cosine, atol=1e-5, rtol=0)
    assert torch.allclose(scaled, 100 * cosine.clamp_min(0), atol=1e-3, rtol=0)
    image_direction, text_direction = image - source_image, texts[0] - texts[1]
    expected = (image_direction @ text_direction) / (
        image_direction.norm(dim=-1) * text_direction.norm()
    )
    assert torch.allclose(direction, expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------
# The recipe: several metrics on the quick start's edit, through the engine


def test_the_metrics_recipe_runs_and_each_metric_measures_what_it_is_wired_to(
    tmp_path: Path,
) -> None:
    from editflow.cache import Cache
    from editflow.cache.artifacts import read_outputs
    from editflow.engine.api import plan_recipe, run_recipe
    from editflow.engine.execute import layouts
    from editflow.files.inputs import load_input

    assert main(["validate", str(RECIPE), "--cache", str(tmp_path / "cache")]) == 0
    cache = Cache(tmp_path / "cache")
    result = run_recipe(RECIPE, cache=cache, out_dir=None, device="cpu")
    plan = plan_recipe(RECIPE, cache=cache)

    def outputs(stage: str) -> dict:
        return read_outputs(cache, cache.get(result.keys[stage]), layouts(plan.stages[stage]))

    edit = outputs("decode_edit")["images"].double()
    photo = load_input(plan.inputs["photo"]).double()
    disc = load_input(plan.inputs["disc"]).double()
    expected = {
        "psnr_background": psnr(edit, photo, 1 - disc),
        "ssim_background": ssim(edit, photo, 1 - disc),
        "mse": masked_mse(edit, photo),
    }
    for stage, values in expected.items():
        found = outputs(stage)
        assert found["values"].dtype == torch.float64 and found["values"].shape == (1,)
        assert torch.allclose(found["values"], values, rtol=1e-12), stage
        assert torch.equal(found["mean"], found["values"].mean().reshape(1))
    for stage in ("lpips", "clip_score", "clip_direction"):
        assert outputs(stage)["values"].isfinite().all(), stage
    assert psnr(edit, photo, disc) != expected["psnr_background"]  # the region matters
    rerun = run_recipe(RECIPE, cache=cache, out_dir=None, device="cpu")
    assert rerun.computed == []


# ---------------------------------------------------------------------------------------
# Bad input: one located line


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            'stages.mse.region="outside"',
            "--set stages.mse.region=\"outside\": stages.mse.region: is 'outside' but no mask is"
            " connected (connect a mask (mask = \"inputs.NAME\"), or set region = 'all')",
        ),
        (
            'stages.mse.mask="inputs.disc"',
            "{f}:51: stages.mse.region: a mask is connected but region is 'all', which does not"
            " use it (set 'inside' or 'outside')",
        ),
        (
            "inputs.disc.size=[16, 16]",
            "{f}:41: stages.psnr_background.mask: mask is 16x16 but images is 32x32 (give a mask"
            " of the images' size)\n"
            "{f}:48: stages.ssim_background.mask: mask is 16x16 but images is 32x32 (give a mask"
            " of the images' size)",
        ),
        (
            "inputs.photo.size=[8, 8]&inputs.disc.size=[8, 8]",  # only SSIM's window is too big
            "{f}:46: stages.ssim_background.images: SSIM needs images of at least 11x11 pixels,"
            " got 8x8",
        ),
    ],
    ids=["region without mask", "mask without region", "mask size", "ssim too small"],
)
def test_bad_metric_input_is_refused_while_planning(
    override: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cache = tmp_path / "cache"
    sets = [arg for value in override.split("&") for arg in ("--set", value)]
    code = main(["validate", str(RECIPE), "--cache", str(cache), *sets])
    assert code == 2
    assert capsys.readouterr().err.strip() == expected.format(f=RECIPE)
    assert not cache.exists()


def test_a_reference_of_another_size_is_refused_while_planning(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    text = RECIPE.read_text().replace("../../manifests", str(RECIPES.parent.parent / "manifests"))
    text += '\n[inputs.big]\nimage = "skimage:chelsea"\nsize = [64, 64]\n'
    recipe = tmp_path / "r.toml"
    recipe.write_text(text.replace('reference = "inputs.photo"\n\n[stages.lpips]',
                                   'reference = "inputs.big"\n\n[stages.lpips]'))  # fmt: skip
    assert main(["validate", str(recipe), "--cache", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"{recipe}:54: stages.mse.reference: reference is 64x64 but images is 32x32"
        " (compare images of one size)"
    )


def test_mismatched_batches_are_one_line_naming_the_input() -> None:
    images, reference = _pair(n=2)
    three = torch.cat([reference, reference[:1]])
    with pytest.raises(EditflowError) as error:
        MetricPsnr().call(_ctx("psnr"), MaskedParams(), {"images": images, "reference": three})
    assert str(error.value) == (
        "stages.psnr.reference: reference has 3 images but images has 2 (give one reference"
        " for all images, or one per image)"
    )
    mask = torch.ones(3, 1, 32, 32)
    with pytest.raises(EditflowError, match=r"^stages.psnr.mask: mask has 3 images but images"
                                            r" has 2 \(give one mask"):  # fmt: skip
        MetricPsnr().call(_ctx("psnr"), MaskedParams(region="inside"),
                          {"images": images, "reference": reference, "mask": mask})  # fmt: skip
    # One reference serves every image.
    one = MetricPsnr().call(_ctx(), MaskedParams(), {"images": images, "reference": reference[:1]})
    assert torch.allclose(one["values"], psnr(images, reference[:1].expand_as(images)))


def test_lpips_with_a_hub_model_and_no_network_named_is_refused(tmp_path: Path) -> None:
    section = ModelSection(id="someone/some-model")
    with pytest.raises(EditflowError) as error:
        resolve_providers(section, ["model.lpips"], base_dir=tmp_path, models_dir=tmp_path)
    assert str(error.value).startswith(
        "model.lpips: metric.lpips needs an LPIPS network, and model.id is not a built-in model"
    )
    with pytest.raises(EditflowError) as error:
        resolve_providers(ModelSection(lpips="./none"), ["model.lpips"], base_dir=tmp_path,
                          models_dir=tmp_path)  # fmt: skip
    assert str(error.value) == (
        f"model.lpips: lpips folder './none' does not exist (looked for {tmp_path / 'none'};"
        " an LPIPS folder holds config.json and model.safetensors (docs/metrics.md))"
    )


def test_a_saved_lpips_folder_loads_as_model_lpips(tmp_path: Path, models_dir: Path) -> None:
    from editflow.models.lpips import LpipsNetwork

    network = LpipsNetwork("tiny")
    network.save_pretrained(tmp_path / "net")
    resolved = resolve_providers(ModelSection(lpips="net"), ["model.lpips"], base_dir=tmp_path,
                                 models_dir=models_dir)  # fmt: skip
    assert sorted(resolved["model.lpips"].identity["files"]) == ["config.json", "model.safetensors"]
    loaded = RunModels(resolved, device=torch.device("cpu"), dtype=torch.float16,
                       models_dir=models_dir).for_stage(MetricLpips.components).get("lpips")  # fmt: skip
    assert next(loaded.parameters()).dtype == torch.float32  # metrics ignore the recipe dtype
    for name, value in network.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    (tmp_path / "net" / "config.json").write_text('{"backbone": "alexnet"}')
    fresh = RunModels(resolved, device=torch.device("cpu"), dtype=torch.float32,
                      models_dir=models_dir).for_stage(MetricLpips.components)  # fmt: skip
    with pytest.raises(EditflowError, match=r"^model.lpips: lpips 'net' cannot be loaded:"
                                            r" model.safetensors does not fit backbone 'alexnet'"):  # fmt: skip
        fresh.get("lpips")
