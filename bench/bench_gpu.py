"""editflow's samplers against diffusers' pipeline on Stable Diffusion 1.5's full-size UNet.

On the built-in ``sd15-shaped`` model (SD 1.5's configs, random weights: timing and memory
only), in one process:

1. ``sample.ddim`` (CFG 7.5, eta 0) against ``StableDiffusionPipeline`` with the same
   components and starting latents: per-step time and peak memory, eager and, with
   ``--compile``, compiled (``model.compile``: torch.compile, channels-last);
2. pix2pix-zero: the guided edit (a backward pass per step) against the unguided one, from
   reference maps held in memory: per-step time and peak memory;
3. edit-friendly inversion + edit: per-step time.

With no arguments it picks the device: on a GPU 512 px, 50 steps, float16, eager and
compiled; on a CPU 64 px, 3 steps, float32, eager only (a few minutes, most of it building
and loading the model once). CPU figures are not GPU results.

    python bench/bench_gpu.py [--size 512] [--steps 50] [--dtype float16] [--compile]
"""

from __future__ import annotations

from quiet import quiet

quiet()  # before diffusers and transformers are imported

import argparse
import resource
import time
from pathlib import Path

import torch
from support import models_dir

from editflow.models import ModelSection, RunModels, resolve_providers
from editflow.models.specs import DENOISER
from editflow.stages.base import StageContext
from editflow.stages.ddim.kinds import SampleDdim, SampleDdimParams
from editflow.stages.edit_friendly.kinds import (
    InvertEditFriendly,
    InvertEditFriendlyParams,
    SampleEditFriendly,
    SampleEditFriendlyParams,
)
from editflow.stages.pix2pix_zero.guide import GuidePix2PixZeroReference, GuideReferenceParams
from editflow.stages.pix2pix_zero.sample import SamplePix2PixZero, SamplePix2PixZeroParams

PROMPT = "a photo of an astronaut riding a horse"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(device: torch.device, function) -> tuple[float, float]:
    """(seconds, peak MiB): CUDA's allocator peak of this call on a GPU; on a CPU the
    process's RSS peak so far (a high-water mark, not this call's own)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    started = time.perf_counter()
    function()
    synchronize(device)
    seconds = time.perf_counter() - started
    if device.type == "cuda":
        return seconds, torch.cuda.max_memory_allocated() / 2**20
    return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def models_for(device: torch.device, dtype: str, compiled: bool, models_dir: Path) -> RunModels:
    section = ModelSection(id="sd15-shaped", dtype=dtype, compile=compiled)
    resolved = resolve_providers(section, ["model.id"], base_dir=models_dir, models_dir=models_dir)
    return RunModels(resolved, device=device, dtype=section.torch_dtype, models_dir=models_dir)


def time_sample_ddim(
    device: torch.device, models: RunModels, x_T: torch.Tensor, args: argparse.Namespace
) -> tuple[float, float]:
    """editflow's sample.ddim stage, after one warm-up run (which compiles, if asked)."""
    ctx = StageContext("bench", 0, device, models.dtype, models=models.for_stage(DENOISER))
    params = SampleDdimParams(prompt=PROMPT, num_inference_steps=args.steps)
    SampleDdim().call(ctx, params, {"latents": x_T})
    return measure(device, lambda: SampleDdim().call(ctx, params, {"latents": x_T}))


def time_diffusers(
    device: torch.device, models: RunModels, x_T: torch.Tensor, args: argparse.Namespace
) -> tuple[float, float]:
    """diffusers' StableDiffusionPipeline on the same components, after one warm-up run."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    registry = models.registry("model.id")
    pipe = StableDiffusionPipeline(
        vae=registry.get("vae"),
        text_encoder=registry.get("text_encoder"),
        tokenizer=registry.get("tokenizer"),
        unet=registry.get("unet"),
        scheduler=DDIMScheduler.from_config(dict(registry.scheduler_config)),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)

    def run() -> None:
        pipe(
            PROMPT, latents=x_T.to(device, models.dtype), num_inference_steps=args.steps,
            height=args.size, width=args.size, output_type="latent",
        )  # fmt: skip

    run()
    return measure(device, run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    cuda = torch.cuda.is_available()
    parser.add_argument("--size", type=int, default=512 if cuda else 64)
    parser.add_argument("--steps", type=int, default=50 if cuda else 3)
    parser.add_argument("--dtype", default="float16" if cuda else "float32")
    parser.add_argument("--compile", action="store_true", default=cuda, help="also compiled")
    args = parser.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    saved_models = models_dir()
    latent = args.size // 8
    where = torch.cuda.get_device_name() if cuda else "CPU (not a GPU result)"
    print(f"sd15-shaped, {args.size} px, {args.steps} steps, {args.dtype}, {where}")

    x_T = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(0))
    diffusers_step = None
    for compiled in [False, True] if args.compile else [False]:
        models = models_for(device, args.dtype, compiled, saved_models)
        if diffusers_step is None:
            seconds, peak = time_diffusers(device, models, x_T, args)
            diffusers_step = seconds / args.steps
            print("sample.ddim vs StableDiffusionPipeline (same UNet, CFG 7.5):")
            print(f"  diffusers eager  {diffusers_step * 1000:8.1f} ms/step  peak {peak:8.0f} MiB")
        seconds, peak = time_sample_ddim(device, models, x_T, args)
        label = "compiled" if compiled else "eager"
        print(
            f"  editflow {label:8s}{seconds / args.steps * 1000:8.1f} ms/step  peak {peak:8.0f} MiB"
            f"  ({seconds / args.steps / diffusers_step:.3f}x diffusers eager)"
        )

    models = models_for(device, args.dtype, False, saved_models)
    view = models.for_stage(DENOISER)
    ctx = StageContext("bench", 0, device, models.dtype, models=view)
    x_T = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(1))
    embeds = view.get("text_encoder")(
        view.get("tokenizer")(
            [PROMPT], padding="max_length", max_length=77, return_tensors="pt"
        ).input_ids.to(device)
    )[0]
    reference = GuidePix2PixZeroReference().call(
        ctx, GuideReferenceParams(num_inference_steps=args.steps),
        {"x_T": x_T, "prompt_embeds": embeds},
    )["attention_maps"]  # fmt: skip
    assert isinstance(reference, list)  # in memory: a context's default steps writer
    direction = 0.1 * torch.randn(embeds.shape, generator=torch.Generator().manual_seed(2))
    inputs = {"x_T": x_T, "prompt_embeds": embeds, "direction": direction.to(embeds)}
    results = {}
    for name, guidance in (("unguided", 0.0), ("guided", 0.1)):
        params = SamplePix2PixZeroParams(xa_guidance=guidance, num_inference_steps=args.steps)
        wired = {**inputs, "attention_maps": reference} if guidance else inputs
        results[name] = measure(
            device, lambda p=params, w=wired: SamplePix2PixZero().call(ctx, p, w)
        )
    print("pix2pix-zero edit, reference maps in memory:")
    for name, (seconds, peak) in results.items():
        print(f"  {name:9s} {seconds / args.steps * 1000:8.1f} ms/step  peak {peak:8.0f} MiB")
    print(f"  guided / unguided: peak x{results['guided'][1] / results['unguided'][1]:.3f}")

    latents = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(3))

    def edit_friendly() -> None:
        inverted = InvertEditFriendly().call(
            ctx, InvertEditFriendlyParams(source_prompt=PROMPT, num_inference_steps=args.steps),
            {"latents": latents},
        )  # fmt: skip
        SampleEditFriendly().call(
            ctx,
            SampleEditFriendlyParams(target_prompt=PROMPT, skip=0, num_inference_steps=args.steps),
            {name: inverted[name] for name in ("noise_maps", "auxiliary_path")},
        )

    seconds, peak = measure(device, edit_friendly)
    print("edit-friendly inversion + edit:")
    print(f"  {seconds / (2 * args.steps) * 1000:8.1f} ms/step  peak {peak:8.0f} MiB")


if __name__ == "__main__":
    main()
