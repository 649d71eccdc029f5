"""Core benchmarks: engine overhead, all-hit reruns, process start. Prints ratios.

Cache throughput has its own benchmark, ``bench_cache.py``: measured here after the runs, it
came out about three times slower than alone, for a cause not pinned down.

    python bench/bench_core.py [--steps 50] [--repeats 5]

Every ratio is measured within one run of this script (these machines are shared and
noisy); nothing here asserts a time.
"""

from __future__ import annotations

from quiet import quiet

quiet()  # before diffusers and transformers are imported

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from support import warm_guest_memory

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "manifests" / "quickstart.toml"


def _overrides(steps: int) -> list[str]:
    return [
        f"stages.invert.num_inference_steps={steps}",
        f"stages.reconstruct.num_inference_steps={steps}",
    ]


@torch.no_grad()
def plain_round_trip(
    components: dict, image: torch.Tensor, prompt: str, steps: int
) -> torch.Tensor:
    """encode -> DDIM invert -> DDIM sample -> decode, written directly against diffusers."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    vae, unet = components["vae"], components["unet"]
    tokenizer, text_encoder = components["tokenizer"], components["text_encoder"]
    config = components["scheduler_config"]
    x = vae.encode(image * 2 - 1).latent_dist.mean * vae.config.scaling_factor
    ids = tokenizer(
        [prompt], padding="max_length", max_length=tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    ).input_ids  # fmt: skip
    embeds = text_encoder(ids)[0]
    inverse = DDIMInverseScheduler.from_config(config)
    inverse.set_timesteps(steps)
    for t in inverse.timesteps:
        x = inverse.step(unet(x, t, encoder_hidden_states=embeds).sample, t, x).prev_sample
    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t, encoder_hidden_states=embeds).sample, t, x).prev_sample
    return vae.decode(x / vae.config.scaling_factor).sample


def bench_overhead(steps: int, repeats: int, work: Path) -> None:
    from editflow.cache import Cache
    from editflow.engine.api import models_dir_for, plan_recipe, run_recipe
    from editflow.files.inputs import load_input
    from editflow.models import RunModels

    cache = Cache(work / "warm")
    plan = plan_recipe(QUICKSTART, _overrides(steps), cache=cache)
    started = time.perf_counter()
    models = RunModels(
        plan.models, device=torch.device("cpu"), dtype=torch.float32,
        models_dir=models_dir_for(cache),
    )  # fmt: skip
    registry = models.registry("model.id")  # the engine runs share these loaded parts
    components = {name: registry.get(name) for name in ("vae", "unet", "tokenizer", "text_encoder")}
    components["scheduler_config"] = dict(registry.scheduler_config)
    load_seconds = time.perf_counter() - started
    image = load_input(plan.inputs["photo"])
    prompt = plan.stages["invert"].params.prompt

    plain_round_trip(components, image, prompt, 2)  # warm-up of kernels, not timed
    engine_times, plain_times = [], []
    for repeat in range(repeats):
        started = time.perf_counter()
        plain_round_trip(components, image, prompt, steps)
        plain_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        run_recipe(
            QUICKSTART, _overrides(steps), cache=Cache(work / f"cold{repeat}"),
            out_dir=work / f"out{repeat}", device="cpu", registry=models,
            targets=["decode_reconstruction"],
        )  # fmt: skip
        engine_times.append(time.perf_counter() - started)
    plain, engine = statistics.median(plain_times), statistics.median(engine_times)
    print(f"round trip, tiny, 64 px, {steps}+{steps} DDIM steps, {repeats} alternating runs:")
    print(
        f"  plain diffusers loop      median {plain * 1000:7.1f} ms  min {min(plain_times) * 1000:7.1f} ms"
    )
    print(
        f"  editflow run (cold cache) median {engine * 1000:7.1f} ms  min {min(engine_times) * 1000:7.1f} ms"
    )
    print(
        f"  ratio median {engine / plain:.3f}x, min {min(engine_times) / min(plain_times):.3f}x"
        f"  (fixed overhead ~{(min(engine_times) - min(plain_times)) * 1000:.0f} ms per run)"
    )
    print(f"  model load (separate)     {load_seconds * 1000:8.1f} ms")


def bench_rerun(steps: int, work: Path) -> None:
    from editflow.cache import Cache
    from editflow.engine.api import run_recipe
    from editflow.engine.events import CollectEvents

    cache = Cache(work / "rerun")
    timings, loads = [], []
    for _ in range(2):
        events = CollectEvents()
        started = time.perf_counter()
        run_recipe(
            QUICKSTART, _overrides(steps), cache=cache, out_dir=work / "rerun-out",
            device="cpu", events=events,
        )  # fmt: skip
        timings.append(time.perf_counter() - started)
        loads.append(len(events.of("loaded")))
    cold, warm = timings
    print(f"quickstart ({steps} steps), cold run incl. model load vs all-hit rerun:")
    print(f"  cold {cold * 1000:8.1f} ms ({loads[0]} model loads)")
    print(
        f"  hit  {warm * 1000:8.1f} ms ({loads[1]} model loads)   {100 * warm / cold:.2f}% of cold"
    )


def bench_process_start() -> None:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "editflow", "--version"], check=True, capture_output=True)
    print(
        f"process start (python -m editflow --version): {(time.perf_counter() - started) * 1000:.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (1 keeps shared 2-core machines from oversubscribing)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warm_guest_memory(4.0)  # see support.warm_guest_memory
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        os.environ.setdefault("EDITFLOW_MODELS", str(work / "models"))
        bench_overhead(args.steps, args.repeats, work)
        bench_rerun(args.steps, work)
        bench_process_start()


if __name__ == "__main__":
    main()
