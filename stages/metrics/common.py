"""What the metric kinds share: their outputs, the pairing of images with references, the
mask regions, and the checks of sizes and batches.

Every metric kind returns ``values`` (the metric of each image, float64 ``(N,)``) and
``mean`` (their mean, float64 ``(1,)``), both of type ``metric``: what a table gathers across
a sweep and a plot draws.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from editflow.errors import EditflowError, Problem
from editflow.lazy import lazy
from editflow.stages.base import ArtifactType, CheckView, Params, Port

torch = lazy("torch")

Region = Literal["all", "inside", "outside"]

OUTPUTS = (
    Port("values", ArtifactType.METRIC, "The metric of each image, float64 (N,)"),
    Port("mean", ArtifactType.METRIC, "The mean over the images, float64 (1,)"),
)
IMAGES = Port("images", ArtifactType.IMAGE, "The images measured (edits), (N, 3, H, W)")
REFERENCE = Port(
    "reference",
    ArtifactType.IMAGE,
    "What they are compared with: one image for all, or one per image; left out, each image"
    " is compared with the next (N - 1 values: the smoothness of a sequence)",
    optional=True,
)
MASK = Port(
    "mask",
    ArtifactType.MASK,
    "Where `region` measures (1 = inside): one mask for all images, or one per image",
    optional=True,
)


class MaskedParams(Params):
    region: Region = Field(
        "all",
        description="Where to measure: the whole image, inside the mask or outside it"
        " (background preservation); a soft mask weighs each pixel",
    )


def metric_outputs(values: torch.Tensor) -> dict[str, torch.Tensor]:
    """``values`` and ``mean`` from per-image values."""
    values = values.detach().to("cpu", torch.float64).reshape(-1)
    return {"values": values, "mean": values.mean().reshape(1)}


def _size(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def pair_problems(view: CheckView, masked: bool = False, region: str = "all") -> list[Problem]:
    """Sizes that do not match, and a region without a mask (or a mask without a region)."""
    problems = []
    images, reference, mask = (view.sizes.get(port) for port in ("images", "reference", "mask"))
    if images is not None and reference is not None and images != reference:
        message = f"reference is {_size(reference)} but images is {_size(images)}"
        problems.append(Problem(message, key="reference", hint="compare images of one size"))
    if images is not None and mask is not None and images != mask:
        message = f"mask is {_size(mask)} but images is {_size(images)}"
        problems.append(Problem(message, key="mask", hint="give a mask of the images' size"))
    if masked and region != "all" and "mask" not in view.references:
        problems.append(
            Problem(
                f"is '{region}' but no mask is connected",
                key="region",
                hint="connect a mask (mask = \"inputs.NAME\"), or set region = 'all'",
            )
        )
    if masked and region == "all" and "mask" in view.references:
        message = "a mask is connected but region is 'all', which does not use it"
        problems.append(Problem(message, key="region", hint="set 'inside' or 'outside'"))
    return problems


def paired(
    stage: str,
    images: torch.Tensor,
    reference: torch.Tensor | None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(images, references, mask) of equal batch size, in float64 on the CPU.

    A reference or mask of one image serves every image; no reference pairs each image with
    the next.

    Raises:
        EditflowError: Batches or sizes that cannot be paired (named by the recipe key).
    """
    images = images.detach().to("cpu", torch.float64)
    if reference is None:
        if len(images) < 2:
            raise EditflowError(
                f"has {len(images)} image and no reference: without one, each image is"
                " compared with the next",
                key=f"stages.{stage}.images",
                hint="connect reference, or give a sequence of images",
            )
        images, reference = images[:-1], images[1:]
        mask = mask[:-1] if mask is not None and len(mask) > 1 else mask
    reference = reference.detach().to("cpu", torch.float64)
    for name, value in (("reference", reference), ("mask", mask)):
        if value is None:
            continue
        if value.shape[-2:] != images.shape[-2:]:
            raise EditflowError(
                f"{name} is {_size(tuple(value.shape[-2:]))} but images is"
                f" {_size(tuple(images.shape[-2:]))}",
                key=f"stages.{stage}.{name}",
            )
        if len(value) not in (1, len(images)):
            raise EditflowError(
                f"{name} has {len(value)} images but images has {len(images)}",
                key=f"stages.{stage}.{name}",
                hint=f"give one {name} for all images, or one per image",
            )
    reference = reference.expand_as(images)
    if mask is not None:
        mask = mask.detach().to("cpu", torch.float64).expand(len(images), 1, *images.shape[-2:])
    return images, reference, mask


def region_weights(mask: torch.Tensor | None, region: str) -> torch.Tensor | None:
    """Per-pixel weights (N, 1, H, W) of a region; ``None`` for the whole image."""
    if region == "all" or mask is None:
        return None
    return mask if region == "inside" else 1 - mask


def shared_inputs(masked: bool) -> tuple[Port, ...]:
    """The input ports of a paired metric."""
    return (IMAGES, REFERENCE, MASK) if masked else (IMAGES, REFERENCE)
