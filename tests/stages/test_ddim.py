"""DDIM sampling and inversion: exact round trips and equality with hand-written diffusers loops."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler
from support import SD_CONFIG

from editflow.stages.ddim_loops import ddim_invert, ddim_sample


def schedulers(steps: int) -> tuple[DDIMScheduler, DDIMInverseScheduler]:
    scheduler = DDIMScheduler.from_config(SD_CONFIG)
    inverse = DDIMInverseScheduler.from_config(scheduler.config)
    scheduler.set_timesteps(steps)
    inverse.set_timesteps(steps)
    return scheduler, inverse


def latent_free_predictor(noise: torch.Tensor):
    """A predictor whose output depends on the timestep and the text but not on x_t.

    DDIM inversion evaluates the noise at the level it leaves while sampling evaluates it at
    the level it arrives at; the two agree only when the prediction does not depend on x_t,
    so for this predictor a round trip must return x0 to float precision.
    """

    def predict(x_t, t, embeds):
        return noise * (1 + float(t) / 1000) + embeds.mean()

    return predict


def toy_predictor(x_t, t, embeds):
    """A nonlinear stand-in for a UNet that depends on the latent, the timestep and the text."""
    text = embeds.mean(dim=(1, 2))[:, None, None, None]
    return torch.tanh(x_t * (1 + float(t) / 1000) + text) - 0.3 * x_t.roll(1, dims=-1)


def test_ddim_round_trip_is_exact_when_the_noise_does_not_depend_on_the_latent():
    torch.manual_seed(0)
    x0, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    scheduler, inverse = schedulers(10)
    predict = latent_free_predictor(noise)
    cond = torch.zeros(1, 77, 32)

    x_T, trajectory = ddim_invert(predict, x0, inverse, cond)
    assert trajectory.shape == (11, 1, 4, 8, 8)
    assert torch.equal(trajectory[0], x0) and torch.equal(trajectory[-1], x_T)

    reconstruction = ddim_sample(predict, x_T, scheduler, cond)
    relative_error = (reconstruction - x0).norm() / x0.norm()
    assert relative_error < 1e-5


def test_ddim_inversion_ends_at_the_last_inverse_timestep():
    # With a constant eps = c every DDIM level is x_t = sqrt(abar_t) z + sqrt(1 - abar_t) c,
    # z fixed by x0 at the first level (abar = alphas_cumprod[0], set_alpha_to_one False), so
    # x_T must sit exactly at abar_901 for 10 steps: no off-by-one level.
    torch.manual_seed(0)
    x0, c = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    scheduler, inverse = schedulers(10)
    x_T, _ = ddim_invert(lambda x_t, t, embeds: c, x0, inverse, torch.zeros(1, 77, 32))

    abar = scheduler.alphas_cumprod
    z = (x0 - (1 - abar[0]).sqrt() * c) / abar[0].sqrt()
    assert int(inverse.timesteps[-1]) == 901
    expected = abar[901].sqrt() * z + (1 - abar[901]).sqrt() * c
    torch.testing.assert_close(x_T, expected, rtol=1e-5, atol=1e-5)


def test_ddim_round_trip_error_shrinks_with_more_steps_for_a_latent_dependent_model():
    torch.manual_seed(0)
    x0, cond = torch.randn(1, 4, 8, 8), torch.zeros(1, 77, 32)
    errors = []
    for steps in (5, 20, 50):
        scheduler, inverse = schedulers(steps)
        x_T, _ = ddim_invert(toy_predictor, x0, inverse, cond)
        reconstruction = ddim_sample(toy_predictor, x_T, scheduler, cond)
        errors.append(float((reconstruction - x0).norm() / x0.norm()))
    assert errors[0] > errors[1] > errors[2]


def test_ddim_invert_equals_a_hand_written_diffusers_loop_with_cfg():
    torch.manual_seed(1)
    x0 = torch.randn(2, 4, 8, 8)
    cond, uncond = torch.randn(2, 77, 32), torch.randn(2, 77, 32)
    _, inverse = schedulers(7)

    ours, trajectory = ddim_invert(toy_predictor, x0, inverse, cond, uncond, guidance_scale=3.0)

    reference = DDIMInverseScheduler.from_config(SD_CONFIG)
    reference.set_timesteps(7)
    x = x0
    for t in reference.timesteps:
        eps_uncond, eps_cond = toy_predictor(torch.cat([x, x]), t, torch.cat([uncond, cond])).chunk(
            2
        )
        x = reference.step(eps_uncond + 3.0 * (eps_cond - eps_uncond), t, x).prev_sample
    assert torch.equal(ours, x)
    assert len(trajectory) == 8


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_sample_equals_a_hand_written_diffusers_loop(eta):
    torch.manual_seed(2)
    x_T = torch.randn(1, 4, 8, 8)
    cond, uncond = torch.randn(1, 77, 32), torch.randn(1, 77, 32)
    scheduler, _ = schedulers(6)
    steps = []

    ours = ddim_sample(
        toy_predictor,
        x_T,
        scheduler,
        cond,
        uncond,
        guidance_scale=5.0,
        eta=eta,
        generator=torch.Generator().manual_seed(3),
        callback=steps.append,
    )

    reference = DDIMScheduler.from_config(SD_CONFIG)
    reference.set_timesteps(6)
    generator = torch.Generator().manual_seed(3)
    x = x_T
    for t in reference.timesteps:
        eps_uncond, eps_cond = toy_predictor(torch.cat([x, x]), t, torch.cat([uncond, cond])).chunk(
            2
        )
        eps = eps_uncond + 5.0 * (eps_cond - eps_uncond)
        x = reference.step(eps, t, x, eta=eta, generator=generator).prev_sample
    assert torch.equal(ours, x)
    assert [step["i"] for step in steps] == list(range(6))
    assert torch.equal(steps[-1]["x"], ours)


def test_ddim_sample_with_eta_zero_never_touches_the_generator():
    scheduler, _ = schedulers(4)
    generator = torch.Generator().manual_seed(5)
    state = generator.get_state()
    ddim_sample(
        toy_predictor,
        torch.randn(1, 4, 8, 8),
        scheduler,
        torch.randn(1, 77, 32),
        generator=generator,
    )
    assert torch.equal(generator.get_state(), state)


def test_ddim_sample_with_eta_is_reproducible_from_the_seed():
    scheduler, _ = schedulers(4)
    x_T, cond = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)

    def run(seed):
        return ddim_sample(
            toy_predictor,
            x_T,
            scheduler,
            cond,
            eta=1.0,
            generator=torch.Generator().manual_seed(seed),
        )

    assert torch.equal(run(9), run(9))
    assert not torch.equal(run(9), run(10))


def test_ddim_loops_refuse_a_scheduler_without_timesteps():
    scheduler = DDIMScheduler.from_config(SD_CONFIG)
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_sample(toy_predictor, torch.randn(1, 4, 8, 8), scheduler, torch.randn(1, 77, 32))


# ------------------------------------------------------------------------------------------
# The stages on the tiny models: text from other stages, and a pixel model without text


@pytest.fixture(scope="module")
def registries(models_dir):
    """tiny and tiny-pixel through the engine's own registry, as a stage sees them."""
    from editflow.models import RunModels, resolve_providers
    from editflow.models.section import ModelSection

    def registry(model_id: str) -> RunModels:
        section = ModelSection(id=model_id)
        resolved = resolve_providers(section, ["model.id"], base_dir=models_dir,
                                     models_dir=models_dir)  # fmt: skip
        return RunModels(resolved, device=torch.device("cpu"), dtype=torch.float32,
                         models_dir=models_dir)  # fmt: skip

    return {"tiny": registry("tiny"), "tiny-pixel": registry("tiny-pixel")}


def run_stage(registry, kind, name: str, params, inputs):
    from editflow.stages.base import StageContext

    ctx = StageContext(name, 0, torch.device("cpu"), torch.float32,
                       models=registry.for_stage(kind.components))  # fmt: skip
    return kind().call(ctx, params, inputs)


def sample(registries, x_T, model="tiny", **params):
    from editflow.stages.ddim.kinds import SampleDdim, SampleDdimParams

    inputs = {"latents": x_T, **params.pop("inputs", {})}
    params = SampleDdimParams(num_inference_steps=5, **params)
    return run_stage(registries[model], SampleDdim, "sample", params, inputs)["latents"]


def encode(registries, prompt: str) -> torch.Tensor:
    from editflow.models import specs
    from editflow.stages.diffusion import encode_prompts

    view = registries["tiny"].for_stage((specs.TOKENIZER, specs.TEXT_ENCODER))
    return encode_prompts(view.get("tokenizer"), view.get("text_encoder"), [prompt])


def test_sample_ddim_with_prompt_embeds_and_a_direction_equals_the_explicit_embedding(
    registries,
):
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompt, common = "a photo of a cat", {"guidance_scale": 5.0}
    by_prompt = sample(registries, x_T, prompt=prompt, **common)
    embeds = encode(registries, prompt)
    by_embeds = sample(registries, x_T, inputs={"prompt_embeds": embeds}, **common)
    torch.testing.assert_close(by_embeds, by_prompt, rtol=1e-6, atol=1e-6)  # measured: equal

    direction = 0.5 * torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    along = sample(registries, x_T, prompt=prompt, inputs={"direction": direction}, **common)
    explicit = sample(registries, x_T, inputs={"prompt_embeds": embeds + direction}, **common)
    torch.testing.assert_close(along, explicit, rtol=1e-6, atol=1e-6)
    assert float((along - by_prompt).norm() / by_prompt.norm()) > 0.01  # measured 0.035


def test_sample_ddim_broadcasts_one_embedding_and_refuses_another_count(registries):
    from editflow.errors import EditflowError

    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    one = encode(registries, "a photo of a cat")
    shared = sample(registries, x_T, inputs={"prompt_embeds": one})
    each = sample(registries, x_T, inputs={"prompt_embeds": one.repeat(2, 1, 1)})
    torch.testing.assert_close(shared, each, rtol=1e-6, atol=1e-6)
    with pytest.raises(EditflowError) as error:
        sample(registries, x_T, inputs={"prompt_embeds": one.repeat(3, 1, 1)})
    assert str(error.value) == (
        "stages.sample.prompt_embeds: prompt_embeds holds 3 embeddings but the latents hold 2"
        " images (give one embedding for all images or one per image)"
    )
    with pytest.raises(EditflowError) as error:
        sample(registries, x_T, prompt="a dog", inputs={"prompt_embeds": one})
    assert str(error.value) == (
        "stages.sample.prompt: is 'a dog', but prompt_embeds is connected and replaces it"
        " (leave prompt empty or disconnect prompt_embeds)"
    )


def test_sample_ddim_on_a_pixel_model_runs_tuned_weights_and_refuses_text(registries):
    from editflow.errors import EditflowError
    from editflow.models import specs
    from editflow.stages.ddim.kinds import InvertDdim, InvertDdimParams

    x_T = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    unet = registries["tiny-pixel"].for_stage((specs.UNET,)).get("unet")
    generator = torch.Generator().manual_seed(1)
    tuned = {name: value + 0.01 * torch.randn(value.shape, generator=generator)
             for name, value in unet.state_dict().items()}  # fmt: skip
    plain = sample(registries, x_T, model="tiny-pixel")
    own = sample(registries, x_T, model="tiny-pixel", inputs={"weights": [unet.state_dict()]})
    assert torch.equal(own, plain)
    mixed = {"weights": [tuned]}
    assert torch.equal(sample(registries, x_T, model="tiny-pixel", ratio=0.0, inputs=mixed), plain)
    assert not torch.allclose(sample(registries, x_T, model="tiny-pixel", inputs=mixed), plain)

    with pytest.raises(EditflowError) as error:
        sample(registries, x_T, model="tiny-pixel", prompt="a cat")
    assert str(error.value) == (
        "stages.sample.prompt: is 'a cat', but the model has no text encoder (an unconditional"
        " UNet): the prompt would be ignored (leave prompt empty)"
    )
    with pytest.raises(EditflowError) as error:
        run_stage(registries["tiny-pixel"], InvertDdim, "invert", InvertDdimParams(),
                  {"latents": x_T, "caption": "a cat"})  # fmt: skip
    assert str(error.value) == (
        "stages.invert.caption: the model has no text encoder (an unconditional UNet): caption"
        " would be ignored (disconnect it)"
    )
