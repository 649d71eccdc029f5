"""``metric.lpips``: the learned perceptual distance of Zhang et al. (2018).

The network is a model component (``model.lpips``: a folder or hub id, the built-in random
``tiny`` one on built-in models; :mod:`editflow.models.lpips`), run in float32 whatever the
recipe's dtype. Lower is more similar; 0 for equal images.
"""

from __future__ import annotations

from typing import Any

from editflow.errors import Problem
from editflow.lazy import lazy, no_grad
from editflow.models import specs
from editflow.stages.base import CheckView, Params, StageContext, StageKind
from editflow.stages.metrics.common import (
    OUTPUTS,
    metric_outputs,
    pair_problems,
    paired,
    shared_inputs,
)

torch = lazy("torch")


@no_grad
def lpips_distance(
    network: Any, images: torch.Tensor, reference: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """LPIPS per image pair (Zhang et al. 2018, Eq. 1), float64 on the CPU.

    Args:
        network: An :class:`~editflow.models.lpips.LpipsNetwork`.
        images: (N, 3, H, W) in [0, 1].
        reference: (N, 3, H, W) in [0, 1].
        device: Where the network runs.

    Returns:
        (N,) float64.
    """
    dtype = next(network.parameters()).dtype
    distance = network(images.to(device, dtype), reference.to(device, dtype))
    return distance.double().cpu()


class MetricLpips(StageKind):
    """LPIPS between images and references (or consecutive images)."""

    kind = "metric.lpips"
    version = "1"
    description = "LPIPS distance per image (Zhang et al. 2018) with the model.lpips network"
    params = Params
    inputs = shared_inputs(masked=False)
    outputs = OUTPUTS
    components = (specs.LPIPS,)

    @classmethod
    def check(cls, params: Params, view: CheckView) -> list[Problem]:
        return pair_problems(view)

    def run(
        self,
        ctx: StageContext,
        params: Params,
        *,
        images: torch.Tensor,
        reference: torch.Tensor | None,
    ) -> dict[str, Any]:
        images, reference, _ = paired(ctx.name, images, reference)
        network = ctx.models.get("lpips")
        return metric_outputs(lpips_distance(network, images, reference, ctx.device))
