"""DiffusionCLIP fine-tuning: editflow's loop against a plain torch loop, and memory by mode.

On ``tiny-pixel`` at 64 px with tiny's CLIP: two training images inverted to t0 = 400,
S_gen = 6, the directional CLIP loss times 3.

1. Step time: :func:`editflow.stages.diffusionclip.finetuning.finetune` against a plain loop
   written as one writes it with diffusers (``UNet2DModel`` calls, the DDIM update, Adam),
   doing the same steps on the same data, in ``full`` mode without checkpointing and in
   ``light`` mode (target >= 0.95x the plain loop's steps per second). ABBA pairs
   (``harness.compare``): wall and CPU time, memory growth, ratios per pair.
2. Peak memory growth of one epoch: ``full`` with checkpointing (repeated alone), ``full``
   without and ``light`` (from the comparisons): CUDA's allocator on a GPU; on a CPU
   resident memory, freed heap handed back and the kernel's peak mark reset before each.

    python bench/bench_diffusionclip.py [--pairs 5] [--size 64]

Writes bench/results/bench_diffusionclip.json.
"""

from __future__ import annotations

from quiet import quiet

quiet()  # before diffusers and transformers are imported

import argparse
import copy

import torch
from diffusers import DDIMScheduler, UNet2DModel
from harness import (
    command_line,
    compare,
    format_comparison,
    format_series,
    measure,
    series,
    write_results,
)
from support import models_dir
from transformers import CLIPModel, CLIPProcessor

from editflow.models.tiny import ensure_tiny
from editflow.stages.ddim_loops import ddim_invert
from editflow.stages.diffusion import unet_noise_predictor
from editflow.stages.diffusionclip.finetuning import (
    directional_clip_loss,
    finetune,
    image_features,
    text_direction,
)
from editflow.stages.grid_scheduler import GridScheduler, t0_grid


def setup(size: int):
    folder = ensure_tiny(models_dir(), "tiny-pixel")
    unet = UNet2DModel.from_pretrained(folder / "unet").eval().requires_grad_(False)
    alphas = DDIMScheduler.from_pretrained(folder / "scheduler").alphas_cumprod
    clip_folder = ensure_tiny(models_dir()) / "clip"
    clip = CLIPModel.from_pretrained(clip_folder).eval().requires_grad_(False)
    processor = CLIPProcessor.from_pretrained(clip_folder)
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    inversion = GridScheduler(alphas, t0_grid(400, 10), inverse=True)
    x_t0, _ = ddim_invert(unet_noise_predictor(unet), images, inversion, None)
    direction = text_direction(clip, processor, "photo", "sketch")
    sources = image_features(clip, processor, images)

    def loss(x0: torch.Tensor, index: int) -> torch.Tensor:
        return 3 * directional_clip_loss(clip, processor, x0, sources[index : index + 1], direction)

    return unet, alphas, x_t0, loss


def editflow_loop(unet, alphas, x_t0, loss, mode: str, checkpointing: bool) -> None:
    tuned = copy.deepcopy(unet).requires_grad_(True)
    finetune(
        unet_noise_predictor(tuned), list(tuned.parameters()), x_t0,
        GridScheduler(alphas, t0_grid(400, 6)), loss,
        epochs=1, learning_rate=4e-6, mode=mode, checkpointing=checkpointing,
    )  # fmt: skip


def plain_loop(unet, alphas, x_t0, loss, mode: str) -> None:
    tuned = copy.deepcopy(unet).requires_grad_(True)
    optimizer = torch.optim.Adam(tuned.parameters(), lr=4e-6)
    grid = t0_grid(400, 6)
    pairs = list(zip(reversed(grid), reversed([-1, *grid[:-1]]), strict=True))
    for index in range(len(x_t0)):
        x = x_t0[index : index + 1]
        for t, t_next in pairs:
            a_t = alphas[t]
            a_next = alphas[t_next] if t_next >= 0 else torch.tensor(1.0)
            eps = tuned(x, torch.tensor(t)).sample
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            x_next = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
            if mode == "light":
                optimizer.zero_grad()
                loss(x0, index).backward()
                optimizer.step()
                x_next = x_next.detach()
            x = x_next
        if mode == "full":
            optimizer.zero_grad()
            loss(x, index).backward()
            optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    unet, alphas, x_t0, loss = setup(args.size)
    what = f"tiny-pixel, {args.size} px, 2 images, S_gen = 6, one epoch"
    print(f"{what} (target: plain loop time / editflow time >= 0.95):")
    results: dict = {"what": what}
    for mode in ("full", "light"):
        result = compare(
            "plain torch loop",
            lambda mode=mode: measure(lambda: plain_loop(unet, alphas, x_t0, loss, mode)),
            f"editflow {mode}",
            lambda mode=mode: measure(
                lambda: editflow_loop(unet, alphas, x_t0, loss, mode, False)
            ),
            pairs=args.pairs,
        )  # fmt: skip
        results[mode] = result
        print(f"  {mode} (no checkpointing):")
        print(format_comparison(result))
    checkpointed = series(
        "editflow full, checkpointed",
        lambda: measure(lambda: editflow_loop(unet, alphas, x_t0, loss, "full", True)),
        repeats=args.pairs,
    )  # fmt: skip
    results["full checkpointed"] = checkpointed
    print("  memory of one epoch with checkpointing:")
    print(format_series(checkpointed))
    print(write_results("bench_diffusionclip", results, command=command_line()))


if __name__ == "__main__":
    main()
