"""Images as tensors and as files: conversions and the labelled grid figures are made of.

Images are float (N, 3, H, W) or (3, H, W) tensors in [0, 1]; 8-bit values are rounded half
to even, everywhere the same way.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from editflow.lazy import lazy

torch = lazy("torch")
F = lazy("torch.nn.functional")

LABEL_HEIGHT = 14
PADDING = 4


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] (any float dtype, any device) to uint8 values, rounded half to even."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def to_pil(image: torch.Tensor) -> Image.Image:
    """One (3, H, W) image in [0, 1] to an 8-bit RGB PIL image (round half to even)."""
    array = to_uint8(image)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy(), "RGB")


def from_pil(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image to a (1, 3, H, W) float tensor in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1).unsqueeze(0)


MARK_COLOUR = (0, 160, 60)  # the frame around a marked tile (a ranking's best)


def image_grid(
    tiles: list[torch.Tensor],
    labels: list[str],
    columns: int,
    tile_size: int | None = None,
    marked: int | None = None,
) -> torch.Tensor:
    """Arrange images in a grid with a caption under each.

    Args:
        tiles: Images, each (3, H, W) in [0, 1]; resized (bilinear) to the first's size or to
            ``tile_size`` (the longer side) when given.
        labels: One caption per tile ('' for none).
        columns: Tiles per row.
        tile_size: Optional display size of the longer side of every tile.
        marked: Optional index of a tile to frame (in the padding around it).

    Returns:
        (1, 3, H_grid, W_grid) in [0, 1].
    """
    height, width = tiles[0].shape[-2:]
    if tile_size is not None:
        scale = tile_size / max(height, width)
        height, width = round(height * scale), round(width * scale)
    resized = [
        F.interpolate(tile[None].float(), size=(height, width), mode="bilinear")[0]
        if tile.shape[-2:] != (height, width)
        else tile.float()
        for tile in tiles
    ]
    rows = -(-len(resized) // columns)
    cell_h, cell_w = height + LABEL_HEIGHT + PADDING, width + PADDING
    canvas = Image.new("RGB", (columns * cell_w + PADDING, rows * cell_h + PADDING), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=10)
    for index, (tile, label) in enumerate(zip(resized, labels, strict=True)):
        row, column = divmod(index, columns)
        left, top = PADDING + column * cell_w, PADDING + row * cell_h
        canvas.paste(to_pil(tile), (left, top))
        draw.text((left, top + height + 1), label, fill="black", font=font)
        if index == marked:
            frame = (left - 3, top - 3, left + width + 2, top + height + 2)
            draw.rectangle(frame, outline=MARK_COLOUR, width=2)
    return from_pil(canvas)
