"""Textual inversion iterations per second: editflow against a plain torch training loop.

Both optimise two prompt embeddings and a negative embedding with Adam through the same
frozen tiny UNet, on the same draws (timesteps, noise), at 64 px images (8x8 latents) and
at 256 px (32x32 latents). The plain loop is what one writes with diffusers:
``DDPMScheduler.add_noise``, a CFG noise prediction, MSE, Adam. ABBA pairs within one
process (``harness.compare``): wall and CPU time, memory growth, ratios per pair (target:
editflow's iterations per second >= 0.97x the plain loop's, i.e. time ratio <= 1/0.97).

    python bench/bench_textual_inversion.py [--iterations 20] [--pairs 5]

Writes bench/results/bench_textual_inversion.json.
"""

from __future__ import annotations

from quiet import quiet

quiet()  # before diffusers and transformers are imported

import argparse

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from harness import command_line, compare, format_comparison, measure, write_results
from support import models_dir

from editflow.models.tiny import ensure_tiny
from editflow.stages.diffusion import unet_noise_predictor
from editflow.stages.interpolation.textual_inversion import textual_inversion


def plain_loop(unet, scheduler, latents, prompt, negative, iterations: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    p = prompt.clone().requires_grad_(True)
    n = negative.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([p, n], lr=1e-4)
    count = len(latents)
    for _ in range(iterations):
        t = torch.randint(333, 666, (count,), generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        x_t = scheduler.add_noise(latents, noise, t)
        embeds = torch.cat([n.expand(count, -1, -1), p])
        eps = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), embeds).sample
        eps_uncond, eps_cond = eps.chunk(2)
        loss = F.mse_loss(eps_uncond + 7.5 * (eps_cond - eps_uncond), noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = ensure_tiny(models_dir())
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    unet.requires_grad_(False)
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    negative = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)

    results = {}
    for size in (8, 32):
        latents = torch.randn(2, 4, size, size, generator=generator)

        def ours(latents: torch.Tensor = latents) -> None:
            textual_inversion(
                unet_noise_predictor(unet), latents, prompt, negative, scheduler.alphas_cumprod,
                scheduler.config.prediction_type, iterations=args.iterations,
                learning_rate=1e-4, guidance_scale=7.5, generator=torch.Generator().manual_seed(1),
                augment=False,
            )  # fmt: skip

        def plain(latents: torch.Tensor = latents) -> None:
            plain_loop(unet, scheduler, latents, prompt, negative, args.iterations, seed=1)

        result = compare(
            "plain torch loop", lambda plain=plain: measure(plain),
            "editflow", lambda ours=ours: measure(ours),
            pairs=args.pairs,
        )  # fmt: skip
        rates = {
            side: args.iterations / result[side]["wall"]["median"]
            for side in ("plain torch loop", "editflow")
        }
        result["iterations per second (median wall)"] = rates
        result["speed editflow / plain (medians)"] = rates["editflow"] / rates["plain torch loop"]
        results[f"{size}x{size} latents"] = result
        print(f"textual inversion, tiny UNet, 2 images, {size}x{size} latents,"
              f" {args.iterations} iterations:")  # fmt: skip
        print(format_comparison(result))
        print(f"  iterations/s: plain {rates['plain torch loop']:.2f}, editflow"
              f" {rates['editflow']:.2f} ({result['speed editflow / plain (medians)']:.3f}x;"
              " target >= 0.97x)")  # fmt: skip
    print(write_results("bench_textual_inversion", results, command=command_line()))


if __name__ == "__main__":
    main()
