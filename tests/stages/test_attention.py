"""Cross-attention capture on the tiny UNet and the pix2pix-zero attention loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.pipelines.deprecated.stable_diffusion_variants import (
    pipeline_stable_diffusion_pix2pix_zero as peer,
)

from editflow.stages.diffusion import unet_noise_predictor
from editflow.stages.pix2pix_zero.attention import attention_loss, install_attention_recorder


@pytest.fixture(scope="module")
def unet(tiny_folder: Path) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(tiny_folder, subfolder="unet").eval()


def inputs(batch: int = 1, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn(batch, 4, 8, 8, generator=generator)
    embeds = torch.randn(batch, 77, 32, generator=generator)
    return x_t, torch.tensor(500), embeds


def test_recorder_captures_every_cross_attention_layer_by_module_name(unet):
    x_t, t, embeds = inputs(batch=2)
    with install_attention_recorder(unet) as recorder:
        _, maps = recorder.predictor(unet_noise_predictor(unet))(x_t, t, embeds)

    cross = [name for name, module in unet.named_modules() if name.endswith("attn2")]
    assert recorder.layers == cross and sorted(maps) == sorted(cross) and len(cross) == 4
    heads = 4  # the tiny UNet's attention_head_dim, which diffusers reads as heads
    queries = {"down_blocks.0": 64, "mid_block": 16, "up_blocks.1": 64}
    for name, probs in maps.items():
        q = next(n for prefix, n in queries.items() if name.startswith(prefix))
        assert probs.shape == (2 * heads, q, 77)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2 * heads, q))


def test_recorder_leaves_the_unet_output_unchanged_and_restores_its_processors(unet):
    x_t, t, embeds = inputs()
    original = {name: type(p) for name, p in unet.attn_processors.items()}
    expected = unet(x_t, t, encoder_hidden_states=embeds).sample
    with install_attention_recorder(unet) as recorder:
        eps, _ = recorder.predictor(unet_noise_predictor(unet))(x_t, t, embeds)
    assert {name: type(p) for name, p in unet.attn_processors.items()} == original
    torch.testing.assert_close(eps, expected, rtol=1e-5, atol=1e-5)


def test_plain_calls_record_nothing(unet):
    x_t, t, embeds = inputs()
    with install_attention_recorder(unet) as recorder:
        unet_noise_predictor(unet)(x_t, t, embeds)
        assert recorder.maps == {}


def test_cfg_batch_keeps_the_conditional_half(unet):
    x_t, t, cond = inputs(seed=1)
    uncond = torch.randn_like(cond)
    with install_attention_recorder(unet) as recorder:
        _, alone = recorder.predictor(unet_noise_predictor(unet))(x_t, t, cond)
        with recorder.capturing(cfg_batch=True) as halves:
            unet(torch.cat([x_t, x_t]), t, encoder_hidden_states=torch.cat([uncond, cond]))
    assert halves.keys() == alone.keys()
    for name in alone:
        torch.testing.assert_close(halves[name], alone[name], rtol=1e-5, atol=1e-6)


def test_recorded_maps_carry_gradients_to_the_latent(unet):
    x_t, t, embeds = inputs()
    leaf = x_t.clone().requires_grad_(True)
    with install_attention_recorder(unet) as recorder:
        _, maps = recorder.predictor(unet_noise_predictor(unet))(leaf, t, embeds)
    (grad,) = torch.autograd.grad(sum(m.square().sum() for m in maps.values()), leaf)
    assert grad.abs().sum() > 0


def test_attention_loss_is_the_released_per_map_sum_averaged_over_maps():
    generator = torch.Generator().manual_seed(0)
    current = {
        "a": torch.rand(8, 64, 77, generator=generator),
        "b": torch.rand(8, 16, 77, generator=generator),
    }
    reference = {name: torch.rand(m.shape, generator=generator) for name, m in current.items()}

    by_hand = sum(((current[n] - reference[n]) ** 2).sum((1, 2)).mean(0) for n in current)
    torch.testing.assert_close(attention_loss(current, reference), by_hand)

    # diffusers' port accumulates the same quantity layer by layer.
    reference_loss = peer.Pix2PixZeroL2Loss()
    for name in current:
        reference_loss.compute_loss(current[name], reference[name])
    torch.testing.assert_close(attention_loss(current, reference), reference_loss.loss)

    assert attention_loss(current, current) == 0
    half = {name: m.half() for name, m in reference.items()}  # the cache stores fp16
    assert attention_loss(current, half).dtype == torch.float32


def test_attention_loss_refuses_maps_of_different_layers():
    maps = {"a": torch.rand(2, 4, 77)}
    with pytest.raises(ValueError, match="different layers"):
        attention_loss(maps, {"b": torch.rand(2, 4, 77)})


def test_every_layer_keeps_fused_sdpa_and_recording_changes_no_number(unet):
    from diffusers.models.attention_processor import AttnProcessor2_0

    x_t, t, embeds = inputs()
    predict = unet_noise_predictor(unet)
    plain = predict(x_t, t, embeds)
    with install_attention_recorder(unet) as recorder:
        wrapped = {name: p for name, p in unet.attn_processors.items() if "attn2" in name}
        others = {name: p for name, p in unet.attn_processors.items() if "attn2" not in name}
        assert all(isinstance(p.fallback, AttnProcessor2_0) for p in wrapped.values())
        assert all(isinstance(p, AttnProcessor2_0) for p in others.values())
        inside = predict(x_t, t, embeds)
        recorded, maps = recorder.predictor(predict)(x_t, t, embeds)
    assert torch.equal(inside, plain) and torch.equal(recorded, plain)
    assert len(maps) == 4
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
