"""OpenPose body keypoints: read them from OpenPose JSON and draw them as a pose image.

The pose image follows the drawing ControlNet's OpenPose model was trained on (Zhang et al.
2023; the ``draw_bodypose`` of lllyasviel/ControlNet): 18 COCO body points on black, limbs
as coloured strokes at 60% intensity, joints as full-colour dots, one colour per limb and
joint in OpenPose's order. Points with confidence 0 are missing and are not drawn.
"""

from __future__ import annotations

import json
import math

from PIL import Image, ImageDraw

from editflow.lazy import lazy

torch = lazy("torch")

BODY_POINTS = 18  # OpenPose's COCO body model
# Limbs as pairs of point indices (OpenPose's COCO order: nose, neck, right arm, left arm,
# right leg, left leg, eyes, ears).
LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip
COLOURS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip


def read_openpose(data: bytes) -> torch.Tensor:
    """The first person's body points of an OpenPose JSON file as (18, 3): x and y as
    fractions of the image's width and height, and the confidence (0 = missing).

    Coordinates are pixels of a ``canvas_width`` x ``canvas_height`` image when the file
    gives its canvas (as pose editors write it), else already fractions in [0, 1].

    Raises:
        ValueError: The file is not OpenPose JSON; the message says what is wrong.
    """
    values, canvas = check_openpose(data)
    points = torch.tensor(values, dtype=torch.float32).view(BODY_POINTS, 3)
    if canvas is not None:
        points[:, 0] /= canvas[0]
        points[:, 1] /= canvas[1]
    return points


def check_openpose(data: bytes) -> tuple[list[float], tuple[float, float] | None]:
    """The first person's 54 numbers and the canvas (width, height) if the file gives one;
    plain Python, so validating a recipe imports no torch.

    Raises:
        ValueError: The file is not OpenPose JSON; the message says what is wrong.
    """
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"not JSON ({error})") from None
    except RecursionError:
        raise ValueError("not OpenPose JSON: nested too deeply") from None
    people = document.get("people") if isinstance(document, dict) else None
    if not isinstance(people, list) or not people or not isinstance(people[0], dict):
        raise ValueError('not OpenPose JSON: expected {"people": [{"pose_keypoints_2d": [...]}]}')
    values = people[0].get("pose_keypoints_2d")
    if not isinstance(values, list) or not all(
        isinstance(value, int | float) and not isinstance(value, bool) for value in values
    ):
        raise ValueError("not OpenPose JSON: people[0].pose_keypoints_2d must be a list of numbers")
    if len(values) != 3 * BODY_POINTS:
        raise ValueError(
            f"people[0].pose_keypoints_2d has {len(values)} numbers; OpenPose's body model has"
            f" {BODY_POINTS} points of (x, y, confidence), {3 * BODY_POINTS} numbers"
        )
    if not all(math.isfinite(value) for value in values):
        raise ValueError("people[0].pose_keypoints_2d holds NaN or infinity")
    if any(values[i + 2] < 0 for i in range(0, len(values), 3)):
        raise ValueError("a confidence is negative: confidences are 0 (missing) to 1")
    if any(value < 0 for i in range(0, len(values), 3) for value in values[i : i + 2]):
        raise ValueError("a coordinate is negative: points lie on the image")
    width, height = document.get("canvas_width"), document.get("canvas_height")
    if isinstance(width, int | float) and isinstance(height, int | float) and width > 0 < height:
        if not (math.isfinite(width) and math.isfinite(height)):
            raise ValueError("canvas_width and canvas_height must be finite")
        outside = [
            values[i : i + 2] for i in range(0, len(values), 3)
            if values[i + 2] > 0 and (values[i] > width or values[i + 1] > height)
        ]  # fmt: skip
        if outside:
            raise ValueError(
                f"the point {outside[0]} lies outside the {width:g} x {height:g} canvas"
            )
        return values, (width, height)
    seen = [values[i : i + 2] for i in range(0, len(values), 3) if values[i + 2] > 0]
    if any(coordinate > 1 for point in seen for coordinate in point):
        raise ValueError(
            "pixel coordinates need the image size: add canvas_width and canvas_height"
        )
    return values, None


def draw_pose(points: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Draw (18, 3) body points (fractions of the image, confidence) as a (3, H, W) pose
    image in [0, 1]; strokes scale with the image (4 px at 512 px)."""
    canvas = Image.new("RGB", (width, height), "black")
    draw = ImageDraw.Draw(canvas)
    stroke = max(1, round(4 * min(height, width) / 512))
    xy = [(float(x) * width, float(y) * height) for x, y, _ in points.tolist()]
    present = [float(confidence) > 0 for confidence in points[:, 2].tolist()]
    for (a, b), colour in zip(LIMBS, COLOURS, strict=False):
        if present[a] and present[b]:
            dim = tuple(round(0.6 * channel) for channel in colour)
            draw.line([xy[a], xy[b]], fill=dim, width=2 * stroke)
    for (x, y), visible, colour in zip(xy, present, COLOURS, strict=True):
        if visible:
            draw.ellipse([x - stroke, y - stroke, x + stroke, y + stroke], fill=colour)
    pixels = torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8)
    return pixels.view(height, width, 3).permute(2, 0, 1).float() / 255
