"""editflow against diffusers on Stable Diffusion 1.5's full-size model shapes.

On the built-in ``sd15-shaped`` model (SD 1.5's configs, random weights: timing and memory
only), in one process, every comparison ABBA (``--pairs`` pairs), wall and CPU time and the
peak growth of memory of each call (CUDA's allocator on a GPU, resident memory on a CPU):

1. The engine: ``run_recipe`` of encode, DDIM inversion (guidance 1), DDIM sampling (CFG
   7.5), decode and PNG export on a cold cache (plan, keys, cache entries, records, the
   export), against diffusers doing the same work on the same loaded parts: VAE encode and
   a DDIM inversion loop (diffusers has no inversion pipeline), then
   ``StableDiffusionPipeline`` from x_T (DDIM, CFG 7.5, decode, PIL) and the PNG. Target:
   <= 1.03x in CPU time (median).
2. The kernel-level figure, apart: the ``sample.ddim`` stage function against
   ``StableDiffusionPipeline(output_type="latent")`` (same UNet, x_T, CFG 7.5), per step;
   for each ``--attention`` (``sdpa``: diffusers' default ``AttnProcessor2_0``; ``eager``:
   its ``AttnProcessor``, attention as matmuls and a softmax) and, with ``--compile``,
   compiled (``model.compile``: torch.compile, channels-last).
3. pix2pix-zero: the guided edit (a backward pass per step) against the unguided one, from
   reference maps held in memory: per-step time and the edit's own peak memory growth.
4. Edit-friendly inversion + edit: per-step time, repeated.

With no arguments it picks the device: on a GPU 512 px, 50 steps, float16, compiled too;
on a CPU 64 px, 3 steps, float32, eager SDPA only (a few minutes, most of it building and
loading the model once). CPU figures are not GPU results. ``bench/gpu_check.sh`` runs the
GPU checks of issue #25 in one go.

    python bench/bench_gpu.py [--size 512] [--steps 50] [--dtype float16] [--compile]
        [--attention sdpa eager] [--pairs 5] [--only roundtrip kernel pix2pix_zero ...]

Writes bench/results/bench_gpu.json.
"""

from __future__ import annotations

from quiet import quiet

quiet()  # before diffusers and transformers are imported

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch
from harness import (
    command_line,
    compare,
    format_comparison,
    format_series,
    measure,
    series,
    write_results,
)
from roundtrip import (
    PROMPT,
    components_of,
    counter,
    encode_prompt,
    forget_prompts,
    pipeline_of,
    pipeline_round_trip,
    write_recipe,
)
from support import models_dir

from editflow.cache import Cache
from editflow.engine.api import plan_recipe, run_recipe
from editflow.files.inputs import load_input
from editflow.models import RunModels
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

GUIDANCE = 7.5
SECTIONS = ("roundtrip", "kernel", "pix2pix_zero", "edit_friendly")


def load_models(recipe: Path, device: torch.device, work: Path) -> tuple[RunModels, Any]:
    """The recipe's models, loaded once for every run (the engine's runs share them)."""
    plan = plan_recipe(recipe, [], cache=Cache(work / "plan"))
    models = RunModels(
        plan.models, device=device, dtype=plan.loaded.recipe.model.torch_dtype,
        models_dir=models_dir(),
    )  # fmt: skip
    components_of(models)  # loads every part now, outside the timings
    return models, plan


def set_attention(models: RunModels, mode: str) -> None:
    """``sdpa`` (diffusers' default on torch 2) or ``eager`` (matmuls and a softmax)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet = models.registry("model.id").get("unet")
    unet = getattr(unet, "_orig_mod", unet)
    unet.set_attn_processor(AttnProcessor() if mode == "eager" else AttnProcessor2_0())


def context(models: RunModels, device: torch.device) -> StageContext:
    return StageContext("bench", 0, device, models.dtype, models=models.for_stage(DENOISER))


def bench_roundtrip(
    recipe: Path, models: RunModels, plan: Any, device: torch.device, args: Any, work: Path
) -> dict:
    components = components_of(models)
    pipe = pipeline_of(components)
    image = load_input(plan.inputs["photo"])
    runs = counter()

    def engine() -> None:
        n = runs()
        forget_prompts()  # a cold run encodes its prompts (the models are shared)
        run_recipe(recipe, [], cache=Cache(work / f"cold{n}"), out_dir=work / f"out{n}",
                   device=device.type, registry=models)  # fmt: skip

    def diffusers() -> None:
        n = runs()
        (work / f"pipe{n}").mkdir()
        pipeline_round_trip(components, pipe, image, PROMPT, args.steps, GUIDANCE,
                            work / f"pipe{n}" / "decode.png")  # fmt: skip

    result = compare(
        "diffusers: inversion loop + StableDiffusionPipeline + PNG",
        lambda: measure(diffusers, device=device),
        "run_recipe, cold cache, export", lambda: measure(engine, device=device),
        pairs=args.pairs,
    )  # fmt: skip
    result["what"] = (
        f"{args.model}, {args.dtype}, {args.size} px, {args.steps} inversion + {args.steps}"
        f" sampling steps (CFG {GUIDANCE}), decode, PNG; models shared; target <= 1.03x CPU"
    )
    print(f"engine vs diffusers, whole round trip: {result['what']}")
    print(format_comparison(result))
    return result


def bench_kernel(models: RunModels, device: torch.device, args: Any, label: str) -> dict:
    """sample.ddim's stage function against the pipeline's denoising loop, per step."""
    latent = args.size // 8
    x_T = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(0))
    x_T = x_T.to(device, models.dtype)
    ctx = context(models, device)
    params = SampleDdimParams(prompt=PROMPT, num_inference_steps=args.steps)
    pipe = pipeline_of(components_of(models))

    def stage() -> None:
        forget_prompts()  # the pipeline encodes its prompts every call: so does the stage
        SampleDdim().call(ctx, params, {"latents": x_T})

    def diffusers() -> None:
        pipe(PROMPT, latents=x_T, num_inference_steps=args.steps, guidance_scale=GUIDANCE,
             height=args.size, width=args.size, output_type="latent")  # fmt: skip

    result = compare(
        "StableDiffusionPipeline (latent)", lambda: measure(diffusers, device=device),
        "sample.ddim stage", lambda: measure(stage, device=device),
        pairs=args.pairs,
    )  # fmt: skip
    result["what"] = f"{label}: {args.steps} steps, CFG {GUIDANCE}; per step = time / steps"
    result["steps"] = args.steps
    print(f"kernel level, {result['what']} (times per step)")
    print(format_comparison(result, per=args.steps))
    return result


def bench_pix2pix_zero(models: RunModels, device: torch.device, args: Any) -> dict:
    latent = args.size // 8
    view = models.for_stage(DENOISER)
    ctx = context(models, device)
    x_T = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(1))
    x_T = x_T.to(device, models.dtype)
    embeds = encode_prompt({"tokenizer": view.get("tokenizer"),
                            "text_encoder": view.get("text_encoder")}, PROMPT, device)  # fmt: skip
    reference = GuidePix2PixZeroReference().call(
        ctx, GuideReferenceParams(num_inference_steps=args.steps),
        {"x_T": x_T, "prompt_embeds": embeds},
    )["attention_maps"]  # fmt: skip
    assert isinstance(reference, list)  # in memory: a context's default steps writer
    direction = 0.1 * torch.randn(embeds.shape, generator=torch.Generator().manual_seed(2))
    inputs = {"x_T": x_T, "prompt_embeds": embeds, "direction": direction.to(embeds)}

    def edit(guidance: float) -> None:
        params = SamplePix2PixZeroParams(xa_guidance=guidance, num_inference_steps=args.steps)
        wired = {**inputs, "attention_maps": reference} if guidance else inputs
        SamplePix2PixZero().call(ctx, params, wired)

    result = compare(
        "unguided", lambda: measure(lambda: edit(0.0), device=device),
        "guided (maps in memory)", lambda: measure(lambda: edit(0.1), device=device),
        pairs=args.pairs,
    )  # fmt: skip
    held = sum(m.numel() * m.element_size() for step in reference for m in step.values())
    result["reference maps MiB (held before the edits)"] = held / 2**20
    result["what"] = f"{args.size} px, {args.steps} steps; per step = time / steps"
    print(f"pix2pix-zero edit, {result['what']} (times per step; peak = the edit's growth)")
    print(format_comparison(result, per=args.steps))
    return result


def bench_edit_friendly(models: RunModels, device: torch.device, args: Any) -> dict:
    latent = args.size // 8
    ctx = context(models, device)
    latents = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(3))
    latents = latents.to(device, models.dtype)

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

    result = series("inversion + edit", lambda: measure(edit_friendly, device=device),
                    repeats=args.pairs)  # fmt: skip
    result["what"] = f"{args.size} px, {args.steps} + {args.steps} steps, skip 0"
    print(f"edit-friendly inversion + edit, {result['what']} (times per step)")
    print(format_series(result, per=2 * args.steps))
    return result


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    cuda = torch.cuda.is_available()
    parser.add_argument("--model", default="sd15-shaped")
    parser.add_argument("--size", type=int, default=512 if cuda else 64)
    parser.add_argument("--steps", type=int, default=50 if cuda else 3)
    parser.add_argument("--dtype", default="float16" if cuda else "float32")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=cuda,
                        help="also the compiled UNet (default on a GPU)")  # fmt: skip
    parser.add_argument("--attention", nargs="+", choices=("sdpa", "eager"),
                        default=["sdpa", "eager"] if cuda else ["sdpa"])  # fmt: skip
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser.parse_args(argv)


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (not a GPU result)"
    print(f"{args.model}, {args.size} px, {args.steps} steps, {args.dtype}, {where}")
    results: dict[str, Any] = {"device": where}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as folder:
        work = Path(folder)
        recipe = write_recipe(work, model=args.model, size=args.size, steps=args.steps,
                              guidance=GUIDANCE, dtype=args.dtype)  # fmt: skip
        models, plan = load_models(recipe, device, work)
        if "roundtrip" in args.only:
            results["roundtrip"] = bench_roundtrip(recipe, models, plan, device, args, work)
        if "kernel" in args.only:
            for mode in args.attention:
                set_attention(models, mode)
                results[f"kernel {mode}"] = bench_kernel(
                    models, device, args, f"not compiled, attention {mode}"
                )
            set_attention(models, "sdpa")
        if "pix2pix_zero" in args.only:
            results["pix2pix_zero"] = bench_pix2pix_zero(models, device, args)
        if "edit_friendly" in args.only:
            results["edit_friendly"] = bench_edit_friendly(models, device, args)
        if args.compile and "kernel" in args.only:
            compiled_recipe = write_recipe(
                work, model=args.model, size=args.size, steps=args.steps, guidance=GUIDANCE,
                dtype=args.dtype, compiled=True,
            )  # fmt: skip
            del models
            compiled, _ = load_models(compiled_recipe, device, work)
            results["kernel compiled"] = bench_kernel(compiled, device, args, "torch.compile")
    print(write_results("bench_gpu", results, command=command_line()))


if __name__ == "__main__":
    main()
