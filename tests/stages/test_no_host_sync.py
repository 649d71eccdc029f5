"""The sampling loops never wait for the device: they run with every tensor on the meta
device, where any read of a value on the host (``.item()``, ``bool(t)``, ``if t > 0``, a
``.cpu()`` copy) raises. Timesteps stay on the CPU by design, and the CPU draws of noise are
moved to the device, not read back. This is the CPU-checkable half of a sync-free GPU loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, UNet2DConditionModel

from editflow.stages.base import step_reporter
from editflow.stages.compositing.local_ilvr import LocalIlvr, local_ilvr_sample
from editflow.stages.ddim_loops import ddim_invert, ddim_sample
from editflow.stages.diffusion import unet_noise_predictor
from editflow.stages.edit_friendly.inversion import edit_friendly_invert, edit_friendly_sample
from editflow.stages.edit_friendly.reverse_steps import build_scheduler
from editflow.stages.pix2pix_zero.attention import install_attention_recorder
from editflow.stages.pix2pix_zero.edit import guided_edit

META = torch.device("meta")
STEPS = 4


def _progress() -> object:
    """The callback the stages pass: progress bars read only the step index."""
    return step_reporter(lambda step, total: None, STEPS)


@pytest.fixture(scope="module")
def unet(tiny_folder: Path) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(tiny_folder / "unet").to(META).eval()


@pytest.fixture(scope="module")
def scheduler_config(tiny_folder: Path) -> dict:
    return dict(DDIMScheduler.load_config(tiny_folder / "scheduler"))


def _latents() -> torch.Tensor:
    return torch.empty(1, 4, 8, 8, device=META)


def _embeds(unet: UNet2DConditionModel) -> torch.Tensor:
    return torch.empty(1, 77, unet.config.cross_attention_dim, device=META)


def test_a_host_read_of_a_meta_tensor_raises() -> None:  # what the tests below rely on
    with pytest.raises(RuntimeError, match="meta"):
        bool(_latents().sum() > 0)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_sampling_never_reads_the_device(unet, scheduler_config, eta: float) -> None:
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(STEPS)
    embeds = _embeds(unet)
    out = ddim_sample(unet_noise_predictor(unet), _latents(), scheduler, embeds, embeds,
                      guidance_scale=7.5, eta=eta, generator=torch.Generator().manual_seed(0),
                      callback=_progress())  # fmt: skip
    assert out.device == META and out.shape == (1, 4, 8, 8)


@pytest.mark.parametrize("regularize", [False, True])
def test_ddim_inversion_never_reads_the_device(unet, scheduler_config, regularize: bool) -> None:
    scheduler = DDIMInverseScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(STEPS)
    x_T, trajectory = ddim_invert(
        unet_noise_predictor(unet), _latents(), scheduler, _embeds(unet), regularize=regularize,
        generator=torch.Generator().manual_seed(0), reg_rounds=1, ac_steps=1,
        callback=_progress(),
    )  # fmt: skip
    assert x_T.device == META and trajectory.shape == (STEPS + 1, 1, 4, 8, 8)


@pytest.mark.parametrize("name", ["ddim", "dpmsolver++"])
def test_edit_friendly_inversion_and_edit_never_read_the_device(
    unet, scheduler_config, name: str
) -> None:
    predict, embeds = unet_noise_predictor(unet), _embeds(unet)
    eta = 1.0
    inversion = edit_friendly_invert(
        predict, _latents(), build_scheduler(name, scheduler_config, STEPS), embeds, embeds,
        guidance_scale=3.5, eta=eta, generator=torch.Generator().manual_seed(0),
        callback=_progress(),
    )  # fmt: skip
    edited = edit_friendly_sample(
        predict, inversion, build_scheduler(name, scheduler_config, STEPS), embeds, embeds,
        guidance_scale=15.0, skip=1, eta=eta, callback=_progress(),
    )  # fmt: skip
    assert edited.device == META and inversion.noise_maps.shape == (STEPS, 1, 4, 8, 8)


def test_local_ilvr_never_reads_the_device(unet, scheduler_config) -> None:
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(STEPS)
    guidance = LocalIlvr(reference=_latents(), mask=torch.empty(1, 1, 8, 8, device=META),
                         n_in=2, n_out=4, t_in=0.5, t_out=1.0)  # fmt: skip
    embeds = _embeds(unet)
    out = local_ilvr_sample(unet_noise_predictor(unet), _latents(), scheduler, embeds, embeds,
                            guidance=guidance, repaint_start=0.5, repaint_jump=2,
                            repaint_resamples=2, eta=0.0, callback=_progress())  # fmt: skip
    assert out.device == META


def test_the_guided_pix2pix_zero_edit_never_reads_the_device(
    unet, scheduler_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before its loop the edit compares the two prompts once (a zero direction skips CFG):
    # that one host read is deliberate; the loop is what must not wait.
    monkeypatch.setattr(torch, "equal", lambda a, b: False)
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(STEPS)
    embeds = _embeds(unet)
    with install_attention_recorder(unet) as recorder:
        predict = unet_noise_predictor(unet)
        predict_maps = recorder.predictor(predict)
        _, shapes = predict_maps(_latents(), scheduler.timesteps[0], embeds)
        reference = {layer: torch.empty(maps.shape, device=META) for layer, maps in shapes.items()}
        out = guided_edit(predict, _latents(), scheduler, embeds, embeds.clone(),
                          predict_maps=predict_maps, reference_maps=lambda step: reference,
                          xa_guidance=0.1, guidance_scale=5.0, callback=_progress())  # fmt: skip
    assert out.device == META
