"""Metric kinds (``metric.*``): numbers about images, for tables and trade-off plots.

Method-independent: pixel metrics (MSE, PSNR, SSIM, over a mask's region or the whole
image), LPIPS with its own network (``model.lpips``), and CLIP scores with the recipe's CLIP.
Each returns ``values`` (one per image) and ``mean``, of type ``metric``. See docs/metrics.md.
"""

from editflow.stages.metrics.clip_metrics import MetricClipDirection, MetricClipScore
from editflow.stages.metrics.perceptual import MetricLpips
from editflow.stages.metrics.pixels import MetricMse, MetricPsnr, MetricSsim

KINDS = (
    MetricPsnr,
    MetricSsim,
    MetricMse,
    MetricLpips,
    MetricClipScore,
    MetricClipDirection,
)
