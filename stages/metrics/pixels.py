"""Pixel metrics: MSE, PSNR and SSIM, over the whole image or a mask's region.

Images are in [0, 1], so the data range is 1. All arithmetic is in float64.

Written here rather than taken from torchmetrics' functional API, which (1.9) computes
neither exactly: its PSNR multiplies by 10 / ln 10 taken in float32 (a relative error of
4.5e-8 on float64 input), and its SSIM pads the images by reflection and averages the SSIM
map over the whole image, border windows included, where Wang et al.'s reference code (and
scikit-image) averages over the windows that lie inside the image ('valid' filtering).
- A region (inside or outside a mask) weighs each pixel by the mask (or 1 - mask): the
  region's MSE is the weighted mean of squared errors, its PSNR follows from that MSE, and
  its SSIM is the weighted mean of the SSIM map, each window weighted at its centre pixel.
  An empty region gives NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from editflow.errors import Problem
from editflow.lazy import lazy
from editflow.stages.base import CheckView, StageContext, StageKind
from editflow.stages.metrics.common import (
    OUTPUTS,
    MaskedParams,
    metric_outputs,
    pair_problems,
    paired,
    region_weights,
    shared_inputs,
)

torch = lazy("torch")
F = lazy("torch.nn.functional")

SSIM_WINDOW = 11  # Wang et al.'s Gaussian window: 11x11, sigma 1.5
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def masked_mse(
    images: torch.Tensor, reference: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error per image, over the pixels ``weights`` selects.

    Args:
        images: (N, C, H, W).
        reference: (N, C, H, W).
        weights: (N, 1, H, W) in [0, 1], or ``None`` for every pixel.

    Returns:
        (N,) float64: sum(w (x - y)^2) / (C sum(w)).
    """
    squared = (images.double() - reference.double()).pow(2)
    if weights is None:
        return squared.mean((1, 2, 3))
    weights = weights.double()
    total = (weights * squared).sum((1, 2, 3))
    return total / (weights.sum((1, 2, 3)) * images.shape[1])


def psnr(
    images: torch.Tensor, reference: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, 10 log10(1 / MSE) for data in [0, 1], in dB.

    Args: as :func:`masked_mse`.

    Returns:
        (N,) float64 (inf where the images are equal).
    """
    return 10 * torch.log10(1 / masked_mse(images, reference, weights))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """The normalised 2-D Gaussian window (size, size), float64 (MATLAB's fspecial)."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    line = torch.exp(-(offsets**2) / (2 * sigma**2))
    window = line[:, None] * line[None, :]
    return window / window.sum()


def ssim_map(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The SSIM map of Wang et al. (2004), Eq. 13, per channel, over the valid windows.

    Local statistics are Gaussian-weighted (11x11, sigma 1.5) with K1 = 0.01, K2 = 0.03 and
    data range 1.

    Args:
        images: (N, C, H, W), H and W at least 11.
        reference: (N, C, H, W).

    Returns:
        (N, C, H - 10, W - 10) float64.
    """
    x, y = images.double(), reference.double()
    channels = x.shape[1]
    window = gaussian_window().expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW)

    def local_mean(value: torch.Tensor) -> torch.Tensor:
        return F.conv2d(value, window, groups=channels)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(y * y) - mu_y**2
    cov = local_mean(x * y) - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )


def ssim(
    images: torch.Tensor, reference: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean SSIM per image (channels averaged), each window weighted at its centre pixel.

    Args: as :func:`masked_mse`.

    Returns:
        (N,) float64.
    """
    per_window = ssim_map(images, reference).mean(1, keepdim=True)  # (N, 1, h, w)
    if weights is None:
        return per_window.mean((1, 2, 3))
    border = SSIM_WINDOW // 2
    centres = weights.double()[..., border:-border, border:-border]
    return (centres * per_window).sum((1, 2, 3)) / centres.sum((1, 2, 3))


class _PixelMetric(StageKind):
    """A metric of images against references over a region of a mask: pair the inputs,
    weigh the region, compute the kind's ``formula`` per image, summarise."""

    params = MaskedParams
    inputs = shared_inputs(masked=True)
    outputs = OUTPUTS
    formula: ClassVar[Callable[..., torch.Tensor]]

    @classmethod
    def check(cls, params: MaskedParams, view: CheckView) -> list[Problem]:
        return pair_problems(view, masked=True, region=params.region)

    def run(
        self,
        ctx: StageContext,
        params: MaskedParams,
        *,
        images: torch.Tensor,
        reference: torch.Tensor | None,
        mask: torch.Tensor | None,
    ) -> dict[str, Any]:
        images, reference, mask = paired(ctx.name, images, reference, mask)
        weights = region_weights(mask, params.region)
        return metric_outputs(type(self).formula(images, reference, weights))


class MetricMse(_PixelMetric):
    """Mean squared error between images and references (data range 1)."""

    kind = "metric.mse"
    version = "1"
    description = "Mean squared error per image, in [0, 1] units, over a region of a mask"
    formula = staticmethod(masked_mse)


class MetricPsnr(_PixelMetric):
    """Peak signal-to-noise ratio in dB (data range 1); background preservation outside a mask."""

    kind = "metric.psnr"
    version = "1"
    description = "PSNR per image in dB, 10 log10(1 / MSE), over a region of a mask"
    formula = staticmethod(psnr)


class MetricSsim(_PixelMetric):
    """SSIM (Wang et al. 2004): Gaussian 11x11 windows, sigma 1.5, K1 0.01, K2 0.03."""

    kind = "metric.ssim"
    version = "1"
    description = (
        "SSIM per image (Wang et al. 2004; Gaussian 11x11, sigma 1.5, valid windows, channels"
        " averaged), over a region of a mask"
    )
    formula = staticmethod(ssim)

    @classmethod
    def check(cls, params: MaskedParams, view: CheckView) -> list[Problem]:
        problems = super().check(params, view)
        size = view.sizes.get("images")
        if size is not None and min(size) < SSIM_WINDOW:
            message = f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got"
            problems.append(Problem(f"{message} {size[0]}x{size[1]}", key="images"))
        return problems
