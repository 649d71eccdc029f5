"""LPIPS, the learned perceptual distance (Zhang et al. 2018), as a model component.

The network is a convolutional backbone whose activations at a few layers ("taps") are
unit-normalised over channels, differenced between two images, squared, weighted per
channel by a learned 1x1 convolution (one per tap, non-negative weights), averaged over
space and summed over taps (the paper's Eq. 1). The backbones are written as layer lists
whose indices are torchvision's ``features`` indices, so real weights keep their names.

A saved network is one folder (what ``model.lpips`` names, locally or on the Hub)::

    config.json        {"_class_name": "LpipsNetwork", "backbone": "alexnet"}
    model.safetensors  features.{i}.weight / features.{i}.bias  (the backbone's convolutions,
                       torchvision's names: alexnet().features.state_dict())
                       lin.{k}.weight  (1, C_k, 1, 1)  (the lpips package's lin{k}.model.1.weight)

``backbone`` is one of :data:`BACKBONES` (``alexnet``, ``vgg16``; ``tiny`` is the built-in
random one for tests). docs/metrics.md shows how to convert the published weights.

This module imports torch: the provider table and the tiny builder import it only when a
network is loaded or built, so planning never pays for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from editflow.errors import ModelUnavailableError

if TYPE_CHECKING:
    from editflow.models.registry import ModelRegistry

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CLASS_NAME = "LpipsNetwork"

# A layer: ("conv", in, out, kernel, stride, padding), ("relu",) or ("maxpool", kernel, stride).
_ALEXNET = (
    ("conv", 3, 64, 11, 4, 2), ("relu",), ("maxpool", 3, 2),
    ("conv", 64, 192, 5, 1, 2), ("relu",), ("maxpool", 3, 2),
    ("conv", 192, 384, 3, 1, 1), ("relu",),
    ("conv", 384, 256, 3, 1, 1), ("relu",),
    ("conv", 256, 256, 3, 1, 1), ("relu",),
)  # fmt: skip


def _vgg16() -> tuple[tuple[Any, ...], ...]:
    layers: list[tuple[Any, ...]] = []
    channels = 3
    for block, (width, convs) in enumerate(((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))):
        if block:
            layers.append(("maxpool", 2, 2))
        for _ in range(convs):
            layers += [("conv", channels, width, 3, 1, 1), ("relu",)]
            channels = width
    return tuple(layers)


# Backbone -> (layers, the indices whose outputs LPIPS compares): LPIPS's own taps, relu1-5
# of AlexNet and relu{1_2, 2_2, 3_3, 4_3, 5_3} of VGG-16.
BACKBONES: dict[str, tuple[tuple[tuple[Any, ...], ...], tuple[int, ...]]] = {
    "alexnet": (_ALEXNET, (1, 4, 7, 9, 11)),
    "vgg16": (_vgg16(), (3, 8, 15, 22, 29)),
    "tiny": (
        (
            ("conv", 3, 8, 3, 1, 1),
            ("relu",),
            ("maxpool", 2, 2),
            ("conv", 8, 16, 3, 1, 1),
            ("relu",),
            ("maxpool", 2, 2),
            ("conv", 16, 16, 3, 1, 1),
            ("relu",),
        ),  # fmt: skip
        (1, 4, 7),
    ),
}
# The lpips package's input scaling (ScalingLayer), for images in [-1, 1].
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10  # lpips.normalize_tensor's


def tap_channels(backbone: str) -> list[int]:
    """The channel count at each tap of a backbone."""
    layers, taps = BACKBONES[backbone]
    channels, found = 3, []
    for index, layer in enumerate(layers):
        if layer[0] == "conv":
            channels = layer[2]
        if index in taps:
            found.append(channels)
    return found


def _layer(spec: tuple[Any, ...]) -> torch.nn.Module:
    if spec[0] == "conv":
        _, c_in, c_out, kernel, stride, padding = spec
        return torch.nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding)
    if spec[0] == "relu":
        return torch.nn.ReLU()
    return torch.nn.MaxPool2d(spec[1], stride=spec[2])


class LpipsNetwork(torch.nn.Module):
    """LPIPS: a backbone, its taps, and one non-negative linear head per tap.

    Args:
        backbone: A name in :data:`BACKBONES`.
    """

    def __init__(self, backbone: str) -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"unknown LPIPS backbone {backbone!r}; known: {sorted(BACKBONES)}")
        self.backbone = backbone
        layers, self.taps = BACKBONES[backbone]
        self.features = torch.nn.Sequential(*(_layer(spec) for spec in layers))
        self.lin = torch.nn.ModuleList(
            torch.nn.Conv2d(channels, 1, 1, bias=False) for channels in tap_channels(backbone)
        )
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)

    def activations(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's outputs at each tap for images in [0, 1], (N, 3, H, W)."""
        x = ((images * 2 - 1) - self.shift) / self.scale
        found = []
        for index, layer in enumerate(self.features[: max(self.taps) + 1]):
            x = layer(x)
            if index in self.taps:
                found.append(x)
        return found

    def forward(self, images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """LPIPS distance per image pair (Zhang et al. 2018, Eq. 1).

        Args:
            images: (N, 3, H, W) in [0, 1].
            reference: (N, 3, H, W) in [0, 1].

        Returns:
            (N,) distances.
        """
        total = 0
        pairs = zip(self.activations(images), self.activations(reference), strict=True)
        for head, (a, b) in zip(self.lin, pairs, strict=True):
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + EPS)
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + EPS)
            total = total + head((a - b).pow(2)).mean((1, 2, 3))
        return total

    def save_pretrained(self, folder: Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` (the layout in the module doc)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"_class_name": CLASS_NAME, "backbone": self.backbone}
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        state = {name: value.contiguous() for name, value in self.state_dict().items()}
        save_file(state, folder / WEIGHTS_FILE)

    @classmethod
    def from_pretrained(cls, folder: Path) -> LpipsNetwork:
        """Load a saved network; every weight must be there and none may be left over.

        Raises:
            ValueError: The config or the weights do not describe a network of this class.
            OSError: A file is missing or unreadable.
        """
        from safetensors.torch import load_file

        folder = Path(folder)
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        if config.get("_class_name", CLASS_NAME) != CLASS_NAME:
            raise ValueError(f"{CONFIG_FILE} names class {config['_class_name']!r}")
        network = cls(str(config.get("backbone")))
        state = load_file(folder / WEIGHTS_FILE)
        expected = network.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        wrong = [
            name for name in expected if name in state and state[name].shape != expected[name].shape
        ]
        if missing or unexpected or wrong:
            raise ValueError(
                f"{WEIGHTS_FILE} does not fit backbone '{network.backbone}':"
                f" missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes {wrong[:3]}"
            )
        network.load_state_dict(state)
        return network


def load_lpips(registry: ModelRegistry, component: str) -> LpipsNetwork:
    """The provider's loader: the network in float32 (metrics do not follow the recipe's
    compute dtype), on the run's device, in eval mode without gradients."""
    resolved = registry.resolved
    try:
        network = LpipsNetwork.from_pretrained(registry.folder)
    except (OSError, ValueError, json.JSONDecodeError) as error:
        raise ModelUnavailableError(
            f"lpips '{resolved.spec.id}' cannot be loaded: {str(error).splitlines()[0]}",
            key=resolved.provider,
            hint="a folder with config.json and model.safetensors, as docs/metrics.md shows",
        ) from None
    return network.to(registry.device, torch.float32).eval().requires_grad_(False)
