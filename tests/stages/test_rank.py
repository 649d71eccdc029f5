"""rank.clip: CLIP scores against a hand computation with transformers, the arg-max kept."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPModel, CLIPProcessor

from editflow.models import ModelRegistry, ModelSection, resolve_providers
from editflow.models.specs import CLIP
from editflow.stages.base import StageContext
from editflow.stages.io.rank import RankClip, RankClipParams


def test_clip_scores_equal_a_hand_computation_and_the_best_is_the_arg_max(
    tiny_folder: Path, models_dir: Path
) -> None:
    generator = torch.Generator().manual_seed(0)
    images = [
        torch.rand(2, 3, 48, 64, generator=generator),
        torch.rand(1, 3, 48, 64, generator=generator),
    ]
    resolved = resolve_providers(
        ModelSection(), ["model.clip"], base_dir=models_dir, models_dir=models_dir
    )["model.clip"]
    registry = ModelRegistry(
        resolved, device=torch.device("cpu"), dtype=torch.float32, models_dir=models_dir
    )

    class View:
        def get(self, name: str):
            assert name == CLIP.name
            return registry.get(name)

    ctx = StageContext("best", 0, torch.device("cpu"), torch.float32, models=View())
    params = RankClipParams(positive_prompt="a photo of a dog", negative_prompt="a photo of a cat")
    out = RankClip().call(ctx, params, {"images": images})

    model = CLIPModel.from_pretrained(tiny_folder / "clip").eval()
    processor = CLIPProcessor.from_pretrained(tiny_folder / "clip")
    batch = torch.cat(images)
    pixels = [(image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy() for image in batch]
    inputs = processor(
        images=pixels, text=["a photo of a dog", "a photo of a cat"], padding=True,
        return_tensors="pt",
    )  # fmt: skip
    with torch.no_grad():
        outputs = model(**inputs)
    image = outputs.image_embeds / outputs.image_embeds.norm(dim=-1, keepdim=True)
    text = outputs.text_embeds / outputs.text_embeds.norm(dim=-1, keepdim=True)
    expected = (image @ text.T)[:, 0] - (image @ text.T)[:, 1]
    torch.testing.assert_close(out["scores"], expected, rtol=1e-5, atol=1e-6)
    assert out["scores"].shape == (3,)
    assert torch.equal(out["best"], batch[int(expected.argmax())][None])
