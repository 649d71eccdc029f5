"""Running a denoiser with tuned weights from another stage, and mixing their predictions.

Tuned weights are a ``weights`` artifact: the model's parameters by name (fp32). They run
through ``torch.func.functional_call`` on the loaded model, so the original weights are never
touched: a run that samples with and without tuned weights gets both right.

Mixing (DiffusionCLIP, Kim et al. 2022): with one tuned model and a ratio r,
``eps = r * eps_tuned + (1 - r) * eps_original``; with several, per-timestep weight vectors
over the tuned models, ``{300 = [0.4, 0.6], 0 = [0.15, 0.85]}``: the first threshold not
above t applies, and the weights are normalised. A single weight of 1 returns that model's
prediction as it is, so r = 0 and r = 1 reproduce the original and the tuned model exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pydantic import Field, field_validator

from editflow.errors import Problem
from editflow.lazy import lazy
from editflow.stages.base import ArtifactType, Params, Port
from editflow.stages.diffusion import NoisePredictor, unet_noise_predictor

torch = lazy("torch")
torch_func = lazy("torch.func")

Weights = Mapping[str, "torch.Tensor"]
Ratio = float | Mapping[str, Sequence[float]]

# The input every sampler that runs the UNet has.
WEIGHTS_PORT = Port(
    "weights",
    ArtifactType.WEIGHTS,
    "Tuned weights of the denoiser (e.g. finetune.diffusionclip), mixed by `ratio`",
    optional=True,
    many=True,
)


class TunedParams(Params):
    """The parameter of samplers with a ``weights`` input."""

    ratio: float | dict[str, list[float]] = Field(
        1.0,
        description="With `weights`: r in eps = r * eps_tuned + (1 - r) * eps_original, or a"
        " table {threshold = [one weight per tuned model]}: the first threshold not above t"
        " applies, weights normalised",
    )

    @field_validator("ratio")
    @classmethod
    def _ratio(cls, ratio: Any) -> Any:
        if isinstance(ratio, int | float):
            if not 0.0 <= ratio <= 1.0:
                raise ValueError(f"must be in [0, 1], got {ratio}")
            return ratio
        if not ratio:
            raise ValueError("needs at least one threshold")
        for key, weights in ratio.items():
            if not key.isdigit() or int(key) > 999:
                raise ValueError(f"threshold {key!r} must be a timestep from 0 to 999")
            if not all(math.isfinite(w) for w in weights):
                raise ValueError(f"threshold {key}: weights must be finite numbers")
            if any(w < 0 for w in weights) or sum(weights) <= 0:
                raise ValueError(f"threshold {key}: weights must be >= 0 with a positive sum")
        if 0 not in {int(key) for key in ratio}:
            lowest = min(int(key) for key in ratio)
            raise ValueError(
                f"needs a threshold 0: the timesteps below {lowest} would have no weights"
            )
        return ratio


def thresholds(ratio: Mapping[str, Sequence[float]]) -> list[tuple[int, list[float]]]:
    """A weight table as (threshold, normalised weights), highest threshold first."""
    table = [(int(key), [float(w) for w in weights]) for key, weights in ratio.items()]
    return [(key, [w / sum(weights) for w in weights]) for key, weights in sorted(table)[::-1]]


def mix_coefficients(ratio: Ratio, count: int, t: int) -> list[tuple[int, float]]:
    """(model, weight) pairs at timestep ``t``: model -1 is the original, 0.. the tuned
    ones; pairs with weight 0 are left out, so their models are not run."""
    if isinstance(ratio, int | float):
        pairs = [(-1, 1.0 - float(ratio)), (0, float(ratio))]
    else:
        table = thresholds(ratio)
        weights = next((w for threshold, w in table if threshold <= t), table[-1][1])
        pairs = list(enumerate(weights))
    return [(model, weight) for model, weight in pairs if weight != 0]


def tuned_module(unet: Any, weights: Weights) -> torch.nn.Module:
    """A module that runs ``unet`` with ``weights`` instead of its own parameters."""
    module = getattr(unet, "_orig_mod", unet)  # a compiled model's own module
    parameter = next(module.parameters())
    tuned = {name: value.to(parameter.device, parameter.dtype) for name, value in weights.items()}

    class _Tuned(torch.nn.Module):
        config = module.config

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return torch_func.functional_call(module, tuned, args, kwargs, strict=False)

    return _Tuned()


def mixing_predictor(
    unet: Any,
    tuned: Sequence[Weights],
    ratio: Ratio,
    wrap: Callable[[Any], NoisePredictor] = unet_noise_predictor,
) -> NoisePredictor:
    """The noise predictor of the original model mixed with tuned ones (see the module).

    ``wrap`` turns a model into a noise predictor (an inpainting model's conditioning ...);
    it is applied to the original and to each tuned model alike.
    """
    original = wrap(unet)
    if not tuned:
        return original
    predictors = [wrap(tuned_module(unet, weights)) for weights in tuned]

    def predict(
        x: torch.Tensor, t: torch.Tensor | int, embeds: torch.Tensor | None
    ) -> torch.Tensor:
        level = int(t)  # loops pass CPU timesteps: no wait on the device
        pairs = mix_coefficients(ratio, len(predictors), level)
        outputs = [
            (original if model < 0 else predictors[model])(x, t, embeds) for model, _ in pairs
        ]
        if len(pairs) == 1 and pairs[0][1] == 1.0:
            return outputs[0]
        return sum(weight * output for (_, weight), output in zip(pairs, outputs, strict=True))

    return predict


def check_ratio(ratio: Ratio, weights: Sequence[str]) -> list[Problem]:
    """``ratio`` against the tuned weights connected: one float for one model, a table of
    one weight per model otherwise."""
    if not weights:
        if ratio != 1.0:  # the default: nothing to mix
            return [Problem("mixes tuned weights with the original, but no weights are"
                            " connected: connect weights or remove ratio", key="ratio")]  # fmt: skip
        return []
    if not isinstance(ratio, int | float) and len(weights) == 1:
        return [Problem("is a table, but with one tuned model each threshold's weights are"
                        " normalised to 1: the original model is never mixed in", key="ratio",
                        hint="give one number, such as ratio = 0.3, to mix one tuned model"
                        " with the original")]  # fmt: skip
    if isinstance(ratio, int | float):
        if len(weights) > 1:
            return [Problem(f"a single ratio mixes one tuned model with the original, but"
                            f" weights has {len(weights)}: give a table of weight vectors",
                            key="ratio")]  # fmt: skip
        return []
    return [
        Problem(
            f"threshold {key} has {len(vector)} weights but weights has {len(weights)} references",
            key="ratio",
        )
        for key, vector in ratio.items()
        if len(vector) != len(weights)
    ]
