"""Benchmark pix2pix-zero's cross-attention guided edit against an unguided edit (tiny model).

Prints and records:

- the size of the reference attention maps per step and for the whole run, as editflow
  stores them (conditional half, fp16) and as the released code holds them (both CFG halves,
  fp32), measured on the tiny model and projected for SD 1.x at 512 px (16 cross-attention
  layers, 8 heads, 77 tokens, 5 layers each at 64/32/16 px latents and 1 at 8 px);
- three edits from the same x_T, interleaved in one process (A B C, C B A, ... through
  ``harness.compare_many``): ``unguided`` (xa_guidance 0), ``guided-streamed`` (maps read
  back from editflow's zarr cache one step at a time, as the engine streams them: a fresh
  reader per edit) and ``guided-in-ram`` (every step's maps held in memory before the edits,
  as the released code keeps them: fp32, both CFG halves); wall and CPU time and the peak
  growth of resident memory of each edit over where it started;
- the ratios to the unguided edit, and the held maps' size, which the in-RAM edit keeps on
  top of its own growth.

Memory: before each edit freed heap memory is handed back (``malloc_trim``) and the kernel's
peak-RSS mark is reset (``/proc/self/clear_refs``); the growth is the mark after the edit
minus the RSS before it: the edit's own transient memory (the guided edit's autograd graph
through the UNet), which a whole-process peak, dominated by imports and the model, hides.

Run: ``python bench/bench_pix2pix_zero.py [--steps 50] [--size 64] [--threads 1]
[--pairs 5]``. ``--size`` is the image size in pixels (latents are size / 8). The tiny
model is built on first use under ``$EDITFLOW_MODELS`` (default ``~/.cache/editflow/models``).
Writes bench/results/bench_pix2pix_zero.json.
"""

from __future__ import annotations

from quiet import quiet

quiet()  # before diffusers and transformers are imported

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMInverseScheduler, DDIMScheduler, UNet2DConditionModel
from harness import (
    command_line,
    compare_many,
    format_comparison,
    measure,
    ratio_of,
    write_results,
)
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
# The edits


def edits(workdir: Path, folder: Path, steps: int) -> tuple[dict, float]:
    """One call per mode (each does one whole edit), and the MiB of the maps held in RAM."""
    unet, config = load(folder)
    inputs = torch.load(workdir / "inputs.pt", weights_only=True)
    x_T, caption = inputs["x_T"], inputs["caption"]
    edit_embeds = caption + inputs["direction"]
    names = inputs["layer_names"]
    entry = Cache(workdir / "cache").get(MAPS_KEY)

    def read_step(i: int) -> dict[str, torch.Tensor]:
        """One step of every layer, read from its chunk in the cache."""
        return {name: entry.step(f"layer{k}", i) for k, name in enumerate(names)}

    def run(mode: str, reference_maps) -> None:
        scheduler = DDIMScheduler.from_config(config)
        scheduler.set_timesteps(steps)
        with install_attention_recorder(unet) as recorder:
            predict = unet_noise_predictor(unet)
            guided_edit(
                predict, x_T, scheduler, edit_embeds, caption,
                predict_maps=recorder.predictor(predict), reference_maps=reference_maps,
                xa_guidance=0.0 if mode == "unguided" else 0.1,
            )  # fmt: skip

    # The released layout: every step, fp32, both CFG halves (the unconditional half is the
    # caption's too, so a copy of the conditional one has the right size).
    held = [{k: torch.cat([m, m]).float() for k, m in read_step(i).items()} for i in range(steps)]
    held_mib = sum(m.numel() * m.element_size() for step in held for m in step.values()) / MIB

    def in_ram(i: int) -> dict[str, torch.Tensor]:
        return {k: m[: len(m) // 2] for k, m in held[i].items()}

    def streamed() -> None:
        maps = CachedSteps(Cache(workdir / "cache"), MAPS_KEY, "attention_maps")
        run("guided-streamed", lambda i: maps[i])  # a fresh reader per edit, as each run

    calls = {
        "unguided": lambda: measure(lambda: run("unguided", in_ram)),
        "guided-streamed": lambda: measure(streamed),
        "guided-in-ram": lambda: measure(lambda: run("guided-in-ram", in_ram)),
    }
    return calls, held_mib


# ------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=64, help="image size in pixels")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=5, help="timed edits of each mode")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = ensure_tiny(models_dir())

    with tempfile.TemporaryDirectory(prefix="bench-p2pz-") as tmp:
        workdir = Path(tmp)
        shapes = prepare(workdir, folder, args.steps, args.size)
        calls, held_mib = edits(workdir, folder, args.steps)
        result = compare_many(calls, rounds=args.pairs)

    per_step = sum(torch.Size(shape).numel() for shape in shapes.values())
    sd_per_step = sd15_map_elements_per_step()
    what = (
        f"pix2pix-zero guided edit, tiny model, {args.size} px, {args.steps} steps, "
        f"{args.threads} thread(s)"
    )
    print(what)
    print("\nreference cross-attention maps")
    print(f"  tiny layers: {len(shapes)}: " + ", ".join(f"{tuple(s)}" for s in shapes.values()))
    print(f"  {'':50}{'per step':>14}{'whole run':>14}")
    sizes = {}
    for label, elements in (("tiny", per_step), ("SD 1.x 512 px (projected)", sd_per_step)):
        for layout, factor in (("editflow (cond, fp16)", 2), ("released (both, fp32)", 8)):
            step_bytes = elements * factor
            sizes[f"{label}, {layout}"] = {
                "MiB per step": step_bytes / MIB,
                "MiB per run": step_bytes * args.steps / MIB,
            }
            print(
                f"  {label:>26}: {layout:<22}{step_bytes / MIB:>10.2f} MiB"
                f"{step_bytes * args.steps / MIB:>10.1f} MiB"
            )
    print(
        "  SD 1.x: 16 layers, 8 heads, 77 tokens, 5 layers at each of 64/32/16 px, 1 at 8 px:"
        f" {sd_per_step:,} elements per step and CFG half"
    )
    print("\nedits from the same x_T, interleaved; peak = growth of resident memory over the edit")
    print(format_comparison(result, unit="s"))
    streamed = ratio_of(result, "guided-in-ram", "guided-streamed")
    result["ratio guided-streamed / guided-in-ram"] = streamed
    print(
        f"  guided-streamed / guided-in-ram: wall {streamed['wall']['median']:.3f}x"
        f" ({streamed['wall']['min']:.3f}-{streamed['wall']['max']:.3f}), cpu"
        f" {streamed['cpu']['median']:.3f}x (target <= 1.05x)"
    )
    print(f"  guided-in-ram also holds its maps: {held_mib:.1f} MiB (fp32, both halves)")
    result.update(what=what, **{"held maps MiB (guided-in-ram)": held_mib, "map sizes": sizes})
    print(write_results("bench_pix2pix_zero", {"edits": result}, command=command_line()))


if __name__ == "__main__":
    main()
