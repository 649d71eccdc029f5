"""invert.textual_inversion: a hand-written peer loop, a lower loss, seeds, the cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from editflow.cache import Cache
from editflow.engine.api import run_recipe
from editflow.engine.events import CollectEvents
from editflow.stages.base import derive_seed
from editflow.stages.diffusion import encode_prompts, unet_noise_predictor
from editflow.stages.interpolation.textual_inversion import shift_latents, textual_inversion


@pytest.fixture(scope="module")
def tiny(tiny_folder: Path):
    unet = UNet2DConditionModel.from_pretrained(tiny_folder / "unet").eval().requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(tiny_folder / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(tiny_folder / "text_encoder").eval()
    scheduler = DDPMScheduler.from_pretrained(tiny_folder / "scheduler")
    prompt = encode_prompts(tokenizer, text_encoder, ["a photo of a cat"] * 2)
    negative = encode_prompts(tokenizer, text_encoder, [""])
    latents = torch.randn(
        2, unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(1)
    )
    return unet, scheduler, latents, prompt, negative


def _invert(tiny, iterations: int, seed: int = 0, **kwargs):
    unet, scheduler, latents, prompt, negative = tiny
    return textual_inversion(
        unet_noise_predictor(unet), latents, prompt, negative, scheduler.alphas_cumprod,
        scheduler.config.prediction_type, iterations=iterations,
        learning_rate=kwargs.pop("learning_rate", 1e-4), guidance_scale=7.5,
        generator=torch.Generator().manual_seed(seed), **kwargs,
    )  # fmt: skip


def test_shift_moves_by_one_latent_pixel_and_replicates_the_edge() -> None:
    x = torch.arange(9.0).view(1, 1, 3, 3)
    assert torch.equal(shift_latents(x, 0, 0), x)
    assert shift_latents(x, 1, 0)[0, 0].tolist() == [[0, 1, 2], [0, 1, 2], [3, 4, 5]]
    assert shift_latents(x, 0, -1)[0, 0].tolist() == [[1, 2, 2], [4, 5, 5], [7, 8, 8]]


def test_equals_a_plain_training_loop_with_diffusers_noising(tiny) -> None:
    """The peer: DDPMScheduler.add_noise, a CFG prediction and Adam, drawn in the same order."""
    unet, scheduler, latents, prompt, negative = tiny
    iterations = 3
    ours_prompt, ours_negative, ours_losses = _invert(tiny, iterations, augment=False)

    generator = torch.Generator().manual_seed(0)
    p = prompt.clone().requires_grad_(True)
    n = negative.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([p, n], lr=1e-4)
    losses = []
    for _ in range(iterations):
        t = torch.randint(333, 666, (2,), generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        x_t = scheduler.add_noise(latents, noise, t)
        eps = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([n, n, p])).sample
        eps_uncond, eps_cond = eps.chunk(2)
        loss = F.mse_loss(eps_uncond + 7.5 * (eps_cond - eps_uncond), noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    torch.testing.assert_close(ours_losses, torch.tensor(losses), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_prompt, p.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_negative, n.detach(), rtol=1e-5, atol=1e-6)


def _fixed_loss(tiny, prompt: torch.Tensor, negative: torch.Tensor) -> float:
    """The guided noise-prediction MSE over 16 fixed draws: a loss that is not noisy."""
    unet, scheduler, latents, _, _ = tiny
    generator = torch.Generator().manual_seed(123)
    total = 0.0
    with torch.no_grad():
        for _ in range(16):
            t = torch.randint(333, 666, (2,), generator=generator)
            noise = torch.randn(latents.shape, generator=generator)
            x_t = scheduler.add_noise(latents, noise, t)
            eps = unet(torch.cat([x_t, x_t]), torch.cat([t, t]),
                       torch.cat([negative.expand(2, -1, -1), prompt])).sample  # fmt: skip
            eps_uncond, eps_cond = eps.chunk(2)
            total += F.mse_loss(eps_uncond + 7.5 * (eps_cond - eps_uncond), noise).item()
    return total / 16


def test_lowers_the_loss_and_leaves_the_unet_alone(tiny) -> None:
    unet = tiny[0]
    weights = {name: value.clone() for name, value in unet.state_dict().items()}
    steps = []
    prompt, negative, losses = _invert(
        tiny, 60, learning_rate=1e-1, progress=lambda i, total: steps.append((i, total))
    )
    assert prompt.shape == tiny[3].shape and negative.shape == tiny[4].shape
    assert losses.shape == (60,) and torch.isfinite(losses).all()
    assert steps == [(i, 60) for i in range(1, 61)]
    before = _fixed_loss(tiny, tiny[3], tiny[4])
    after = _fixed_loss(tiny, prompt, negative)
    assert after < 0.9 * before, (before, after)
    assert all(torch.equal(value, weights[name]) for name, value in unet.state_dict().items())
    assert all(parameter.grad is None for parameter in unet.parameters())


def test_the_same_seed_gives_the_same_embeddings(tiny) -> None:
    first = _invert(tiny, 4, seed=7)
    again = _invert(tiny, 4, seed=7)
    other = _invert(tiny, 4, seed=8)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[2], other[2])


ENCODES = ("encode_cat", "encode_astronaut")
RECIPE = """
schema_version = 1
seed = 0
[model]
id = "tiny"
[inputs.cat]
image = "skimage:chelsea"
size = [32, 32]
[inputs.astronaut]
image = "skimage:astronaut"
size = [32, 32]
[stages.encode_cat]
kind = "encode.vae"
images = "inputs.cat"
[stages.encode_astronaut]
kind = "encode.vae"
images = "inputs.astronaut"
[stages.embeddings]
kind = "invert.textual_inversion"
latents = ["encode_cat.latents", "encode_astronaut.latents"]
prompt = "a photo"
iterations = 3
"""


def test_the_stage_caches_its_embeddings_and_reports_each_iteration(
    tmp_path: Path, tiny, tiny_folder: Path
) -> None:
    recipe = tmp_path / "embeddings.toml"
    recipe.write_text(RECIPE)
    cache = Cache(tmp_path / "cache")
    events = CollectEvents()
    first = run_recipe(recipe, cache=cache, out_dir=None, device="cpu", events=events)
    assert "embeddings" in first.computed
    steps = [(e.step, e.total) for e in events.of("step") if e.stage == "embeddings"]
    assert steps == [(1, 3), (2, 3), (3, 3)]
    entry = cache.get(first.keys["embeddings"])
    assert tuple(entry.tensor("prompt_embeds").shape)[:1] == (2,)
    assert tuple(entry.tensor("negative_embeds").shape)[:1] == (1,)
    assert tuple(entry.tensor("losses").shape) == (3,)
    # The stage is the function on its inputs: the prompt "a photo" twice, "" as the negative.
    unet, scheduler, _, _, _ = tiny
    latents = torch.cat([cache.get(first.keys[n]).tensor("latents") for n in ENCODES])
    tokenizer = CLIPTokenizer.from_pretrained(tiny_folder / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(tiny_folder / "text_encoder").eval()
    prompt = encode_prompts(tokenizer, text_encoder, ["a photo"] * 2)
    negative = encode_prompts(tokenizer, text_encoder, [""])
    expected = textual_inversion(
        unet_noise_predictor(unet), latents, prompt, negative, scheduler.alphas_cumprod,
        scheduler.config.prediction_type, iterations=3, learning_rate=1e-4, guidance_scale=7.5,
        generator=torch.Generator().manual_seed(derive_seed(0, "embeddings", 0)),
    )  # fmt: skip
    for name, value in zip(("prompt_embeds", "negative_embeds", "losses"), expected, strict=True):
        torch.testing.assert_close(entry.tensor(name), value, rtol=1e-5, atol=1e-6)

    again = run_recipe(recipe, cache=cache, out_dir=None, device="cpu")
    assert again.computed == []
    longer = run_recipe(
        recipe, ["stages.embeddings.iterations=4"], cache=cache, out_dir=None, device="cpu"
    )
    assert longer.computed == ["embeddings"]
