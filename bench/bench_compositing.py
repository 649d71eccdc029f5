"""Cost of local ILVR guidance (cross-domain compositing) against unguided DDIM, same UNet.

At a 64x64 latent (512 px images) on the tiny UNet: the per-step time of the guided sampler
(noising the reference, two low-pass filters, blending) against the plain sampler, and with
RePaint the UNet calls and the time against the count the jump schedule predicts. Ratios are
medians of alternating runs within one process.

    python bench/bench_compositing.py [--steps 20] [--repeats 5]
"""

from __future__ import annotations

from quiet import quiet

quiet()  # before diffusers and transformers are imported

import argparse
import statistics
import time

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from support import models_dir

from editflow.models.tiny import ensure_tiny
from editflow.stages.compositing.local_ilvr import LocalIlvr, local_ilvr_sample, repaint_schedule
from editflow.stages.diffusion import unet_noise_predictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = ensure_tiny(models_dir())
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    generator = torch.Generator().manual_seed(0)
    x_T = torch.randn(1, 4, 64, 64, generator=generator)
    reference = torch.randn(1, 4, 64, 64, generator=generator)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1
    cond = torch.randn(1, 77, 32, generator=generator)
    calls = {"n": 0}
    plain_predict = unet_noise_predictor(unet)

    def predict(x, t, embeds):
        calls["n"] += 1
        return plain_predict(x, t, embeds)

    def run(guidance, **knobs) -> float:
        scheduler.set_timesteps(args.steps)
        calls["n"] = 0
        started = time.perf_counter()
        local_ilvr_sample(
            predict, x_T, scheduler, cond, guidance=guidance, guidance_scale=1.0,
            generator=torch.Generator().manual_seed(1), **knobs,
        )  # fmt: skip
        return time.perf_counter() - started

    guidance = LocalIlvr(reference, mask, n_in=2, n_out=1, t_in=0.5, t_out=1.0, blend_pix=2)
    run(None)  # warm-up
    plain, guided = [], []
    for _ in range(args.repeats):
        plain.append(run(None))
        guided.append(run(guidance))
    ratio = statistics.median(guided) / statistics.median(plain)
    print(f"local ILVR, tiny UNet, 64x64 latent, {args.steps} steps, {args.repeats} runs each:")
    print(f"  unguided  {statistics.median(plain) / args.steps * 1000:7.2f} ms per step")
    print(f"  guided    {statistics.median(guided) / args.steps * 1000:7.2f} ms per step")
    print(f"  ratio     {ratio:.3f}x  (target <= 1.05x)")

    jump, resamples, start = 2, 3, 0.5
    levels = repaint_schedule(args.steps, start, jump, resamples)
    predicted = sum(after > level for level, after in zip(levels, levels[1:], strict=False))
    seconds = statistics.median(
        run(guidance, repaint_start=start, repaint_jump=jump, repaint_resamples=resamples)
        for _ in range(args.repeats)
    )
    print(f"with RePaint (start {start}, jump {jump}, {resamples} resamples):")
    print(f"  UNet calls {calls['n']} (the schedule predicts {predicted})")
    print(
        f"  time {seconds:.3f} s = {seconds / statistics.median(guided):.2f}x the guided run;"
        f" calls ratio {predicted / args.steps:.2f}x"
    )


if __name__ == "__main__":
    main()
