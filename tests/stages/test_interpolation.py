"""Image interpolation's building blocks: slerp, the frame tree, schedules, keypoints."""

from __future__ import annotations

import math

import pytest
import torch

from editflow.stages.interpolation.frames import (
    candidate_counts,
    controlnet_strength,
    frame_tree,
    interpolate_keypoints,
    level_steps,
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


def _textbook_slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Shoemake's slerp of each item as one vector, in float64, from the formula."""
    out = []
    for x, y in zip(a.double(), b.double(), strict=True):
        theta = math.acos(float((x * y).sum() / (x.norm() * y.norm())))
        out.append(math.sin((1 - t) * theta) / math.sin(theta) * x
                   + math.sin(t * theta) / math.sin(theta) * y)  # fmt: skip
    return torch.stack(out)


def _pair(norm_b: float) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(3, 4, 8, 8, generator=generator, dtype=torch.float64)
    b = torch.randn(3, 4, 8, 8, generator=generator, dtype=torch.float64)
    return a, b * norm_b / b.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


@pytest.mark.parametrize("weight", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_raw_slerp_is_the_textbook_formula_of_the_vectors(weight: float) -> None:
    a, b = _pair(norm_b=3.0)  # norms about 16 and 3: the two forms differ
    expected = _textbook_slerp(a, b, weight)
    torch.testing.assert_close(slerp(a, b, weight, form="raw"), expected, rtol=1e-12, atol=1e-12)
    # float32 items are computed in float64 and rounded once.
    torch.testing.assert_close(
        slerp(a.float(), b.float(), weight, form="raw"), expected.float(), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("weight", [0.25, 0.5, 0.9])
def test_unit_direction_slerp_moves_the_direction_and_interpolates_the_norm(
    weight: float,
) -> None:
    a, b = _pair(norm_b=3.0)
    norm_a, norm_b = a.flatten(1).norm(dim=1), b.flatten(1).norm(dim=1)
    unit = _textbook_slerp(a / norm_a.view(-1, 1, 1, 1), b / norm_b.view(-1, 1, 1, 1), weight)
    norm = (1 - weight) * norm_a + weight * norm_b
    expected = unit * norm.view(-1, 1, 1, 1)
    ours = slerp(a, b, weight)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    # Where the norms differ, the raw form's norm is not the linearly interpolated one.
    raw = slerp(a, b, weight, form="raw")
    assert bool(((raw.flatten(1).norm(dim=1) - norm).abs() > 1e-2).all())


def test_raw_slerp_midpoint_norm_exceeds_the_mean_norm_by_the_half_angle() -> None:
    a, b = _pair(norm_b=3.0)
    norm_a, norm_b = a.flatten(1).norm(dim=1), b.flatten(1).norm(dim=1)
    theta = torch.acos((a * b).flatten(1).sum(dim=1) / (norm_a * norm_b))
    expected = ((norm_a + norm_b) / 2) ** 2 + (torch.tan(theta / 2) * (norm_a - norm_b) / 2) ** 2
    raw = slerp(a, b, 0.5, form="raw").flatten(1).norm(dim=1)
    torch.testing.assert_close(raw**2, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(slerp(a, b, 0.5).flatten(1).norm(dim=1), (norm_a + norm_b) / 2)


def test_the_slerp_forms_agree_for_vectors_of_equal_norm() -> None:
    a, b = _pair(norm_b=1.0)
    a = a / a.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    for weight in (0.25, 0.5, 0.9):
        torch.testing.assert_close(slerp(a, b, weight, form="raw"), slerp(a, b, weight),
                                   rtol=1e-12, atol=1e-12)  # fmt: skip
    # Parallel vectors: linear interpolation of the vectors themselves, no NaN.
    x = torch.tensor([[1.0, 0.0]])
    torch.testing.assert_close(slerp(x, 2 * x, 0.5, form="raw"), torch.tensor([[1.5, 0.0]]))


@pytest.mark.parametrize("form", ["unit-direction", "raw"])
def test_a_text_embedding_and_a_latent_are_each_slerped_as_one_vector(form: str) -> None:
    generator = torch.Generator().manual_seed(2)
    text_a, text_b = (torch.randn(1, 7, 16, generator=generator, dtype=torch.float64) * s
                      for s in (1.0, 2.0))  # fmt: skip
    whole = slerp(text_a.flatten(1), text_b.flatten(1), 0.3, form=form).view(1, 7, 16)
    torch.testing.assert_close(slerp(text_a, text_b, 0.3, form=form), whole)
    # Not token by token: each token's own angle would give another embedding.
    per_token = slerp(text_a[0], text_b[0], 0.3, form=form)[None]
    assert (per_token - whole).abs().max() > 1e-3
    # A latent's channels and pixels are one vector too.
    latent_a, latent_b = (torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64)
                          for _ in range(2))  # fmt: skip
    flat = slerp(latent_a.flatten(1), latent_b.flatten(1), 0.5, form=form).view(2, 4, 8, 8)
    torch.testing.assert_close(slerp(latent_a, latent_b, 0.5, form=form), flat)


def _half_up(x: float) -> int:
    return math.floor(x + 0.5)


@pytest.mark.parametrize("num_steps", [4, 10, 20, 50, 250])
def test_level_steps_round_half_to_even_or_half_up_like_their_formulas(num_steps: int) -> None:
    fractions = [i / 40 for i in range(1, 41)] + noise_levels(3, 0.3, 0.55, "linear")
    for fraction in fractions:
        x = fraction * num_steps
        clamp = lambda steps: max(1, min(num_steps, steps))  # noqa: E731
        assert level_steps(fraction, num_steps) == clamp(round(x)), (fraction, num_steps)
        assert level_steps(fraction, num_steps, "half-up") == clamp(_half_up(x)), (fraction,)
    assert level_steps(0.001, num_steps, "half-up") == 1  # never below one step


def test_photos_middle_depth_is_a_tie_that_the_two_roundings_split() -> None:
    # photos.toml: levels 3, schedule 0.3 to 0.55, 20 steps; the middle depth's fraction
    # 0.425 is 8.5 steps.
    middle = noise_levels(3, 0.3, 0.55, "linear")[1]
    assert middle * 20 == 8.5
    assert level_steps(middle, 20) == 8 and level_steps(middle, 20, "half-up") == 9
    # The other depths are whole numbers of steps, the same either way.
    assert [level_steps(f, 20, "half-up") for f in (0.55, 0.3)] == [11, 6]
    # Ties at even counts: both give the same.
    assert level_steps(0.475, 20) == 10 == level_steps(0.475, 20, "half-up")
    assert level_steps(0.125, 20) == 2 and level_steps(0.125, 20, "half-up") == 3


def test_convex_bends_toward_schedule_min_and_concave_toward_schedule_max() -> None:
    linear, convex, concave = (
        noise_levels(5, 0.3, 0.55, s) for s in ("linear", "convex", "concave")
    )
    for depth in range(1, 4):  # the ends are min and max in every spacing
        assert convex[depth] < linear[depth] < concave[depth]
    assert convex[0] == linear[0] == concave[0] == 0.55
    assert convex[-1] == linear[-1] == concave[-1] == pytest.approx(0.3)


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
