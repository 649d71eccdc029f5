"""Building blocks of image interpolation (Wang & Golland 2023), as plain functions.

The frame tree, the noise level of each tree depth, the candidate counts, spherical
interpolation of latents and text embeddings, the ControlNet strength along the sequence
and the interpolation of OpenPose keypoints. The ``sample.interpolate`` stage that puts
them together is not built yet (see the README's "Not built yet").
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Spacing = Literal["linear", "convex", "concave"]


def slerp(a: torch.Tensor, b: torch.Tensor, weight: float, eps: float = 1e-4) -> torch.Tensor:
    """Spherical interpolation per item of a batch: ``weight`` 0 gives ``a``, 1 gives ``b``.

    Each item (everything after the first dimension) is one vector. The result moves along
    the great circle between the directions with a norm that interpolates the two norms
    linearly, so unit vectors stay unit vectors. Nearly parallel vectors fall back to linear
    interpolation, where the great circle is numerically undefined.
    """
    if a.shape != b.shape:
        raise ValueError(f"slerp needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    flat_a, flat_b = a.flatten(1).double(), b.flatten(1).double()
    norm_a, norm_b = flat_a.norm(dim=1, keepdim=True), flat_b.norm(dim=1, keepdim=True)
    unit_a, unit_b = flat_a / norm_a, flat_b / norm_b
    cosine = (unit_a * unit_b).sum(dim=1, keepdim=True).clamp(-1, 1)
    theta = torch.acos(cosine)
    sin_theta = torch.sin(theta)
    parallel = sin_theta.abs() < eps
    safe = torch.where(parallel, torch.ones_like(sin_theta), sin_theta)
    direction = (
        torch.sin((1 - weight) * theta) * unit_a + torch.sin(weight * theta) * unit_b
    ) / safe
    direction = torch.where(parallel, (1 - weight) * unit_a + weight * unit_b, direction)
    norm = (1 - weight) * norm_a + weight * norm_b
    return (direction * norm).view(a.shape).to(a.dtype)


def frame_tree(levels: int) -> list[list[tuple[int, int, int]]]:
    """The frames each tree depth adds, as ``(frame, left neighbour, right neighbour)``.

    There are ``2**levels + 1`` frames; frames 0 and ``2**levels`` are the inputs. Depth 1
    adds the middle frame, each further depth the midpoints of the gaps left.
    """
    last = 2**levels
    tree = []
    for depth in range(1, levels + 1):
        half = last >> depth
        tree.append([(frame, frame - half, frame + half) for frame in range(half, last, 2 * half)])
    return tree


def noise_levels(
    levels: int, schedule_min: float, schedule_max: float, spacing: Spacing
) -> list[float]:
    """The noise level of each tree depth as a fraction of the schedule, coarsest first.

    Depth 1 gets ``schedule_max``, the last depth ``schedule_min``; between them the
    fractions follow ``spacing`` of the remaining distance: ``linear`` steps evenly,
    ``convex`` (x^2) stays near the minimum longer, ``concave`` (sqrt x) near the maximum.
    """
    shape = {"linear": lambda x: x, "convex": lambda x: x * x, "concave": math.sqrt}[spacing]
    if levels == 1:
        return [schedule_max]
    return [
        schedule_min + (schedule_max - schedule_min) * shape(1 - depth / (levels - 1))
        for depth in range(levels)
    ]


def candidate_counts(levels: int, first: int = 8, minimum: int = 3) -> list[int]:
    """Candidates per new frame at each depth: ``first``, one fewer per depth, at least
    ``minimum``."""
    return [max(first - depth, minimum) for depth in range(levels)]


def controlnet_strength(position: float, ends: float = 1.0, middle: float = 1.5) -> float:
    """ControlNet conditioning scale at ``position`` in [0, 1] of the sequence: ``ends`` at
    both inputs rising linearly to ``middle`` at the middle frame."""
    return ends + (middle - ends) * (1 - abs(2 * position - 1))


def interpolate_keypoints(a: torch.Tensor, b: torch.Tensor, weight: float) -> torch.Tensor:
    """Linear interpolation of OpenPose keypoints ``(points, 3)`` as (x, y, confidence).

    A point is kept only when both poses have it (confidence > 0); others come out with
    confidence 0 so the pose drawing skips them rather than sliding them in from (0, 0).
    """
    if a.shape != b.shape or a.shape[-1] != 3:
        raise ValueError(f"keypoints must be (points, 3) arrays of one shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")  # fmt: skip
    present = (a[..., 2] > 0) & (b[..., 2] > 0)
    mixed = (1 - weight) * a + weight * b
    return torch.where(present[..., None], mixed, torch.zeros_like(mixed))
