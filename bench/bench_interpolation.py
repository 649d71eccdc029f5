"""Interpolation candidates through the UNet as one batch against one at a time.

The first level of ``sample.interpolate`` (quality variant): 8 candidates for the middle
frame, each noised to 0.55 of a 50-step DDIM schedule and denoised to 0 with CFG, on the
tiny model at 64 px (8x8 latents). ``batch_size=None`` sends all candidates through the
UNet together, ``batch_size=1`` one after the other; the frames are the same (a test checks
1e-5). The two alternate ABBA in one process (``harness.compare``): wall and CPU time and
the peak memory growth of each call (CUDA's allocator on a GPU; on a CPU resident memory,
freed heap handed back and the kernel's peak mark reset before each call). Target: batched
<= 0.6x the time of one at a time.

    python bench/bench_interpolation.py [--candidates 8] [--pairs 5] [--size 64]

Writes bench/results/bench_interpolation.json (bench_interpolation-SIZE.json for another
``--size``).
"""

from __future__ import annotations

from quiet import quiet

quiet()  # before diffusers and transformers are imported

import argparse

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from harness import command_line, compare, format_comparison, measure, write_results
from support import models_dir
from transformers import CLIPTextModel, CLIPTokenizer

from editflow.models.tiny import ensure_tiny
from editflow.stages.diffusion import encode_prompts, unet_noise_predictor
from editflow.stages.interpolation.frames import interpolate_frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    folder = ensure_tiny(models_dir())
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval().to(device)
    unet.requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").to(device)
    embeds = encode_prompts(tokenizer, text_encoder, ["a photo of a cat", "a photo", ""])
    side = args.size // 8
    ends = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(0)).to(device)
    predict = unet_noise_predictor(unet)

    def run(batch_size: int | None) -> None:
        scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
        scheduler.set_timesteps(50)
        interpolate_frames(
            lambda frame: predict, ends, scheduler, embeds[:2], embeds[2:], levels=1,
            fractions=[0.55], variant="quality", candidates=[args.candidates],
            guidance_scale=7.5, generator=lambda frame: torch.Generator().manual_seed(frame),
            score=lambda latents: latents.mean(dim=(1, 2, 3)), batch_size=batch_size,
        )  # fmt: skip

    result = compare(
        "one at a time", lambda: measure(lambda: run(1), device=device),
        "batched", lambda: measure(lambda: run(None), device=device),
        pairs=args.pairs,
    )  # fmt: skip
    result["what"] = (
        f"{args.candidates} candidates, {args.size} px, {device.type}, 27 DDIM steps with CFG;"
        " target batched <= 0.6x"
    )
    print(result["what"])
    print(format_comparison(result))
    name = "bench_interpolation" if args.size == 64 else f"bench_interpolation-{args.size}"
    print(write_results(name, {"interpolation": result}, command=command_line()))


if __name__ == "__main__":
    main()
