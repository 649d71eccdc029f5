"""pix2pix-zero: noise regulariser, reference pass, guided edit, stages, and diffusers' port.

The differential tests run diffusers' deprecated ``StableDiffusionPix2PixZeroPipeline`` on
the tiny model (with its own UNet copy: the pipeline swaps processors in place). What agrees:

- ``invert`` with the regulariser off (``lambda_auto_corr = lambda_kl = 0`` or
  ``num_reg_steps = 0``) equals :func:`ddim_invert` bit for bit; so does the KL-only
  regulariser (no randomness in it).
- The full regulariser draws its shifts differently by design (global or given RNG over
  ``[0, H/2)`` there, the stage's generator over ``[1, H/2)`` here), so the outputs differ;
  with the shift sequence forced equal the two agree bit for bit at 8x8 latents, where the
  pyramid has one level. At 16 px and above the levels below the first differ by the
  documented factor 2 (16 on the loss), checked on the loss itself.
- The edit with ``cross_attention_guidance_amount = 0`` equals :func:`guided_edit` with
  ``xa_guidance = 0`` (same CFG with the caption as the negative prompt). With guidance on
  the two differ by design (see the module docstring of ``editflow.stages.pix2pix_zero.edit``);
  their loss functions agree (``tests/stages/test_attention.py``).
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMInverseScheduler,
    DDIMScheduler,
    StableDiffusionPix2PixZeroPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import AttnProcessor
from transformers import CLIPTextModel, CLIPTokenizer

from editflow.errors import EditflowError
from editflow.stages.base import MemorySteps, StageContext
from editflow.stages.ddim_loops import auto_correlation_loss, ddim_invert, kl_loss, regularize_noise
from editflow.stages.diffusion import encode_prompts, unet_noise_predictor, vae_encode
from editflow.stages.pix2pix_zero.attention import attention_loss, install_attention_recorder
from editflow.stages.pix2pix_zero.edit import guided_edit, reference_pass
from editflow.stages.pix2pix_zero.guide import GuidePix2PixZeroReference
from editflow.stages.pix2pix_zero.sample import SamplePix2PixZero, SamplePix2PixZeroParams

STEPS = 6
Peer = StableDiffusionPix2PixZeroPipeline

# ------------------------------------------------------------------------------------------
# Fixtures


@contextmanager
def explicit_attention(unet: UNet2DConditionModel) -> Iterator[None]:
    """Give every attention layer diffusers' explicit-softmax ``AttnProcessor``, as the peer's
    ``Pix2PixZeroAttnProcessor`` computes it, so differential checks can be bit for bit."""
    original = dict(unet.attn_processors)
    unet.set_attn_processor(AttnProcessor())
    try:
        yield
    finally:
        unet.set_attn_processor(original)


class Tiny:
    """The tiny model's parts, loaded once per module; doubles as the stages' ModelComponents."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval()
        self.scheduler_config = dict(DDIMScheduler.load_config(folder, subfolder="scheduler"))

    def get(self, component: str) -> Any:
        return getattr(self, component)

    def scheduler(self, steps: int = STEPS) -> DDIMScheduler:
        scheduler = DDIMScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(steps)
        return scheduler

    def inverse_scheduler(self, steps: int = STEPS) -> DDIMInverseScheduler:
        scheduler = DDIMInverseScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(steps)
        return scheduler

    def embeds(self, prompt: str) -> torch.Tensor:
        return encode_prompts(self.tokenizer, self.text_encoder, [prompt])


@pytest.fixture(scope="module")
def tiny(tiny_folder: Path) -> Tiny:
    return Tiny(tiny_folder)


@pytest.fixture(scope="module")
def peer(tiny: Tiny) -> Peer:
    """diffusers' port on the tiny model, with its own UNet (it replaces processors in place)."""
    pipe = Peer(
        vae=tiny.vae,
        text_encoder=tiny.text_encoder,
        tokenizer=tiny.tokenizer,
        unet=UNet2DConditionModel.from_pretrained(tiny.folder, subfolder="unet").eval(),
        scheduler=DDIMScheduler.from_config(tiny.scheduler_config),
        feature_extractor=None,
        safety_checker=None,
        inverse_scheduler=DDIMInverseScheduler.from_config(tiny.scheduler_config),
        caption_generator=None,
        caption_processor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def x0(tiny: Tiny) -> torch.Tensor:
    """The astronaut photograph at 64 px, encoded by the tiny VAE: (1, 4, 8, 8)."""
    from skimage import data

    image = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 255
    return vae_encode(tiny.vae, F.interpolate(image, size=64, mode="area"))


@pytest.fixture(scope="module")
def caption(tiny: Tiny) -> torch.Tensor:
    return tiny.embeds("a photo of an astronaut")


@pytest.fixture(scope="module")
def x_T(tiny: Tiny, x0: torch.Tensor, caption: torch.Tensor) -> torch.Tensor:
    x_T, _ = ddim_invert(
        unet_noise_predictor(tiny.unet),
        x0,
        tiny.inverse_scheduler(),
        caption,
        regularize=True,
        generator=torch.Generator().manual_seed(0),
    )
    return x_T


@pytest.fixture(scope="module")
def edit_embeds(tiny: Tiny, caption: torch.Tensor) -> torch.Tensor:
    return caption + (tiny.embeds("a photo of a robot") - tiny.embeds("a photo of an astronaut"))


@pytest.fixture(scope="module")
def reference(tiny: Tiny, x_T: torch.Tensor, caption: torch.Tensor):
    """The reference pass's reconstruction and its maps, as the stage stores them (fp16)."""
    steps: list[dict[str, torch.Tensor]] = []
    with install_attention_recorder(tiny.unet) as recorder:
        latents = reference_pass(
            recorder.predictor(unet_noise_predictor(tiny.unet)),
            x_T,
            tiny.scheduler(),
            caption,
            record=lambda step, maps: steps.append({n: m.half() for n, m in maps.items()}),
        )
    return latents, steps


def fixed_shifts(monkeypatch: pytest.MonkeyPatch, shifts) -> list[tuple]:
    """Make every ``torch.randint`` return the next of ``shifts``; returns the calls' args."""
    calls: list[tuple] = []
    source = itertools.cycle(shifts)

    def randint(*args, **kwargs):
        calls.append(args)
        return torch.tensor([next(source)])

    monkeypatch.setattr(torch, "randint", randint)
    return calls


# ------------------------------------------------------------------------------------------
# The regulariser (pure math)


def test_auto_correlation_loss_equals_the_released_formula_on_one_level(monkeypatch):
    eps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    fixed_shifts(monkeypatch, [1, 3, 2])
    ours = auto_correlation_loss(eps, None)
    fixed_shifts(monkeypatch, [1, 3, 2])
    released = Peer.auto_corr_loss(None, eps)
    torch.testing.assert_close(ours, released)


def test_auto_correlation_pooled_levels_carry_the_variance_preserving_factor_two(monkeypatch):
    # 16 px: levels 16 and 8. Released: L16 + L8; ours pools times 2, so L8 weighs 16x.
    eps = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    fixed_shifts(monkeypatch, [2])
    ours = auto_correlation_loss(eps, None)
    released = Peer.auto_corr_loss(None, eps)
    released_level_8 = Peer.auto_corr_loss(None, F.avg_pool2d(eps, 2))
    torch.testing.assert_close(ours, released + 15 * released_level_8)


@pytest.mark.parametrize("size, highs", [(64, [32, 16, 8, 4]), (96, [48, 24, 12, 6, 3]), (8, [4])])
def test_auto_correlation_pyramid_stops_after_the_first_level_at_most_8_px(
    monkeypatch, size, highs
):
    calls = fixed_shifts(monkeypatch, [1])
    auto_correlation_loss(torch.randn(2, 3, size, size), None)
    # One draw per (sample, channel, level) from [1, H / 2).
    assert [args[:2] for args in calls] == [(1, high) for high in highs] * 6


def test_auto_correlation_loss_is_a_function_of_the_seed():
    eps = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(2))

    def loss(seed):
        return auto_correlation_loss(eps, torch.Generator().manual_seed(seed))

    assert torch.equal(loss(0), loss(0))
    assert not torch.equal(loss(0), loss(1))


def test_kl_loss_equals_the_released_formula_and_sums_over_the_batch():
    a, b = torch.randn(2, 1, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * 1.7 + 0.2
    torch.testing.assert_close(kl_loss(a), Peer.kl_divergence(None, a))
    torch.testing.assert_close(kl_loss(torch.cat([a, b])), kl_loss(a) + kl_loss(b))


def smooth_noise(seed: int, size: int = 32) -> torch.Tensor:
    """Spatially correlated, off-scale noise: what the regulariser should repair."""
    white = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(seed))
    return F.avg_pool2d(white, 5, stride=1, padding=2) * 1.5 + 0.3


def test_regularize_noise_lowers_both_losses_and_is_reproducible():
    eps = smooth_noise(4)
    regularised = regularize_noise(eps, torch.Generator().manual_seed(0))
    again = regularize_noise(eps, torch.Generator().manual_seed(0))
    other_seed = regularize_noise(eps, torch.Generator().manual_seed(1))

    def ac(x):  # measured with the same shifts for both
        return auto_correlation_loss(x, torch.Generator().manual_seed(99))

    assert ac(regularised) < 0.05 * ac(eps)  # 11.0 -> 0.09
    assert kl_loss(regularised) < 0.7 * kl_loss(eps)  # 1.63 -> 1.05
    assert torch.equal(regularised, again)
    assert not torch.equal(regularised, other_seed)
    assert not regularised.requires_grad


def test_regularize_noise_with_zero_weights_is_the_identity_and_draws_nothing():
    eps = smooth_noise(5)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert torch.equal(regularize_noise(eps, generator, lambda_ac=0, lambda_kl=0), eps)
    assert torch.equal(generator.get_state(), state)


# ------------------------------------------------------------------------------------------
# Regularised inversion on the tiny model, and diffusers' invert


def test_regularised_inversion_lowers_auto_correlation_and_kl_of_the_inverted_noise(
    tiny, x0, caption, x_T
):
    plain, _ = ddim_invert(unet_noise_predictor(tiny.unet), x0, tiny.inverse_scheduler(), caption)
    again, _ = ddim_invert(
        unet_noise_predictor(tiny.unet),
        x0,
        tiny.inverse_scheduler(),
        caption,
        regularize=True,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(again, x_T)  # the x_T fixture: same image, same seed

    def ac(x):
        return auto_correlation_loss(x, torch.Generator().manual_seed(99))

    assert ac(x_T) < ac(plain)
    assert kl_loss(x_T) < kl_loss(plain)


@pytest.mark.parametrize("off", [{"lambda_auto_corr": 0.0, "lambda_kl": 0.0}, {"num_reg_steps": 0}])
def test_plain_inversion_equals_diffusers_invert_with_the_regulariser_off(
    tiny, peer, x0, caption, off
):
    theirs = peer.invert(
        prompt_embeds=caption, image=x0, num_inference_steps=STEPS, output_type="np", **off
    ).latents
    with explicit_attention(tiny.unet):
        ours, _ = ddim_invert(
            unet_noise_predictor(tiny.unet), x0, tiny.inverse_scheduler(), caption
        )
    assert torch.equal(ours, theirs)


def test_kl_only_regulariser_equals_diffusers_invert(tiny, peer, x0, caption):
    theirs = peer.invert(
        prompt_embeds=caption,
        image=x0,
        num_inference_steps=STEPS,
        output_type="np",
        lambda_auto_corr=0.0,
    ).latents
    with explicit_attention(tiny.unet):
        ours, _ = ddim_invert(
            unet_noise_predictor(tiny.unet),
            x0,
            tiny.inverse_scheduler(),
            caption,
            regularize=True,
            lambda_ac=0.0,
        )
    assert torch.equal(ours, theirs)


def test_full_regulariser_equals_diffusers_invert_when_the_shifts_are_forced_equal(
    tiny, peer, x0, caption, monkeypatch
):
    fixed_shifts(monkeypatch, [1, 3, 2, 2, 1])
    theirs = peer.invert(
        prompt_embeds=caption, image=x0, num_inference_steps=STEPS, output_type="np"
    ).latents
    fixed_shifts(monkeypatch, [1, 3, 2, 2, 1])
    with explicit_attention(tiny.unet):
        ours, _ = ddim_invert(
            unet_noise_predictor(tiny.unet),
            x0,
            tiny.inverse_scheduler(),
            caption,
            regularize=True,
        )
    assert torch.equal(ours, theirs)


def test_full_regulariser_with_its_own_shifts_lowers_auto_correlation_like_diffusers(
    tiny, peer, x0, caption, x_T
):
    plain = peer.invert(
        prompt_embeds=caption,
        image=x0,
        num_inference_steps=STEPS,
        output_type="np",
        num_reg_steps=0,
    ).latents
    theirs = peer.invert(
        prompt_embeds=caption,
        image=x0,
        num_inference_steps=STEPS,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).latents

    def ac(x):
        return auto_correlation_loss(x, torch.Generator().manual_seed(99))

    assert not torch.equal(x_T, theirs)  # shift range and RNG differ by design
    assert ac(x_T) < ac(plain) and ac(theirs) < ac(plain)
    assert kl_loss(x_T) < kl_loss(plain) and kl_loss(theirs) < kl_loss(plain)


# ------------------------------------------------------------------------------------------
# Reference pass and guided edit


def edit(
    tiny, x_T, edit_embeds, caption, reference_maps, xa_guidance, callback=None, explicit=False
):
    with (
        explicit_attention(tiny.unet) if explicit else nullcontext(),
        install_attention_recorder(tiny.unet) as recorder,
    ):
        predict = unet_noise_predictor(tiny.unet)
        return guided_edit(
            predict,
            x_T,
            tiny.scheduler(),
            edit_embeds,
            caption,
            predict_maps=recorder.predictor(predict),
            reference_maps=reference_maps,
            xa_guidance=xa_guidance,
            callback=callback,
        )


def test_zero_direction_without_guidance_reproduces_the_reference_pass_exactly(
    tiny, x_T, caption, reference
):
    reconstruction, _ = reference

    def never(step):
        raise AssertionError("guidance off must not read reference maps")

    edited = edit(tiny, x_T, caption.clone(), caption, never, xa_guidance=0.0)
    assert torch.equal(edited, reconstruction)


def trajectory_losses(tiny, latents, edit_embeds, reference_steps) -> list[float]:
    """The attention loss of each step's incoming latent against that step's reference."""
    losses = []
    scheduler = tiny.scheduler()
    with install_attention_recorder(tiny.unet) as recorder, torch.no_grad():
        predict_maps = recorder.predictor(unet_noise_predictor(tiny.unet))
        for i, (t, x) in enumerate(zip(scheduler.timesteps, latents, strict=True)):
            _, maps = predict_maps(x, t, edit_embeds)
            losses.append(float(attention_loss(maps, reference_steps[i])))
    return losses


def test_cross_attention_guidance_lowers_the_attention_loss_along_the_trajectory(
    tiny, x_T, caption, edit_embeds, reference
):
    _, steps = reference
    runs = {}
    for amount in (0.0, 0.1, 20.0):
        latents = [x_T]
        edit(
            tiny,
            x_T,
            edit_embeds,
            caption,
            steps.__getitem__,
            amount,
            callback=lambda info, latents=latents: latents.append(info["x"]),
        )
        runs[amount] = trajectory_losses(tiny, latents[:-1], edit_embeds, steps)
    unguided = runs[0.0]
    assert runs[0.1][0] == runs[20.0][0] == unguided[0]  # same start
    # The tiny random UNet's maps barely depend on the latent, so the default step lowers
    # the loss only slightly; a large step lowers it at every step.
    assert sum(runs[0.1][1:]) < sum(unguided[1:])
    assert all(g < u for g, u in zip(runs[20.0][1:], unguided[1:], strict=True))


def test_guided_edit_fetches_exactly_one_step_of_reference_maps_per_step(
    tiny, x_T, caption, edit_embeds, reference
):
    _, steps = reference
    one_step_bytes = sum(m.numel() * m.element_size() for m in steps[0].values())
    heads, queries = 4, 64 + 16 + 64 + 64  # down 8x8, mid 4x4, up 2 x 8x8
    assert one_step_bytes == heads * queries * 77 * 2  # fp16

    fetched: list[tuple[int, int]] = []
    alive: list[weakref.ref] = []

    def reference_maps(i: int) -> dict[str, torch.Tensor]:
        # Every earlier step's maps must already be released by the edit.
        assert all(ref() is None for ref in alive)
        maps = {name: m.clone() for name, m in steps[i].items()}
        fetched.append((i, sum(m.numel() * m.element_size() for m in maps.values())))
        alive.extend(weakref.ref(m) for m in maps.values())
        return maps

    edit(tiny, x_T, edit_embeds, caption, reference_maps, xa_guidance=0.1)
    assert fetched == [(i, one_step_bytes) for i in range(STEPS)]


def test_unguided_edit_equals_diffusers_pipeline_with_zero_guidance_amount(
    tiny, peer, x_T, caption, edit_embeds
):
    source, target = tiny.embeds("a photo of an astronaut"), tiny.embeds("a photo of a robot")
    theirs = peer(
        prompt_embeds=caption,
        negative_prompt_embeds=caption,
        source_embeds=source,
        target_embeds=target,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        cross_attention_guidance_amount=0.0,
        latents=x_T,
        output_type="latent",
    ).images

    def never(step):
        raise AssertionError("guidance off must not read reference maps")

    ours = edit(
        tiny, x_T, caption + (target - source), caption, never, xa_guidance=0.0, explicit=True
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Stages


def context(tiny: Tiny, write_steps=None, name: str = "edit") -> StageContext:
    ctx = StageContext(
        name=name, seed=0, device=torch.device("cpu"), dtype=torch.float32, models=tiny
    )
    if write_steps is not None:
        ctx.write_steps = write_steps
    return ctx


class RecordingWriter(MemorySteps):
    """A steps writer as the engine would provide, recording how the stage uses it."""

    def __init__(self, output: str, length: int) -> None:
        super().__init__(length)
        self.output, self.indices, self.finished = output, [], False

    def write(self, index: int, maps: dict[str, torch.Tensor]) -> None:
        for m in maps.values():
            assert m.dtype == torch.float16 and m.device.type == "cpu"
        self.indices.append(index)
        super().write(index, maps)

    def result(self):
        self.finished = True
        return super().result()


def test_reference_stage_writes_fp16_maps_step_by_step_through_the_writer(tiny, x_T, caption):
    writers: list[RecordingWriter] = []

    def write_steps(output: str, length: int) -> RecordingWriter:
        writers.append(RecordingWriter(output, length))
        return writers[-1]

    stage = GuidePix2PixZeroReference()
    params = stage.params(num_inference_steps=STEPS)
    out = stage.call(context(tiny, write_steps), params, {"x_T": x_T, "prompt_embeds": caption})

    (writer,) = writers
    assert writer.output == "attention_maps" and writer.length == STEPS
    assert writer.indices == list(range(STEPS)) and writer.finished
    maps = out["attention_maps"]
    assert len(maps) == STEPS
    assert all(m.shape[:2] in {(4, 64), (4, 16)} for m in maps[0].values())
    # The default writer of a context made outside the engine keeps the same maps in memory.
    default = stage.call(context(tiny), params, {"x_T": x_T, "prompt_embeds": caption})
    assert torch.equal(default["latents"], out["latents"])
    for i in range(STEPS):
        for name, m in maps[i].items():
            assert torch.equal(default["attention_maps"][i][name], m)


def test_stages_with_zero_direction_and_no_guidance_reproduce_the_reference(tiny, x_T, caption):
    reference = GuidePix2PixZeroReference().call(
        context(tiny, name="reference"),
        GuidePix2PixZeroReference.params(num_inference_steps=STEPS),
        {"x_T": x_T, "prompt_embeds": caption},
    )
    inputs = {
        "x_T": x_T,
        "prompt_embeds": caption,
        "direction": torch.zeros(1, 77, 32),
        "attention_maps": reference["attention_maps"],
    }
    stage = SamplePix2PixZero()
    off = stage.call(
        context(tiny), SamplePix2PixZeroParams(xa_guidance=0.0, num_inference_steps=STEPS), inputs
    )
    assert torch.equal(off["latents"], reference["latents"])
    on = stage.call(context(tiny), SamplePix2PixZeroParams(num_inference_steps=STEPS), inputs)
    assert on["latents"].shape == x_T.shape and torch.isfinite(on["latents"]).all()
    assert all(p.requires_grad for p in tiny.unet.parameters())  # restored after the run


def test_sample_stage_explains_missing_or_mismatched_reference_maps(tiny, x_T, caption):
    stage = SamplePix2PixZero()
    inputs = {"x_T": x_T, "prompt_embeds": caption, "direction": torch.zeros(1, 77, 32)}
    with pytest.raises(EditflowError, match="stages.edit.attention_maps: xa_guidance is 0.1"):
        stage.call(context(tiny), SamplePix2PixZeroParams(num_inference_steps=STEPS), inputs)
    maps = [{"layer": torch.zeros(4, 64, 77)}] * 3
    with pytest.raises(EditflowError, match="attention_maps hold 3 steps but num_inference"):
        stage.call(
            context(tiny),
            SamplePix2PixZeroParams(num_inference_steps=STEPS),
            {**inputs, "attention_maps": maps},
        )


def test_sample_stage_is_seeded_only_with_eta():
    assert not SamplePix2PixZero.is_seeded(SamplePix2PixZeroParams())
    assert SamplePix2PixZero.is_seeded(SamplePix2PixZeroParams(eta=0.5))
    assert not GuidePix2PixZeroReference.is_seeded(GuidePix2PixZeroReference.params())
