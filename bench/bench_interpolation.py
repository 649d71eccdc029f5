"""Interpolation candidates through the UNet as one batch against one at a time.

The first level of ``sample.interpolate`` (quality variant): 8 candidates for the middle
frame, each noised to 0.55 of a 50-step DDIM schedule and denoised to 0 with CFG, on the
tiny model at 64 px (8x8 latents). ``batch_size=None`` sends all candidates through the
UNet together, ``batch_size=1`` one after the other; the frames are the same (a test checks
1e-5). Prints the time ratio (target <= 0.6x) and each mode's peak memory (CUDA's
allocator peak on a GPU; on a CPU the growth of resident memory over the first such call
in a fresh process, sampled every millisecond, since a warm allocator reuses freed memory). Times are
medians of alternating runs within one process.

    python bench/bench_interpolation.py [--candidates 8] [--repeats 5] [--size 64]
"""

from __future__ import annotations

from quiet import quiet

quiet()  # before diffusers and transformers are imported

import argparse
import ctypes
import statistics
import subprocess
import sys
import time

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from support import RssPeak, models_dir
from transformers import CLIPTextModel, CLIPTokenizer

from editflow.models.tiny import ensure_tiny
from editflow.stages.diffusion import encode_prompts, unet_noise_predictor
from editflow.stages.interpolation.frames import interpolate_frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--memory-of", type=int, help=argparse.SUPPRESS)  # a child's one call
    args = parser.parse_args()
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

    def run(batch_size: int | None) -> tuple[float, float]:
        scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
        scheduler.set_timesteps(50)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        interpolate_frames(
            lambda frame: predict, ends, scheduler, embeds[:2], embeds[2:], levels=1,
            fractions=[0.55], variant="quality", candidates=[args.candidates],
            guidance_scale=7.5, generator=lambda frame: torch.Generator().manual_seed(frame),
            score=lambda latents: latents.mean(dim=(1, 2, 3)), batch_size=batch_size,
        )  # fmt: skip
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        return seconds, torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0

    if args.memory_of is not None:  # the child: one call, sampling its resident memory
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand loading's freed memory back first
        with RssPeak() as rss:
            run(args.memory_of or None)
        print(rss.mib)
        return
    run(None), run(1)  # warm-up
    batched, single = [], []
    for _ in range(args.repeats):
        batched.append(run(None))
        single.append(run(1))
    b = statistics.median(s for s, _ in batched)
    o = statistics.median(s for s, _ in single)
    if device.type == "cuda":
        memory = "allocator peak"
        peaks = [max(m for _, m in batched), max(m for _, m in single)]
    else:
        memory = "resident growth"
        peaks = [_child_memory(args, batch_size) for batch_size in (0, 1)]
    print(f"{args.candidates} candidates, {args.size} px, {device.type}, 27 DDIM steps with CFG:")
    print(f"  batched        {b * 1000:8.1f} ms  {memory} {peaks[0]:7.1f} MiB")
    print(f"  one at a time  {o * 1000:8.1f} ms  {memory} {peaks[1]:7.1f} MiB")
    print(f"  batched / one at a time: x{b / o:.3f} (target <= 0.6)")


def _child_memory(args: argparse.Namespace, batch_size: int) -> float:
    command = [sys.executable, __file__, "--candidates", str(args.candidates), "--size",
               str(args.size), "--memory-of", str(batch_size)]  # fmt: skip
    return float(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


if __name__ == "__main__":
    main()
