"""The recipe's ``[model]`` table: which models provide the components stages declare.

It lives here, not in the engine, because each field is a provider of components
(:mod:`editflow.models.providers`): a new kind of part adds its field here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from editflow.documents import Table
from editflow.errors import EditflowError
from editflow.models.embeddings import EmbeddingEntry
from editflow.models.lora import LoraEntry

if TYPE_CHECKING:
    import torch

DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-base"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
# Stable Diffusion 1.5's OpenPose ControlNet (Zhang et al. 2023).
DEFAULT_CONTROLNET = "lllyasviel/sd-controlnet-openpose"


_PATH_FIELDS = ("id", "config", "clip", "controlnet", "captioner", "lpips")


class ModelSection(Table):
    """Which diffusion model (and helper models) the stages use, and in which dtype."""

    id: str = Field(
        "tiny",
        description="'tiny', a hub id, or a folder or single-file checkpoint (.safetensors,"
        " .ckpt) relative to the recipe",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit)")
    variant: str | None = Field(None, description="Weight variant, e.g. 'fp16'")
    config: str | None = Field(
        None,
        description="For a single-file checkpoint in model.id: the diffusers configs that"
        " describe it, a folder relative to the recipe or a hub id in the local cache",
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="Compute dtype (float16/bfloat16 are meant for GPUs)"
    )
    compile: bool = Field(
        False,
        description="torch.compile the denoiser in channels-last memory (for GPUs; recorded"
        " in cache keys, whose results it may change in the last bits)",
    )
    clip: str = Field(
        DEFAULT_CLIP,
        description="CLIP for scoring stages: hub id or folder ('tiny' has its own built in)",
    )
    controlnet: str = Field(
        DEFAULT_CONTROLNET,
        description="ControlNet for pose-guided stages: hub id or folder ('tiny' has its own)",
    )
    captioner: str = Field(
        DEFAULT_CAPTIONER,
        description="BLIP for caption stages: hub id or folder ('tiny' has its own built in)",
    )
    lpips: str | None = Field(
        None,
        description="LPIPS network for metric.lpips: a folder (config.json, model.safetensors;"
        " docs/metrics.md) or hub id; 'tiny' is a built-in random one, the default with a"
        " built-in model.id",
    )
    lora: tuple[LoraEntry, ...] = Field(
        (), description="LoRA files fused into model.id's UNet and text encoder, in order"
    )
    embedding: tuple[EmbeddingEntry, ...] = Field(
        (), description="Textual-inversion embeddings whose tokens prompts may use"
    )

    def paths_outside(self, base_dir: Path) -> list[tuple[str, str]]:
        """``(key, value)`` of each model path that reaches outside ``base_dir``: absolute,
        through ``..``, or resolving (links followed) to a file or folder elsewhere. A recipe
        a figure or a lock carries is confined to its folder; a hub id names no local path."""
        named = [(name, getattr(self, name)) for name in _PATH_FIELDS]
        named += [(f"lora[{i}].path", entry.path) for i, entry in enumerate(self.lora)]
        named += [(f"embedding[{i}].path", entry.path) for i, entry in enumerate(self.embedding)]
        base = base_dir.resolve()
        outside = []
        for name, value in named:
            if not value:
                continue
            path = Path(value)
            local = base_dir / path
            if (
                path.is_absolute()
                or ".." in path.parts
                or (local.exists() and not local.resolve().is_relative_to(base))
            ):
                outside.append((f"model.{name}", value))
        return outside

    @property
    def torch_dtype(self) -> torch.dtype:
        """``dtype`` as a torch dtype."""
        import torch

        return getattr(torch, self.dtype)


def resolve_device(name: str) -> torch.device:
    """Where models run: ``auto`` picks CUDA when available, else the CPU (``--device``)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise EditflowError(f"unknown device {name!r}", file="--device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EditflowError("CUDA is not available on this machine", file="--device")
    return device
