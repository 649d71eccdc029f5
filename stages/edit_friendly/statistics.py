"""The paper's diagnostic of edit-friendly noise maps, and the stage that plots it.

Huberman-Spiegelglas et al. (CVPR 2024) contrast their noise maps with the
"native" DDPM noise space: native noise is i.i.d. standard normal, while edit-friendly maps
have a per-pixel variance above 1 and consecutive maps that are negatively correlated. The
reason is in the construction: ``z_i = (x_{i+1} - mu_i(x_i)) / scale_i`` where ``x_i`` and
``x_{i+1}`` are drawn independently, so ``z_i`` carries ``+x_{i+1} / scale_i`` and ``z_{i+1}``
carries ``-c x_{i+1} / scale_{i+1}`` (the mean of the next step grows with its input).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image
from pydantic import Field

from editflow.errors import EditflowError
from editflow.lazy import lazy
from editflow.models import specs
from editflow.stages.base import (
    ArtifactType,
    Params,
    Port,
    StageContext,
    StageKind,
    StepSequence,
)
from editflow.stages.diffusion import ddim_posterior_variance
from editflow.stages.edit_friendly.reverse_steps import (
    Scheduler,
    SchedulerName,
    build_scheduler,
    level_scales,
)

torch = lazy("torch")

FIGSIZE = (8.0, 3.0)  # inches
DPI = 100  # so the figure is 800 x 300 pixels


def noise_map_statistics(noise_maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise-map statistics of Huberman-Spiegelglas et al. 2024: variance and lag-1 correlation.

    Args:
        noise_maps: (T, ...) one map per step (for example (T, N, C, h, w)).

    Returns:
        ``per_step_variance`` (T,): the variance of each map over all its elements;
        ``consecutive_correlation`` (T - 1,): Pearson correlation of maps ``i`` and ``i + 1``.
        Both float64 on the CPU.
    """
    flat = noise_maps.detach().reshape(len(noise_maps), -1).double().cpu()
    centred = flat - flat.mean(dim=1, keepdim=True)
    sum_of_squares = (centred**2).sum(dim=1)
    per_step_variance = sum_of_squares / flat.shape[1]
    products = (centred[:-1] * centred[1:]).sum(dim=1)
    consecutive_correlation = products / (sum_of_squares[:-1] * sum_of_squares[1:]).sqrt()
    return per_step_variance, consecutive_correlation


def native_ddpm_forward_noise(
    x0: torch.Tensor, scheduler: Scheduler, generator: torch.Generator
) -> torch.Tensor:
    """The native DDPM noise maps of one forward chain (Ho et al. 2020, eq. 2, 4 and 7).

    Runs the Markov forward process over the scheduler's levels with ONE fresh draw per
    transition, ``x_i = sqrt(abar_i / abar_{i+1}) x_{i+1} + sqrt(1 - abar_i / abar_{i+1}) n_i``
    starting from ``x_T' = sqrt(abar_T') x0 + sqrt(1 - abar_T') n`` at the scheduler's final
    level, then reads off the noise each reverse step would need under the exact posterior
    ``q(x_{i+1} | x_i, x0)``: ``z_i = (x_{i+1} - mu~_i) / sigma~_i``. With the true ``x0`` in the
    posterior (no model) these are exactly i.i.d. standard normal: the baseline the
    edit-friendly statistics are compared with.

    Args:
        x0: (N, C, h, w) clean latents.
        scheduler: A scheduler after ``set_timesteps`` (its levels are used).
        generator: CPU generator.

    Returns:
        (T, N, C, h, w) float32 noise maps, noisiest step first, on ``x0``'s device.
    """
    alpha, _ = level_scales(scheduler)
    abar = alpha.double() ** 2  # (T + 1,)
    num_steps = len(abar) - 1
    clean = x0.detach().double().cpu()
    draws = torch.randn((num_steps + 1, *x0.shape), generator=generator, dtype=torch.float64)
    levels = [None] * (num_steps + 1)
    levels[num_steps] = abar[num_steps].sqrt() * clean + (1 - abar[num_steps]).sqrt() * draws[0]
    for i in reversed(range(num_steps)):
        ratio = abar[i] / abar[i + 1]
        levels[i] = ratio.sqrt() * levels[i + 1] + (1 - ratio).sqrt() * draws[i + 1]
    noise_maps = torch.empty((num_steps, *x0.shape), dtype=torch.float64)
    for i in range(num_steps):
        abar_t, abar_prev = abar[i], abar[i + 1]
        variance = ddim_posterior_variance(abar_t, abar_prev)
        eps = (levels[i] - abar_t.sqrt() * clean) / (1 - abar_t).sqrt()
        mean = abar_prev.sqrt() * clean + (1 - abar_prev - variance).sqrt() * eps
        noise_maps[i] = (levels[i + 1] - mean) / variance.sqrt()
    return noise_maps.float().to(x0.device)


def plot_noise_statistics(
    noise_maps: torch.Tensor, native_noise_maps: torch.Tensor | None = None, title: str = ""
) -> Image.Image:
    """Plot the noise-map statistics of Huberman-Spiegelglas et al. 2024 (variance, correlation).

    Deterministic: matplotlib's Agg canvas rendered to pixels (no file, no metadata, no
    timestamps), fixed size and dpi.

    Args:
        noise_maps: (T, ...) edit-friendly noise maps.
        native_noise_maps: (T', ...) native DDPM maps to compare with, or ``None``.
        title: Figure title.

    Returns:
        An RGB ``PIL.Image`` of 800 x 300 pixels.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # imported here: matplotlib is slow to import

    figure = Figure(figsize=FIGSIZE, dpi=DPI)
    canvas = FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    series = [("edit-friendly", noise_maps, "tab:red")]
    if native_noise_maps is not None:
        series.append(("native DDPM", native_noise_maps, "tab:blue"))
    for label, maps, colour in series:
        variance, correlation = noise_map_statistics(maps)
        steps = np.arange(len(variance))
        left.plot(steps, variance.numpy(), color=colour, label=label, linewidth=1.2)
        right.plot(steps[:-1] + 0.5, correlation.numpy(), color=colour, label=label, linewidth=1.2)
    left.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
    right.axhline(0.0, color="gray", linestyle="--", linewidth=0.8)
    left.set_yscale("log")
    left.set(xlabel="step (noisiest first)", ylabel="variance", title="per-step variance")
    right.set(xlabel="step (noisiest first)", ylabel="correlation", title="corr($z_i$, $z_{i+1}$)")
    left.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return Image.fromarray(rgba[..., :3].copy(), "RGB")


class FigureNoiseStatisticsParams(Params):
    scheduler: SchedulerName | None = Field(
        None, description="Scheduler of the inversion, whose levels drive the native baseline"
    )
    title: str = Field("", description="Figure title")


class FigureNoiseStatistics(StageKind):
    """Plot the statistics of edit-friendly noise maps against native DDPM noise."""

    kind = "figure.noise_statistics"
    version = "1"
    description = "Per-step variance and consecutive correlation of noise maps vs native DDPM"
    params = FigureNoiseStatisticsParams
    inputs = (
        Port("noise_maps", ArtifactType.NOISE_SEQUENCE, "Noise maps from invert.edit_friendly"),
        Port(
            "latents",
            ArtifactType.LATENT,
            "Clean latents x0 for the native DDPM baseline",
            optional=True,
        ),
    )
    outputs = (Port("image", ArtifactType.IMAGE, "The plot", export=True),)
    seeded = True  # the native baseline draws its forward chain
    inherits = {"noise_maps": {"scheduler": "ddim"}}
    # No weights are loaded: only the scheduler config is read (when latents are given);
    # declaring it puts the model's schedule into the stage's key.
    components = (specs.SCHEDULER_CONFIG,)

    def run(
        self,
        ctx: StageContext,
        params: FigureNoiseStatisticsParams,
        *,
        noise_maps: StepSequence,
        latents: torch.Tensor | None,
    ) -> dict[str, Any]:
        noise_maps = torch.stack([noise_maps[i] for i in range(len(noise_maps))])  # (T, ...)
        native = None
        if latents is not None:
            if ctx.models is None:
                raise EditflowError(
                    "the native baseline needs the model's scheduler config",
                    key=f"stages.{ctx.name}.latents",
                )
            scheduler = build_scheduler(
                params.scheduler, ctx.models.scheduler_config, len(noise_maps)
            )
            native = native_ddpm_forward_noise(latents.float(), scheduler, ctx.generator())
        image = plot_noise_statistics(noise_maps, native, params.title)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
        return {"image": pixels.permute(2, 0, 1).unsqueeze(0).contiguous()}
