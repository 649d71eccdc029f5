"""Image interpolation's building blocks: slerp, the frame tree, schedules, keypoints."""

from __future__ import annotations

import pytest
import torch

from editflow.stages.interpolation.frames import (
    candidate_counts,
    controlnet_strength,
    frame_tree,
    interpolate_keypoints,
    noise_levels,
    slerp,
)


def test_slerp_ends_and_unit_norm_between() -> None:
    generator = torch.Generator().manual_seed(0)
    a, b = (
        torch.randn(3, 4, 8, 8, generator=generator),
        torch.randn(3, 4, 8, 8, generator=generator),
    )
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    unit_a = a / a.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    unit_b = b / b.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    for weight in (0.25, 0.5, 0.9):
        norms = slerp(unit_a, unit_b, weight).flatten(1).norm(dim=1)
        torch.testing.assert_close(norms, torch.ones(3))
    # The midpoint of orthogonal unit vectors is their normalised sum, not the chord's middle.
    x, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    torch.testing.assert_close(slerp(x, y, 0.5), torch.tensor([[0.5**0.5, 0.5**0.5]]))
    # Parallel vectors: linear interpolation, no NaN.
    torch.testing.assert_close(slerp(x, 2 * x, 0.5), torch.tensor([[1.5, 0.0]]))


def test_slerp_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"slerp needs equal shapes, got \(1, 2\) and \(1, 3\)"):
        slerp(torch.zeros(1, 2), torch.zeros(1, 3), 0.5)


@pytest.mark.parametrize("levels", [1, 2, 3, 4, 6])
def test_the_frame_tree_fills_2_to_the_l_plus_1_frames_from_neighbours(levels: int) -> None:
    tree = frame_tree(levels)
    assert len(tree) == levels
    made = {0, 2**levels}
    for depth in tree:
        for frame, left, right in depth:
            assert left in made and right in made and frame == (left + right) // 2
        made |= {frame for frame, _, _ in depth}
    assert made == set(range(2**levels + 1))
    assert frame_tree(2) == [[(2, 0, 4)], [(1, 0, 2), (3, 2, 4)]]


def test_noise_levels_go_from_max_to_min_with_the_spacing() -> None:
    assert noise_levels(1, 0.3, 0.55, "linear") == [0.55]
    linear = noise_levels(3, 0.3, 0.5, "linear")
    assert linear == pytest.approx([0.5, 0.4, 0.3])
    assert noise_levels(3, 0.3, 0.5, "convex") == pytest.approx([0.5, 0.35, 0.3])
    assert noise_levels(3, 0.3, 0.5, "concave") == pytest.approx([0.5, 0.3 + 0.2 * 0.5**0.5, 0.3])


def test_candidates_fall_by_one_per_level_to_at_least_three() -> None:
    assert candidate_counts(7) == [8, 7, 6, 5, 4, 3, 3]
    assert candidate_counts(3, first=4, minimum=2) == [4, 3, 2]


def test_controlnet_strength_is_one_at_the_ends_and_one_and_a_half_in_the_middle() -> None:
    assert [controlnet_strength(p) for p in (0.0, 0.25, 0.5, 0.75, 1.0)] == [
        1.0,
        1.25,
        1.5,
        1.25,
        1.0,
    ]


def test_keypoints_present_in_both_poses_are_interpolated_others_skipped() -> None:
    a = torch.tensor([[0.0, 0.0, 1.0], [10.0, 10.0, 0.9], [5.0, 5.0, 0.0]])
    b = torch.tensor([[4.0, 8.0, 1.0], [20.0, 30.0, 0.0], [7.0, 7.0, 1.0]])
    mixed = interpolate_keypoints(a, b, 0.25)
    torch.testing.assert_close(mixed[0], torch.tensor([1.0, 2.0, 1.0]))
    assert mixed[1].tolist() == [0.0, 0.0, 0.0] and mixed[2].tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match=r"keypoints must be \(points, 3\) arrays of one shape"):
        interpolate_keypoints(a, b[:2], 0.5)
