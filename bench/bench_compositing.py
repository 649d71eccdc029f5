"""Cost of local ILVR guidance (cross-domain compositing) against unguided DDIM, same UNet.

At a 64x64 latent (512 px images) on the tiny UNet: the per-step time of the guided sampler
(noising the reference, two low-pass filters, blending) against the plain sampler, and with
RePaint the UNet calls and the time against the count the jump schedule predicts. The three
samplers alternate in one process (A B C, C B A, ...: ``harness.compare_many``); wall and CPU
time and memory growth per run, ratios per round.

    python bench/bench_compositing.py [--steps 20] [--pairs 5]

Writes bench/results/bench_compositing.json.
"""

from __future__ import annotations

from quiet import quiet

quiet()  # before diffusers and transformers are imported

import argparse

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from harness import command_line, compare_many, format_comparison, measure, write_results
from support import models_dir

from editflow.models.tiny import ensure_tiny
from editflow.stages.compositing.local_ilvr import LocalIlvr, local_ilvr_sample, repaint_schedule
from editflow.stages.diffusion import unet_noise_predictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=5)
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

    calls_made: dict[str, int] = {}

    def run(name: str, guidance, **knobs) -> None:
        scheduler.set_timesteps(args.steps)
        calls["n"] = 0
        local_ilvr_sample(
            predict, x_T, scheduler, cond, guidance=guidance, guidance_scale=1.0,
            generator=torch.Generator().manual_seed(1), **knobs,
        )  # fmt: skip
        calls_made[name] = calls["n"]

    guidance = LocalIlvr(reference, mask, n_in=2, n_out=1, t_in=0.5, t_out=1.0, blend_pix=2)
    jump, resamples, start = 2, 3, 0.5
    repaint = {"repaint_start": start, "repaint_jump": jump, "repaint_resamples": resamples}
    result = compare_many(
        {
            "unguided DDIM": lambda: measure(lambda: run("unguided DDIM", None)),
            "local ILVR": lambda: measure(lambda: run("local ILVR", guidance)),
            "local ILVR + RePaint": lambda: measure(
                lambda: run("local ILVR + RePaint", guidance, **repaint)
            ),
        },
        rounds=args.pairs,
    )
    levels = repaint_schedule(args.steps, start, jump, resamples)
    predicted = sum(after > level for level, after in zip(levels, levels[1:], strict=False))
    result["UNet calls"] = calls_made
    result["RePaint UNet calls the schedule predicts"] = predicted
    result["what"] = (
        f"tiny UNet, 64x64 latent, {args.steps} steps; RePaint start {start}, jump {jump},"
        f" {resamples} resamples; target local ILVR <= 1.05x unguided"
    )
    print(f"local ILVR vs unguided DDIM: {result['what']} (times per step of {args.steps})")
    print(format_comparison(result, per=args.steps))
    print(f"  UNet calls: {calls_made} (the RePaint schedule predicts {predicted})")
    print(write_results("bench_compositing", {"compositing": result}, command=command_line()))


if __name__ == "__main__":
    main()
