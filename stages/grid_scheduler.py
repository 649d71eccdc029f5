"""DDIM along an arbitrary integer time grid, behind the diffusers scheduler interface.

DiffusionCLIP (Kim, Kwon, Ye 2022) inverts and generates on the grid
``linspace(0, 1, n) * t0`` truncated to integers (:func:`t0_grid`), which no diffusers
scheduler's ``set_timesteps`` produces. :class:`GridScheduler` runs DDIM (Song et al. 2021,
eq. 12) on such a grid and offers what the common loops of :mod:`editflow.stages.ddim_loops`
read (``timesteps``, ``num_inference_steps``, ``config.prediction_type``, ``alphas_cumprod``,
``scale_model_input``, ``step``), so inversion and generation to ``t0`` are the same loops
as every other DDIM run, for any prediction type.

- Generation (``inverse=False``) runs ``len(grid)`` steps down: the grid reversed, the last
  step from timestep ``grid[0]`` to the clean image (``alpha_bar = 1``).
- Inversion (``inverse=True``) runs ``len(grid) - 1`` steps up, from ``x0`` treated as the
  level of timestep ``grid[0]``; the model is evaluated at the level a step starts from.

A truncated grid repeats timesteps when ``n > t0 + 1``, so nothing here is keyed by a
timestep's value: step ``i`` is the transition between the ``i``-th pair of levels.
:meth:`GridScheduler.transition` is that step as a pure function of the index (what a
checkpointed chain recomputes); :meth:`GridScheduler.step` walks the indices in order, as a
loop over ``timesteps`` calls it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from editflow.lazy import lazy
from editflow.stages.diffusion import ddim_posterior_variance, split_model_output

torch = lazy("torch")

CLEAN = -1  # the level past timestep 0: the clean image, alpha_bar = 1


def t0_grid(t0: int, steps: int) -> list[int]:
    """``linspace(0, 1, steps) * t0`` as integers (truncated): the timesteps of inversion
    and generation to ``t0`` (DiffusionCLIP's ``seq``; it may repeat values)."""
    return [int(value) for value in np.linspace(0, 1, steps) * t0]


@dataclass(frozen=True)
class GridSchedulerConfig:
    """The part of a diffusers scheduler config the loops read.

    Attributes:
        prediction_type: ``epsilon``, ``v_prediction`` or ``sample``.
    """

    prediction_type: str = "epsilon"


class GridSchedulerOutput(NamedTuple):
    """One step's result, named as diffusers' ``DDIMSchedulerOutput``.

    Attributes:
        prev_sample: (N, C, H, W) x at the step's target level.
        pred_original_sample: (N, C, H, W) the clean image predicted at the step, ``x0_hat``.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class GridScheduler:
    """DDIM (Song et al. 2021, eq. 12) on an integer time grid, either direction.

    Args:
        alphas_cumprod: (T,) the model's cumulative alphas (a diffusers scheduler's).
        grid: Ascending timesteps, repeats allowed (:func:`t0_grid`).
        inverse: Run the grid upwards (inversion) instead of down to the clean image.
        prediction_type: What the model predicts: ``epsilon``, ``v_prediction`` or
            ``sample``.

    Attributes:
        timesteps: (steps,) int64 on the CPU: the timestep the model is evaluated at in each
            step.
        levels: (steps,) ``(t, t_next)`` of each step; ``-1`` is the clean image.
        num_inference_steps: The number of steps.
        step_index: The step :meth:`step` takes next.
    """

    order = 1

    def __init__(
        self,
        alphas_cumprod: torch.Tensor,
        grid: Sequence[int],
        *,
        inverse: bool = False,
        prediction_type: str = "epsilon",
    ) -> None:
        grid = [int(t) for t in grid]
        if not grid or any(b < a for a, b in zip(grid, grid[1:], strict=False)):
            raise ValueError(f"the grid must be a non-empty ascending sequence, got {grid}")
        if inverse:
            levels = list(zip(grid[:-1], grid[1:], strict=True))
        else:
            previous = [CLEAN, *grid[:-1]]
            levels = list(zip(reversed(grid), reversed(previous), strict=True))
        self.alphas_cumprod = alphas_cumprod
        self.config = GridSchedulerConfig(prediction_type)
        self.inverse = inverse
        self.levels: list[tuple[int, int]] = levels
        self.timesteps = torch.tensor([t for t, _ in levels], dtype=torch.long)
        self.num_inference_steps = len(levels)
        self.step_index = 0

    @classmethod
    def from_scheduler(
        cls, scheduler: Any, grid: Sequence[int], *, inverse: bool = False
    ) -> GridScheduler:
        """The grid on a diffusers scheduler's ``alphas_cumprod`` and ``prediction_type``
        (build that scheduler from the model's config)."""
        return cls(
            scheduler.alphas_cumprod,
            grid,
            inverse=inverse,
            prediction_type=scheduler.config.prediction_type,
        )

    def set_timesteps(self, num_inference_steps: int | None = None, device: Any = None) -> None:
        """Start again from the first step (the grid is fixed at construction)."""
        if num_inference_steps not in (None, self.num_inference_steps):
            raise ValueError(
                f"the grid has {self.num_inference_steps} steps, not {num_inference_steps}"
            )
        self.step_index = 0

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """DDIM does not scale the model input."""
        return sample

    def alpha_bar(self, t: int, like: torch.Tensor) -> torch.Tensor:
        """alpha_bar at timestep ``t`` (1 for the clean image) on ``like``'s device and dtype."""
        value = self.alphas_cumprod[t] if t != CLEAN else self.alphas_cumprod.new_tensor(1.0)
        return value.to(device=like.device, dtype=like.dtype)

    def transition(
        self,
        index: int,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        variance_noise: torch.Tensor | None = None,
    ) -> GridSchedulerOutput:
        """Step ``index`` as a pure function: DDIM (Song et al. 2021, eq. 12) from level
        ``t`` to ``t_next`` of ``levels[index]``.

        ``x_next = sqrt(a_next) x0_hat + sigma noise + sqrt(1 - a_next - sigma^2) eps_hat``
        with ``sigma = eta * sqrt(ddim_posterior_variance(a_t, a_next))`` (eq. 16); eps_hat
        and x0_hat come from the model output of any prediction type.

        Args:
            index: The step, ``0 <= index < num_inference_steps``.
            model_output: (N, C, H, W) the model's output at ``sample`` and ``timesteps[index]``.
            sample: (N, C, H, W) x at level ``t``.
            eta: DDIM stochasticity; used only with ``variance_noise``.
            variance_noise: (N, C, H, W) standard normal noise for ``eta > 0``.
        """
        t, t_next = self.levels[index]
        a_t, a_next = self.alpha_bar(t, sample), self.alpha_bar(t_next, sample)
        prediction_type = self.config.prediction_type
        eps, x0_hat = split_model_output(
            model_output, sample, a_t.sqrt(), (1 - a_t).sqrt(), prediction_type
        )
        if eta == 0 or variance_noise is None:
            return GridSchedulerOutput(a_next.sqrt() * x0_hat + (1 - a_next).sqrt() * eps, x0_hat)
        sigma = eta * ddim_posterior_variance(a_t, a_next).sqrt()
        eps_weight = (1 - a_next - sigma**2).sqrt()
        x_next = a_next.sqrt() * x0_hat + sigma * variance_noise + eps_weight * eps
        return GridSchedulerOutput(x_next, x0_hat)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: torch.Tensor | int,
        sample: torch.Tensor,
        eta: float = 0.0,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> GridSchedulerOutput:
        """The next step in order (:meth:`transition` at ``step_index``), as diffusers'
        ``DDIMScheduler.step``; after the last step the scheduler starts over.

        Args:
            model_output: (N, C, H, W) the model's output at ``sample`` and ``timestep``.
            timestep: ``timesteps[step_index]`` (a CPU tensor or int; checked).
            sample: (N, C, H, W) x at the step's level.
            eta: DDIM stochasticity (generation only).
            variance_noise: (N, C, H, W) standard normal noise for ``eta > 0``.
            return_dict: Ignored: the output is a named tuple either way.
        """
        index = self.step_index
        expected = int(self.timesteps[index])
        if int(timestep) != expected:
            raise ValueError(
                f"step {index} of the grid is at timestep {expected}, not {int(timestep)}:"
                " call set_timesteps() before running the grid again"
            )
        if eta > 0 and self.inverse:
            raise ValueError("inversion along the grid is deterministic: eta must be 0")
        self.step_index = (index + 1) % self.num_inference_steps
        return self.transition(index, model_output, sample, eta, variance_noise)
