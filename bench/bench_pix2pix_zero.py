"""Benchmark pix2pix-zero's cross-attention guided edit against an unguided edit (tiny model).

Prints:

- the size of the reference attention maps per step and for the whole run, as editflow
  stores them (conditional half, fp16) and as the released code holds them (both CFG halves,
  fp32), measured on the tiny model and projected for SD 1.x at 512 px (16 cross-attention
  layers, 8 heads, 77 tokens, 5 layers each at 64/32/16 px latents and 1 at 8 px);
- the peak memory and wall time of three edits from the same x_T, each in a fresh process:
  ``unguided`` (xa_guidance 0), ``guided-streamed`` (maps written to and read back from
  editflow's zarr cache one step at a time, as the engine streams them) and ``guided-in-ram`` (every step's
  maps loaded before the edit, as the released code keeps them: fp32, both CFG halves);
- the ratios guided / unguided.

Why this way of measuring memory: torch's CPU allocator is invisible to ``tracemalloc``, and
``ru_maxrss`` is a high-water mark of the whole process, dominated by imports and model
loading. Each edit therefore runs in its own subprocess which loads everything, warms up,
then resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``, Linux) and
reads ``VmHWM`` after the edit: the peak resident memory of the edit alone, allocator caching
included, which is what runs out on a real machine. (``torch.profiler``'s memory view counts
tensor bytes only and misses allocator and library overheads.) Linux only.

Run: ``python bench/bench_pix2pix_zero.py [--steps 50] [--size 64] [--threads 1]
[--repeats 3]``. The time is the fastest of the repeats; the peak covers all of them.
``--size`` is the image size in pixels (latents are size / 8); try 256 to make the maps of
the tiny model large enough to stand out of the process's noise. The tiny model is built on
first use under ``$EDITFLOW_MODELS`` (default ``~/.cache/editflow/models``).
"""

from __future__ import annotations

from quiet import quiet

quiet()  # before diffusers and transformers are imported

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMInverseScheduler, DDIMScheduler, UNet2DConditionModel
from support import models_dir
from transformers import CLIPTextModel, CLIPTokenizer

from editflow.cache import Cache, CachedSteps
from editflow.models.tiny import ensure_tiny
from editflow.stages.ddim_loops import ddim_invert
from editflow.stages.diffusion import encode_prompts, unet_noise_predictor, vae_encode
from editflow.stages.pix2pix_zero.attention import install_attention_recorder
from editflow.stages.pix2pix_zero.direction import bank_mean, edit_direction, sentences_for
from editflow.stages.pix2pix_zero.edit import guided_edit, reference_pass

CAPTION, SOURCE_WORD, TARGET_WORD = "a photo of an astronaut", "astronaut", "robot"
MODES = ("unguided", "guided-streamed", "guided-in-ram")
MIB = 2**20


MAPS_KEY = "0" * 64  # the reference maps' cache entry


def sd15_map_elements_per_step() -> int:
    """Elements of one step's conditional cross-attention maps in SD 1.x at 512 px."""
    heads, tokens = 8, 77
    # (latent resolution, number of cross-attention layers): down 2+2+2, mid 1, up 3+3+3.
    layers = [(64, 5), (32, 5), (16, 5), (8, 1)]
    return sum(heads * side * side * tokens * count for side, count in layers)


# ------------------------------------------------------------------------------------------
# Preparation (parent process): x_T, embeddings and the reference maps on disk


def load(folder: Path):
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    unet.requires_grad_(False)
    config = DDIMScheduler.load_config(folder, subfolder="scheduler")
    return unet, config


def prepare(workdir: Path, folder: Path, steps: int, size: int) -> dict:
    from skimage import data

    unet, config = load(folder)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval()

    image = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 255
    x0 = vae_encode(vae, F.interpolate(image, size=(size, size), mode="area"))
    caption = encode_prompts(tokenizer, text_encoder, [CAPTION])
    direction = edit_direction(
        bank_mean(tokenizer, text_encoder, sentences_for(SOURCE_WORD)),
        bank_mean(tokenizer, text_encoder, sentences_for(TARGET_WORD)),
    )
    inverse = DDIMInverseScheduler.from_config(config)
    inverse.set_timesteps(steps)
    predict = unet_noise_predictor(unet)
    x_T, _ = ddim_invert(
        predict, x0, inverse, caption, regularize=True, generator=torch.Generator().manual_seed(0)
    )

    shapes: dict[str, tuple[int, ...]] = {}
    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(steps)
    # The maps go into editflow's zarr cache exactly as the engine stores them: fp16, one
    # stream per layer, written step by step.
    with Cache(workdir / "cache").writer(MAPS_KEY, {}) as writer:
        streams: dict[str, object] = {}

        def record(step: int, maps: dict[str, torch.Tensor]) -> None:
            for index, (name, m) in enumerate(maps.items()):
                if name not in streams:
                    shapes[name] = tuple(m.shape)
                    streams[name] = writer.create_stream(
                        f"layer{index}", (steps, *m.shape), torch.float16
                    )
                streams[name][step] = m

        with install_attention_recorder(unet) as recorder:
            reference_pass(recorder.predictor(predict), x_T, scheduler, caption, record=record)
        layers = {
            name: [f"layer{i}", list(shape)] for i, (name, shape) in enumerate(shapes.items())
        }
        writer.set_attrs(streams={"attention_maps": {"num_steps": steps, "layers": layers}})
    torch.save(
        {"x_T": x_T, "caption": caption, "direction": direction, "layer_names": list(shapes)},
        workdir / "inputs.pt",
    )
    return {name: list(shape) for name, shape in shapes.items()}


# ------------------------------------------------------------------------------------------
# One edit (worker process)


def vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(mode: str, workdir: Path, folder: Path, steps: int, repeats: int) -> dict:
    unet, config = load(folder)
    inputs = torch.load(workdir / "inputs.pt", weights_only=True)
    x_T, caption = inputs["x_T"], inputs["caption"]
    edit_embeds = caption + inputs["direction"]

    names = inputs["layer_names"]

    entry = Cache(workdir / "cache").get(MAPS_KEY)

    def read_step(i: int) -> dict[str, torch.Tensor]:
        """One step of every layer, read from its chunk in the cache."""
        return {name: entry.step(f"layer{k}", i) for k, name in enumerate(names)}

    def streamed(i: int) -> dict[str, torch.Tensor]:
        """The engine's reader: one step per call, the next one read in the background."""
        if i == 0:  # a fresh reader per edit, as each engine run makes one
            streamed.maps = CachedSteps(Cache(workdir / "cache"), MAPS_KEY, "attention_maps")
        return streamed.maps[i]

    def run(n_steps: int, reference_maps) -> float:
        scheduler = DDIMScheduler.from_config(config)
        scheduler.set_timesteps(n_steps)
        with install_attention_recorder(unet) as recorder:
            predict = unet_noise_predictor(unet)
            start = time.perf_counter()
            guided_edit(
                predict,
                x_T,
                scheduler,
                edit_embeds,
                caption,
                predict_maps=recorder.predictor(predict),
                reference_maps=reference_maps,
                xa_guidance=0.0 if mode == "unguided" else 0.1,
            )
            return time.perf_counter() - start

    held: list[dict[str, torch.Tensor]] = []
    if mode == "guided-in-ram":
        # The released layout: every step, fp32, both CFG halves (the unconditional half is
        # the caption's too, so a copy of the conditional one has the right size).
        held = [
            {k: torch.cat([m, m]).float() for k, m in read_step(i).items()} for i in range(steps)
        ]
        reader = lambda i: {k: m[: len(m) // 2] for k, m in held[i].items()}  # noqa: E731
    else:
        reader = streamed

    run(2, reader)  # warm-up: allocator pools, lazy inits, page faults of the weights
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    baseline = vm_kib("VmRSS")
    seconds = min(run(steps, reader) for _ in range(repeats))
    peak = vm_kib("VmHWM")
    return {"mode": mode, "seconds": seconds, "baseline_kib": baseline, "peak_kib": peak}


# ------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=64, help="image size in pixels")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed edits; the fastest counts")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = ensure_tiny(models_dir())

    if args.worker:
        print(json.dumps(worker(args.worker, args.workdir, folder, args.steps, args.repeats)))
        return

    with tempfile.TemporaryDirectory(prefix="bench-p2pz-") as tmp:
        workdir = Path(tmp)
        shapes = prepare(workdir, folder, args.steps, args.size)
        results = {}
        for mode in MODES:
            command = [sys.executable, __file__, "--worker", mode, "--workdir", str(workdir)]
            command += ["--steps", str(args.steps), "--threads", str(args.threads)]
            command += ["--repeats", str(args.repeats)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[mode] = json.loads(output.strip().splitlines()[-1])

    per_step = sum(torch.Size(shape).numel() for shape in shapes.values())
    sd_per_step = sd15_map_elements_per_step()
    print(
        f"pix2pix-zero guided edit, tiny model, {args.size} px, {args.steps} steps, "
        f"{args.threads} thread(s)"
    )
    print("\nreference cross-attention maps")
    print(f"  tiny layers: {len(shapes)}: " + ", ".join(f"{tuple(s)}" for s in shapes.values()))
    print(f"  {'':50}{'per step':>14}{'whole run':>14}")
    for label, elements in (("tiny", per_step), ("SD 1.x 512 px (projected)", sd_per_step)):
        for layout, factor in (("editflow (cond, fp16)", 2), ("released (both, fp32)", 8)):
            step_bytes = elements * factor
            print(
                f"  {label:>26}: {layout:<22}{step_bytes / MIB:>10.2f} MiB"
                f"{step_bytes * args.steps / MIB:>10.1f} MiB"
            )
    print(
        "  SD 1.x: 16 layers, 8 heads, 77 tokens, 5 layers at each of 64/32/16 px, 1 at 8 px:"
        f" {sd_per_step:,} elements per step and CFG half"
    )

    print("\nedits from the same x_T (each in a fresh process; peak = VmHWM during the edit)")
    print(f"  {'mode':<18}{'time':>9}{'baseline RSS':>15}{'peak RSS':>12}{'peak - base':>14}")
    for mode, r in results.items():
        print(
            f"  {mode:<18}{r['seconds']:>8.2f}s{r['baseline_kib'] / 1024:>11.1f} MiB"
            f"{r['peak_kib'] / 1024:>8.1f} MiB"
            f"{(r['peak_kib'] - r['baseline_kib']) / 1024:>10.1f} MiB"
        )
    unguided = results["unguided"]
    for mode in ("guided-streamed", "guided-in-ram"):
        r = results[mode]
        print(
            f"  {mode} / unguided: time x{r['seconds'] / unguided['seconds']:.2f},"
            f" peak RSS x{r['peak_kib'] / unguided['peak_kib']:.3f}"
        )


if __name__ == "__main__":
    main()
