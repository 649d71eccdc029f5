"""DiffusionCLIP (Kim, Kwon, Ye 2022) as plain functions: the directional CLIP loss and the
two fine-tuning loops.

The time grid (METHODS.md's ``linspace(0, 1, n) * t0`` truncated to integers, as the released
code builds it) and DDIM along it are :mod:`editflow.stages.grid_scheduler`: inversion and
generation run it through the common loops of :mod:`editflow.stages.ddim_loops`, and
fine-tuning steps its generation chain with :meth:`GridScheduler.transition`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

from editflow.lazy import lazy, no_grad
from editflow.stages.clip import projected
from editflow.stages.diffusion import NoisePredictor
from editflow.stages.diffusionclip.templates import EDITFLOW_16
from editflow.stages.grid_scheduler import GridScheduler

torch = lazy("torch")
F = lazy("torch.nn.functional")
checkpoint = lazy("torch.utils.checkpoint")

# The templates the directional loss averages each text's features over by default, as the
# released code averages over its set (:mod:`.templates`).
TEMPLATES = EDITFLOW_16

Mode = Literal["full", "light"]


# ------------------------------------------------------------------------------------------
# The directional CLIP loss


def clip_pixels(processor: Any, images: torch.Tensor) -> torch.Tensor:
    """CLIP's preprocessing, differentiable: images in [-1, 1] resized (bicubic) so the
    shorter side is CLIP's size, centre-cropped, and normalised with CLIP's mean and std."""
    image_processor = processor.image_processor
    size = image_processor.size.get("shortest_edge") or image_processor.size["height"]
    crop = image_processor.crop_size
    x = (images + 1) / 2
    height, width = x.shape[-2:]
    scale = size / min(height, width)
    x = F.interpolate(
        x, size=(round(height * scale), round(width * scale)), mode="bicubic",
        align_corners=False, antialias=True,
    )  # fmt: skip
    top, left = (x.shape[-2] - crop["height"]) // 2, (x.shape[-1] - crop["width"]) // 2
    x = x[..., top : top + crop["height"], left : left + crop["width"]]
    mean = x.new_tensor(image_processor.image_mean).view(1, -1, 1, 1)
    std = x.new_tensor(image_processor.image_std).view(1, -1, 1, 1)
    return (x - mean) / std


# How the text direction is formed (``text_direction``):
# - "template-means" (editflow's default): each text's unit features averaged over the
#   templates and normalised, then the difference normalised;
# - "released": the released code's, the normalised mean over the templates of the
#   differences of unit features (cosine 0.9949 to the other with CLIP ViT-B/32).
TextDirection = Literal["template-means", "released"]
# What the directional loss trains (``clip_loss``), with c = cos(change, direction):
# - "direction" (editflow's default): L_dir = 1 - c, the paper's equation;
# - "log": the released code's -log((2 - L_dir) / 2) = -log((1 + c) / 2), whose gradient is
#   the paper's scaled by 2 / (2 - L_dir).
ClipLoss = Literal["direction", "log"]


def direction_from_features(
    source: torch.Tensor, target: torch.Tensor, form: TextDirection = "template-means"
) -> torch.Tensor:
    """The unit direction from (templates, D) source features to target features."""
    source, target = F.normalize(source.float(), dim=-1), F.normalize(target.float(), dim=-1)
    if form == "released":
        return F.normalize((target - source).mean(0), dim=0)
    mean_source = F.normalize(source.mean(0), dim=0)
    return F.normalize(F.normalize(target.mean(0), dim=0) - mean_source, dim=0)


def loss_of_cosine(cosine: torch.Tensor, form: ClipLoss = "direction") -> torch.Tensor:
    """The directional loss from ``cos(change, direction)``, averaged over the batch."""
    if form == "log":
        return (-torch.log((1 + cosine) / 2)).mean()
    return (1 - cosine).mean()


@no_grad
def text_direction(
    model: Any,
    processor: Any,
    source: str,
    target: str,
    form: TextDirection = "template-means",
    templates: Sequence[str] = TEMPLATES,
) -> torch.Tensor:
    """The unit CLIP text direction target - source over ``templates`` (each a format string
    with one ``{}``; :func:`direction_from_features`)."""

    def embed(text: str) -> torch.Tensor:
        prompts = [template.format(text) for template in templates]
        tokens = processor.tokenizer(prompts, padding=True, return_tensors="pt")
        device = next(model.parameters()).device
        features = projected(
            model.get_text_features(
                input_ids=tokens.input_ids.to(device),
                attention_mask=tokens.attention_mask.to(device),
            )
        )
        return features

    return direction_from_features(embed(source), embed(target), form)


def image_features(model: Any, processor: Any, images: torch.Tensor) -> torch.Tensor:
    """CLIP image features of images in [-1, 1], differentiable, unit length."""
    pixels = clip_pixels(processor, images.float()).to(model.dtype)
    return F.normalize(projected(model.get_image_features(pixel_values=pixels)).float(), dim=-1)


def directional_clip_loss(
    model: Any,
    processor: Any,
    generated: torch.Tensor,
    source_features: torch.Tensor,
    direction: torch.Tensor,
    form: ClipLoss = "direction",
) -> torch.Tensor:
    """``1 - cos(E(generated) - E(source), direction)`` (or its ``log`` form), averaged over
    the batch."""
    change = F.normalize(image_features(model, processor, generated) - source_features, dim=-1)
    return loss_of_cosine(change @ direction, form)


# ------------------------------------------------------------------------------------------
# Fine-tuning

Loss = Callable[..., "torch.Tensor"]  # (x0 estimate, image index) -> loss


def finetune(
    predict: NoisePredictor,
    parameters: Sequence[torch.nn.Parameter],
    inverted: torch.Tensor,
    scheduler: GridScheduler,
    loss: Loss,
    *,
    epochs: int,
    learning_rate: float,
    lr_growth: float = 1.3,
    mode: Mode = "full",
    checkpointing: bool = True,
    embeds: torch.Tensor | None = None,
    progress: Callable[[int, int], None] = lambda step, total: None,
) -> torch.Tensor:
    """DiffusionCLIP's fine-tuning of the parameters ``predict`` runs with (Adam, weight
    decay 0, the learning rate times ``lr_growth`` after each epoch).

    - ``full``: each training image's ``x_t0`` is generated down the grid WITH gradients
      through the chain (each step checkpointed, so only one step's activations are held),
      the loss is taken on the result, and the optimiser steps once per image.
    - ``light``: at every step of the chain the loss is taken on that step's ``x0_hat``
      and the optimiser steps at once; the chain itself carries no gradient.

    Args:
        predict: The noise predictor of the model being tuned (it uses ``parameters``).
        parameters: What is optimised.
        inverted: (N, C, H, W) the training images' ``x_t0``.
        scheduler: Generation down the time grid (``t0_grid(t0, S_gen)``), any prediction
            type; its steps are taken by index (:meth:`GridScheduler.transition`), so a
            checkpointed step recomputes exactly what it computed.
        loss: (x0 estimate (1, C, H, W), image index) -> scalar loss; for a latent model
            it decodes the estimate to pixels itself.
        epochs: Passes over the training images.
        learning_rate: Adam's learning rate in the first epoch.
        lr_growth: Factor applied to the learning rate after each epoch.
        mode: ``full`` or ``light``.
        checkpointing: Checkpoint each step of the ``full`` chain.
        embeds: (1, tokens, D) the text embedding a conditional (latent) denoiser is
            generated with; ``None`` for an unconditional (pixel-space) one.
        progress: Called with (optimiser steps done, in all).

    Returns:
        The loss of every optimiser step, in order.
    """
    optimizer = torch.optim.Adam(parameters, lr=learning_rate, weight_decay=0.0)
    steps = range(scheduler.num_inference_steps)
    per_image = 1 if mode == "full" else len(steps)
    total, losses = epochs * len(inverted) * per_image, []

    def step(x: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        # A pure function of (x, i): the timestep is a CPU scalar, as schedulers hand out.
        return scheduler.transition(i, predict(x, scheduler.timesteps[i], embeds), x)

    for _ in range(epochs):
        for index in range(len(inverted)):
            x = inverted[index : index + 1].detach()
            if mode == "full":
                for i in steps:
                    if checkpointing:
                        x, _ = checkpoint.checkpoint(step, x, i, use_reentrant=False)
                    else:
                        x, _ = step(x, i)
                losses.append(_optimise(optimizer, loss(x, index)))
            else:
                for i in steps:
                    x_next, x0_hat = step(x, i)
                    losses.append(_optimise(optimizer, loss(x0_hat, index)))
                    x = x_next.detach()
            progress(len(losses), total)
        for group in optimizer.param_groups:
            group["lr"] *= lr_growth
    return torch.stack(losses) if losses else torch.zeros(0)


def _optimise(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach().float().cpu()
