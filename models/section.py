"""The recipe's ``[model]`` table: which models provide the components stages declare.

It lives here, not in the engine, because each field is a provider of components
(:mod:`editflow.models.providers`): a new kind of part adds its field here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from editflow.documents import Table
from editflow.errors import EditflowError

if TYPE_CHECKING:
    import torch

DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-base"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
# Stable Diffusion 1.5's OpenPose ControlNet (Zhang et al. 2023).
DEFAULT_CONTROLNET = "lllyasviel/sd-controlnet-openpose"


class ModelSection(Table):
    """Which diffusion model (and helper models) the stages use, and in which dtype."""

    id: str = Field("tiny", description="'tiny', a hub id, or a folder relative to the recipe")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit)")
    variant: str | None = Field(None, description="Weight variant, e.g. 'fp16'")
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
