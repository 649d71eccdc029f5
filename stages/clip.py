"""CLIP as the methods use it: ranking scores and projected features (Radford et al. 2021).

Shared by ``rank.clip``, image interpolation's candidate ranking and DiffusionCLIP's loss.
"""

from __future__ import annotations

from typing import Any

from editflow.lazy import lazy, no_grad
from editflow.stages.images import to_uint8

torch = lazy("torch")
F = lazy("torch.nn.functional")


@no_grad
def clip_scores(
    model: Any, processor: Any, images: torch.Tensor, positive: str, negative: str = ""
) -> torch.Tensor:
    """CLIP ranking score ``cos(image, positive) - cos(image, negative)`` per image.

    Args:
        model: A transformers ``CLIPModel``.
        processor: Its ``CLIPProcessor`` (resize, centre crop, normalise; tokenizer).
        images: (N, 3, H, W) in [0, 1].
        positive: The prompt images should match.
        negative: The prompt they should not.

    Returns:
        (N,) float32 scores on the CPU.
    """
    pixels = to_uint8(images)
    arrays = [image.permute(1, 2, 0).cpu().numpy() for image in pixels]
    batch = processor(images=arrays, text=[positive, negative], padding=True, return_tensors="pt")
    device = next(model.parameters()).device
    image_features = model.get_image_features(
        pixel_values=batch["pixel_values"].to(device, model.dtype)
    )
    text_features = model.get_text_features(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
    )
    image_features = projected(image_features)
    text_features = projected(text_features)
    cosine = (
        F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).T
    )
    return (cosine[:, 0] - cosine[:, 1]).cpu()


def projected(output: Any) -> torch.Tensor:
    """The projected embeddings of a CLIP ``get_*_features`` call."""
    # transformers 5 returns a model output with the projected embeddings in pooler_output.
    return output if isinstance(output, torch.Tensor) else output.pooler_output
