"""Benchmark edit-friendly inversion + edit on the tiny model (64 px, latents 1x4x8x8).

Prints, for each scheduler: the time of our inversion + edit against a plain loop that makes
the same UNet calls (same batch, timesteps and embeddings) and nothing else, their ratio
(target <= 1.03x: the method's own math should cost next to nothing), the bytes of the
noise-map sequence in raw fp32, and a few numbers worth knowing about the run (the
reconstruction error, the noise-map statistics, the error of a shifted reconstruction).

Both comparisons (through the UNet, and with a predictor that costs nothing) are ABBA pairs
(``harness.compare``): wall and CPU time, memory growth, ratios per pair.

Run: ``python bench/bench_edit_friendly.py [--steps 100] [--pairs 5]``. The tiny model is
built on first use under ``$EDITFLOW_MODELS`` (default ``~/.cache/editflow/models``).
Writes bench/results/bench_edit_friendly.json.
"""

from __future__ import annotations

from quiet import quiet

quiet()  # before diffusers and transformers are imported

import argparse
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from harness import command_line, compare, format_comparison, measure, write_results
from support import models_dir
from transformers import CLIPTextModel, CLIPTokenizer

from editflow.models.tiny import ensure_tiny
from editflow.stages.diffusion import (
    NoisePredictor,
    encode_prompts,
    guided_noise,
    unet_noise_predictor,
    vae_encode,
)
from editflow.stages.edit_friendly.inversion import edit_friendly_invert, edit_friendly_sample
from editflow.stages.edit_friendly.reverse_steps import build_scheduler
from editflow.stages.edit_friendly.statistics import noise_map_statistics

SOURCE, TARGET = "a photo of an astronaut", "a photo of a robot"
CFG_SRC, CFG_TAR, SKIP = 3.5, 15.0, 36


def astronaut_latents(vae) -> torch.Tensor:
    from skimage import data

    image = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 255
    return vae_encode(vae, F.interpolate(image, size=(64, 64), mode="area"))  # (1, 4, 8, 8)


@dataclass
class Setup:
    predict: NoisePredictor
    x0: torch.Tensor  # (1, 4, 8, 8)
    config: dict
    embeds: dict[str, torch.Tensor]  # prompt -> (1, 77, 32)
    steps: int


def ours(setup: Setup, name: str, seed: int = 0):
    """Inversion (source prompt) then the edit (target prompt, skip)."""
    scheduler = build_scheduler(name, setup.config, setup.steps)
    embeds = setup.embeds
    inversion = edit_friendly_invert(
        setup.predict, setup.x0, scheduler, embeds[SOURCE], embeds[""],
        guidance_scale=CFG_SRC, eta=1.0, generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    edited = edit_friendly_sample(
        setup.predict, inversion, scheduler, embeds[TARGET], embeds[""],
        guidance_scale=CFG_TAR, skip=SKIP, eta=1.0,
    )  # fmt: skip
    return inversion, edited


@torch.no_grad()
def plain_loop(setup: Setup, name: str) -> None:
    """The same UNet calls as ``ours`` (with the DPM warm-up call) and no scheduler math."""
    timesteps = build_scheduler(name, setup.config, setup.steps).timesteps
    calls = [(t, SOURCE, CFG_SRC) for t in timesteps]
    warm_up = [(timesteps[SKIP - 1], TARGET, CFG_TAR)] if name == "dpmsolver++" else []
    calls += warm_up + [(t, TARGET, CFG_TAR) for t in timesteps[SKIP:]]
    for t, prompt, scale in calls:
        guided_noise(setup.predict, setup.x0, t, setup.embeds[prompt], setup.embeds[""], scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    folder = ensure_tiny(models_dir())
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    setup = Setup(
        predict=unet_noise_predictor(
            UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        ),
        x0=astronaut_latents(vae),
        config=DDIMScheduler.load_config(folder, subfolder="scheduler"),
        embeds={p: encode_prompts(tokenizer, text_encoder, [p]) for p in ("", SOURCE, TARGET)},
        steps=args.steps,
    )
    x0, embeds = setup.x0, setup.embeds
    print(f"tiny model, latents {tuple(x0.shape)}, {setup.steps} steps, skip {SKIP}, "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip

    # A predictor that costs nothing, to time the method's own work whatever the UNet's speed
    # or the machine's background load.
    constant = torch.randn(2, *x0.shape[1:], generator=torch.Generator().manual_seed(0))
    free = replace(setup, predict=lambda x_t, t, embeds: constant[: len(x_t)])

    results = {}
    for name in ("ddim", "dpmsolver++"):
        calls = 2 * setup.steps - SKIP
        unet = compare(
            "plain UNet loop", lambda: measure(lambda: plain_loop(setup, name)),  # noqa: B023
            "inversion + edit", lambda: measure(lambda: ours(setup, name)),  # noqa: B023
            pairs=args.pairs,
        )  # fmt: skip
        # The same with the free predictor: what the method itself costs per step.
        free_result = compare(
            "plain loop, free predictor", lambda: measure(lambda: plain_loop(free, name)),  # noqa: B023
            "ours, free predictor", lambda: measure(lambda: ours(free, name)),  # noqa: B023
            pairs=args.pairs,
        )  # fmt: skip
        overhead = (
            free_result["ours, free predictor"]["wall"]["median"]
            - free_result["plain loop, free predictor"]["wall"]["median"]
        ) / calls
        inversion, _ = ours(setup, name)
        scheduler = build_scheduler(name, setup.config, setup.steps)
        reconstruct = (setup.predict, inversion, scheduler, embeds[SOURCE], embeds[""])
        knobs = {"guidance_scale": CFG_SRC, "skip": 0, "eta": 1.0}
        same = edit_friendly_sample(*reconstruct, **knobs)
        shifted = edit_friendly_sample(*reconstruct, **knobs, shift=(2, 3))
        rolled = x0.roll((2, 3), dims=(-2, -1))
        variance, correlation = noise_map_statistics(inversion.noise_maps)
        maps = inversion.noise_maps
        sd_mib = setup.steps * 4 * 64 * 64 * 4 / 2**20
        unet_call = unet["plain UNet loop"]["wall"]["median"] / calls
        facts = {
            "UNet calls": calls,
            "method overhead ms per step (free predictor, medians)": overhead * 1000,
            "UNet call ms (plain loop median / calls)": unet_call * 1000,
            "noise maps shape": list(maps.shape),
            "noise maps bytes fp32": maps.numel() * 4,
            "SD 1.x 512 px noise maps MiB": sd_mib,
            "reconstruction relative error": relative(same, x0),
            "shift (2, 3) relative error": relative(shifted, rolled),
            "noise-map variance mean": float(variance.mean()),
            "noise-map variance median": float(variance.median()),
            "consecutive correlation mean": float(correlation.mean()),
        }
        results[name] = {"through the UNet": unet, "free predictor": free_result, **facts}
        print(f"\n[{name}] through the UNet (target inversion + edit <= 1.03x the plain loop):")
        print(format_comparison(unet))
        print("  free predictor:")
        print(format_comparison(free_result))
        print(f"  method overhead    {overhead * 1000:8.3f} ms per step"
              f" (free predictor; UNet call here {unet_call * 1000:.1f} ms)")  # fmt: skip
        print(f"  noise maps         {tuple(maps.shape)}: {maps.numel() * 4} bytes fp32"
              f" (SD 1.x at 512 px: {sd_mib:.2f} MiB)")  # fmt: skip
        print(f"  reconstruction     relative error {relative(same, x0):.2e}"
              " (skip 0, source prompt, cfg_tar = cfg_src)")  # fmt: skip
        print(f"  shift (2, 3)       relative error {relative(shifted, rolled):.2e} against the"
              " rolled x0 (random zero-padded UNet: not shift-equivariant)")  # fmt: skip
        print(f"  noise-map variance mean {float(variance.mean()):.3g},"
              f" median {float(variance.median()):.3g}")  # fmt: skip
        print(f"  consecutive corr.  mean {float(correlation.mean()):.3f}")
    results["what"] = f"tiny, latents {tuple(x0.shape)}, {setup.steps} steps, skip {SKIP}"
    print(write_results("bench_edit_friendly", results, command=command_line()))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


if __name__ == "__main__":
    main()
