"""``sample.unseen_domain``: DiffusionCLIP's unseen-domain translation (Kim et al. 2022).

An image from a domain the model never saw (a sketch, a silhouette) is pulled onto the
model's domain by repeating a stochastic forward to ``t0`` and a short DDIM generation with
the ORIGINAL model; it is then inverted deterministically and edited like any image. The
generation is :func:`editflow.stages.ddim_loops.ddim_sample` on the time grid of
:mod:`editflow.stages.grid_scheduler`.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from editflow.errors import Problem
from editflow.lazy import lazy
from editflow.models import specs
from editflow.stages.base import ArtifactType, CheckView, Params, Port, StageContext, StageKind
from editflow.stages.ddim_loops import ddim_sample
from editflow.stages.diffusion import (
    check_t0,
    cpu_randn,
    encode_prompt_pair,
    is_unconditional,
    unet_noise_predictor,
)
from editflow.stages.fields import T0
from editflow.stages.grid_scheduler import GridScheduler, t0_grid

torch = lazy("torch")
diffusers = lazy("diffusers")


class SampleUnseenDomainParams(Params):
    t0: T0 = 400  # of each stochastic forward
    repeats: int = Field(5, ge=1, le=100, description="Forward-and-generate rounds")
    num_gen_steps: int = Field(6, ge=1, le=100, description="DDIM steps from t0 to 0 per round")


class SampleUnseenDomain(StageKind):
    """Pull an image onto the model's domain: (noise to t0, DDIM back) ``repeats`` times."""

    kind = "sample.unseen_domain"
    version = "3"  # 3: tiny-pixel runs on its own DDPM schedule (was tiny's SD one)
    description = (
        "Unseen-domain translation (DiffusionCLIP): repeated stochastic forward to t0 and"
        " DDIM generation with the original model"
    )
    params = SampleUnseenDomainParams
    inputs = (Port("latents", ArtifactType.LATENT, "Images from another domain, x0"),)
    outputs = (
        Port("latents", ArtifactType.LATENT, "The images on the model's domain", size_of="latents"),
    )
    # The text parts too: a text-conditioned UNet generates on the empty prompt's embedding.
    components = specs.DENOISER
    seeded = True

    @classmethod
    def check(cls, params: SampleUnseenDomainParams, view: CheckView) -> list[Problem]:
        return check_t0(params.t0, view.models)

    def run(
        self, ctx: StageContext, params: SampleUnseenDomainParams, *, latents: torch.Tensor
    ) -> dict[str, Any]:
        unet = ctx.models.get("unet")
        ddim = diffusers.DDIMScheduler.from_config(ctx.models.scheduler_config)
        scheduler = GridScheduler.from_scheduler(ddim, t0_grid(params.t0, params.num_gen_steps))
        generator = ctx.generator()
        x = latents.to(ctx.device, ctx.dtype)
        alpha = ddim.alphas_cumprod[params.t0].to(ctx.device, ctx.dtype)
        cond = uncond = None
        if not is_unconditional(unet):
            cond, uncond = encode_prompt_pair(ctx.models, "", "", len(x), guided=False)
        for round_index in range(params.repeats):
            noise = cpu_randn(x.shape, generator, like=x)
            x = alpha.sqrt() * x + (1 - alpha).sqrt() * noise
            x = ddim_sample(unet_noise_predictor(unet), x, scheduler, cond, uncond)
            ctx.progress(round_index + 1, params.repeats)
        return {"latents": x}
