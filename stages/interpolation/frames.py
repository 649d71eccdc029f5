"""Image interpolation (Wang & Golland 2023), as plain functions over tensors.

The frame tree, the noise level of each tree depth, the candidate counts, spherical
interpolation of latents and text embeddings, the ControlNet strength along the sequence,
the interpolation of OpenPose keypoints, and :func:`interpolate_frames`, the branching
denoise-interpolate-denoise that the ``sample.interpolate`` stage runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

from editflow.lazy import lazy, no_grad
from editflow.stages.diffusion import NoisePredictor, cpu_randn, guided_noise

torch = lazy("torch")

Spacing = Literal["linear", "convex", "concave"]
# How slerp treats the norms (see :func:`slerp`).
SlerpForm = Literal["unit-direction", "raw"]
# How a schedule fraction times the step count becomes whole steps (see :func:`level_steps`).
Rounding = Literal["half-even", "half-up"]


def slerp(
    a: torch.Tensor,
    b: torch.Tensor,
    weight: float,
    eps: float = 1e-4,
    form: SlerpForm = "unit-direction",
) -> torch.Tensor:
    """Spherical interpolation per item of a batch: ``weight`` 0 gives ``a``, 1 gives ``b``.

    Each item (everything after the first dimension) is one vector: a latent's channels and
    pixels together, a text embedding's tokens together. Computed in float64.

    - ``"unit-direction"``: the directions move along their great circle and the norm
      interpolates the two norms linearly, so unit vectors stay unit vectors.
    - ``"raw"``: Shoemake's slerp of the vectors themselves (what the authors' released
      code computes), ``sin((1 - w) theta) / sin(theta) * a + sin(w theta) / sin(theta) * b``
      with ``cos(theta) = <a, b> / (|a| |b|)``. It equals the other form when the norms are
      equal; otherwise its norm is not the linear one: at w = 0.5 its square is
      ``((|a| + |b|) / 2)^2 + (tan(theta / 2) (|a| - |b|) / 2)^2``, larger.

    Nearly parallel vectors (``|sin(theta)| < eps``) fall back to linear interpolation in
    either form, where the great circle is numerically undefined.

    Args:
        a: (N, ...) the items at ``weight`` 0.
        b: (N, ...) the items at ``weight`` 1.
        weight: Where between them, in [0, 1].
        eps: Below this ``|sin(theta)|`` the interpolation is linear.
        form: ``"unit-direction"`` or ``"raw"``, as above.
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
    if form == "raw":
        mixed = torch.sin((1 - weight) * theta) * flat_a + torch.sin(weight * theta) * flat_b
        mixed = torch.where(parallel, (1 - weight) * flat_a + weight * flat_b, mixed / safe)
        return mixed.view(a.shape).to(a.dtype)
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

    Depth 1 gets ``schedule_max``, the last depth ``schedule_min``; between them
    ``min + (max - min) * shape(x)`` with x going evenly from 1 at depth 1 to 0 at the last
    depth: ``linear`` shape(x) = x, ``convex`` x^2, which bends the middle depths toward
    ``schedule_min`` (less noise), ``concave`` sqrt(x), which bends them toward
    ``schedule_max`` (more noise). The authors' ``get_step_schedule`` bends the same way.
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


Variant = Literal["plain", "quality"]
# Scores candidate latents (N, C, h, w) -> (N,): decode and CLIP in the stage.
Scorer = Callable[..., "torch.Tensor"]


def level_steps(fraction: float, num_steps: int, rounding: Rounding = "half-even") -> int:
    """How many of the schedule's ``num_steps`` DDIM steps lie below a noise level given as
    a fraction of the schedule: ``fraction * num_steps`` rounded, kept in [1, num_steps].

    The steps taken are the schedule's last ones, so a frame at this level is noised to, and
    denoised from, its timestep ``(k - 1) * (T // num_steps)`` plus the scheduler's
    ``steps_offset`` (k the count returned, T the training steps, diffusers' ``leading``
    spacing): one stride below ``fraction * T``. 0.55 of 20 steps on Stable Diffusion's
    schedule is 11 steps from timestep 501.

    Args:
        fraction: The noise level, a fraction of the schedule.
        num_steps: The schedule's DDIM steps.
        rounding: For a product exactly halfway between two counts: ``"half-even"`` takes
            the even one (Python's ``round``; 8.5 -> 8, 9.5 -> 10), ``"half-up"`` the larger
            one (``floor(x + 0.5)``; 8.5 -> 9). Others round to the nearest either way.
    """
    product = fraction * num_steps
    if rounding == "half-up":
        whole = math.floor(product)
        # product - whole is exact for doubles, where floor(product + 0.5) can round up.
        steps = whole + (1 if product - whole >= 0.5 else 0)
    else:
        steps = round(product)
    return max(1, min(num_steps, steps))


@no_grad
def denoise(
    predict: NoisePredictor,
    x: torch.Tensor,
    scheduler: Any,
    timesteps: Sequence[torch.Tensor],
    cond: torch.Tensor | None,
    uncond: torch.Tensor | None,
    guidance_scale: float,
) -> torch.Tensor:
    """Deterministic DDIM steps (eta 0) with CFG over ``timesteps``, a slice of the
    scheduler's own schedule (``set_timesteps`` called), from the level of the first.
    Without ``uncond`` there is no CFG; an unconditional model takes ``cond = None``."""
    for t in timesteps:
        model_input = scheduler.scale_model_input(x, t)
        output = guided_noise(predict, model_input, t, cond, uncond, guidance_scale)
        x = scheduler.step(output, t, x).prev_sample
    return x


@no_grad
def interpolate_frames(
    predictor: Callable[[int], NoisePredictor],
    ends: torch.Tensor,
    scheduler: Any,
    cond_ends: torch.Tensor | None,
    negative: torch.Tensor | None,
    *,
    levels: int,
    fractions: Sequence[float],
    variant: Variant,
    candidates: Sequence[int],
    guidance_scale: float,
    generator: Callable[[int], torch.Generator],
    score: Scorer | None = None,
    batch_size: int | None = None,
    progress: Callable[[int, int], None] = lambda step, total: None,
    slerp_form: SlerpForm = "unit-direction",
    rounding: Rounding = "half-even",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Branching denoise-interpolate-denoise (Wang & Golland 2023, METHODS.md section 4).

    Frames fill the tree of :func:`frame_tree` coarse to fine. A new frame comes from its
    two neighbours: both are brought to the depth's noise level with ONE noise draw shared
    between them, slerped at 0.5, and denoised with the text embedding slerped at the
    frame's position in the sequence. Each latent and each text embedding is slerped as one
    vector (:func:`slerp`, ``slerp_form``). A depth's fraction f of the schedule becomes
    :func:`level_steps` (f, n, ``rounding``) DDIM steps, the schedule's last ones.

    - ``quality`` (the authors' scripts): neighbours are clean frames, noised to the level;
      each candidate (its own draw) is denoised to 0 and ``score`` keeps the best. All
      candidates go through the UNet together, ``batch_size`` at a time.
    - ``plain``: one candidate, no ranking. A new frame is denoised only to the next
      depth's level and kept there: at that depth it is a neighbour as it is, an input is
      noised with the new frame's draw, and an older frame is first denoised further along
      its own deterministic path. The frames not yet clean are denoised to 0 at the end.

    Args:
        predictor: Frame index -> the noise predictor for that frame (a ControlNet's pose
            differs per frame).
        ends: (2, C, h, w) clean latents of the two inputs: frames 0 and ``2**levels``.
        scheduler: A ``DDIMScheduler`` from the model's config, ``set_timesteps`` called.
        cond_ends: (2, tokens, D) the text embedding of each input; ``None`` for an
            unconditional model (no text, no CFG).
        negative: (1, tokens, D) the negative embedding (CFG), or ``None``.
        levels: L; there are ``2**L + 1`` frames.
        fractions: Noise level per depth as a fraction of the schedule (coarsest first).
        variant: ``"quality"`` or ``"plain"``.
        candidates: Candidates per new frame at each depth (``quality``).
        guidance_scale: CFG scale.
        generator: Frame index -> the CPU generator its noise is drawn from.
        score: Candidate latents -> scores (``quality``).
        batch_size: Candidates per UNet batch (``None``: all at once).
        progress: Called with (new frames done, new frames in all).
        slerp_form: How latents and text are slerped (:func:`slerp`).
        rounding: How a fraction of the steps is rounded (:func:`level_steps`).

    Returns:
        The (2**L + 1, C, h, w) clean frames and the (2**L + 1,) score of each frame's
        chosen candidate (NaN where nothing was ranked: the inputs, and ``plain``).
    """
    last = 2**levels
    timesteps = list(scheduler.timesteps)
    starts = [
        len(timesteps) - level_steps(fraction, len(timesteps), rounding) for fraction in fractions
    ]
    frames: dict[int, torch.Tensor] = {0: ends[:1], last: ends[1:]}
    at_step = {0: len(timesteps), last: len(timesteps)}  # where each frame's latent is
    scores = torch.full((last + 1,), float("nan"))
    total, done = last - 1, 0

    def text(frame: int, count: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if cond_ends is None:  # an unconditional model: its predictor takes no text
            return None, None
        cond = slerp(cond_ends[:1], cond_ends[1:], frame / last, form=slerp_form)
        uncond = negative.expand(count, -1, -1) if negative is not None else None
        return cond.expand(count, -1, -1), uncond

    def rows(embeds: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
        return embeds[start:stop] if embeds is not None else None

    def advance(frame: int, to_step: int) -> torch.Tensor:
        """A generated frame's latent denoised along its own path to ``to_step``."""
        if at_step[frame] < to_step:
            cond, uncond = text(frame, 1)
            frames[frame] = denoise(
                predictor(frame), frames[frame], scheduler,
                timesteps[at_step[frame] : to_step], cond, uncond, guidance_scale,
            )  # fmt: skip
            at_step[frame] = to_step
        return frames[frame]

    for depth, new_frames in enumerate(frame_tree(levels)):
        start = starts[depth]
        t = timesteps[start] if start < len(timesteps) else timesteps[-1]
        count = candidates[depth] if variant == "quality" else 1
        for frame, left, right in new_frames:
            noise = cpu_randn((count, *ends.shape[1:]), generator(frame), like=ends)
            if variant == "quality":
                pair = [scheduler.add_noise(frames[side].expand(count, -1, -1, -1), noise, t)
                        for side in (left, right)]  # fmt: skip
            else:
                pair = [
                    scheduler.add_noise(frames[side], noise, t)
                    if side in (0, last)
                    else advance(side, start)
                    for side in (left, right)
                ]
            mixed = slerp(pair[0], pair[1], 0.5, form=slerp_form)
            if variant == "quality":
                chunk = batch_size or count
                cond, uncond = text(frame, count)
                clean = torch.cat([
                    denoise(predictor(frame), mixed[i : i + chunk], scheduler, timesteps[start:],
                            rows(cond, i, i + chunk), rows(uncond, i, i + chunk), guidance_scale)
                    for i in range(0, count, chunk)
                ])  # fmt: skip
                ranked = score(clean) if score is not None else torch.zeros(count)
                best = int(ranked.argmax())
                frames[frame], at_step[frame] = clean[best : best + 1], len(timesteps)
                scores[frame] = float(ranked[best])
            else:
                frames[frame], at_step[frame] = mixed, start
                following = starts[depth + 1] if depth + 1 < levels else len(timesteps)
                advance(frame, following)
            done += 1
            progress(done, total)
    for frame in frames:
        advance(frame, len(timesteps))
    return torch.cat([frames[frame] for frame in range(last + 1)]), scores
