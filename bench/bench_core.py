"""Core benchmarks: engine overhead, all-hit reruns, model load, process start (tiny model).

1. Engine overhead: ``run_recipe`` of the quick start's encode, DDIM inversion, DDIM
   sampling (guidance 1), decode and PNG export on a cold cache (plan, keys, cache entries,
   records, the export), against the same steps as a plain diffusers loop that also writes
   the PNG; the models are loaded once and shared. ABBA pairs: wall, CPU, memory growth.
2. All-hit rerun against a cold run, ``--rerun-steps`` steps: the cold run on a fresh cache
   with its own model load (imports done: in process), the rerun on a cache that holds every
   entry. ABBA pairs (targets: rerun <= 2% of cold at 10 steps, <= 30 ms).
3. Model load alone (tiny, all four parts, fresh registry): repeated.
4. Process start (``python -m editflow --version``): repeated.

    python bench/bench_core.py [--steps 50] [--rerun-steps 10] [--pairs 5]

Cache throughput has its own benchmark, ``bench_cache.py``. Writes bench/results/bench_core.json.
"""

from __future__ import annotations

from quiet import quiet

quiet()  # before diffusers and transformers are imported

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
from harness import (
    command_line,
    compare,
    format_comparison,
    format_series,
    measure,
    measure_command,
    series,
    write_results,
)
from roundtrip import components_of, counter, forget_prompts, plain_round_trip
from support import models_dir, warm_guest_memory

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "manifests" / "quickstart.toml"


def _overrides(steps: int) -> list[str]:
    return [
        f"stages.invert.num_inference_steps={steps}",
        f"stages.reconstruct.num_inference_steps={steps}",
    ]


def bench_overhead(steps: int, pairs: int, work: Path) -> dict:
    from editflow.cache import Cache
    from editflow.engine.api import models_dir_for, plan_recipe, run_recipe
    from editflow.files.inputs import load_input
    from editflow.models import RunModels

    cache = Cache(work / "plan")
    plan = plan_recipe(QUICKSTART, _overrides(steps), cache=cache)
    models = RunModels(
        plan.models, device=torch.device("cpu"), dtype=torch.float32,
        models_dir=models_dir_for(cache),
    )  # fmt: skip
    components = components_of(models)  # the engine runs share these loaded parts
    image = load_input(plan.inputs["photo"])
    prompt = plan.stages["invert"].params.prompt
    runs = counter()

    def plain() -> None:
        n = runs()
        (work / f"plain{n}").mkdir()
        plain_round_trip(components, image, prompt, steps, work / f"plain{n}" / "decode.png")

    def engine() -> None:
        n = runs()
        forget_prompts()  # a cold run encodes its prompts (the models are shared)
        run_recipe(
            QUICKSTART, _overrides(steps), cache=Cache(work / f"cold{n}"),
            out_dir=work / f"out{n}", device="cpu", registry=models,
            targets=["decode_reconstruction"],
        )  # fmt: skip

    result = compare(
        "plain diffusers loop + PNG", lambda: measure(plain),
        "run_recipe, cold cache, export", lambda: measure(engine),
        pairs=pairs,
    )  # fmt: skip
    result["what"] = f"tiny, 64 px, {steps}+{steps} DDIM steps, guidance 1, models shared"
    print(f"engine overhead: {result['what']}")
    print(format_comparison(result))
    return result


def bench_model_load(repeats: int, work: Path) -> dict:
    from editflow.cache import Cache
    from editflow.engine.api import models_dir_for, plan_recipe
    from editflow.models import RunModels

    cache = Cache(work / "plan")
    plan = plan_recipe(QUICKSTART, [], cache=cache)

    def load() -> None:
        models = RunModels(
            plan.models, device=torch.device("cpu"), dtype=torch.float32,
            models_dir=models_dir_for(cache),
        )  # fmt: skip
        components_of(models)

    result = series("model load (tiny, 4 parts)", lambda: measure(load), repeats=repeats)
    print("model load, fresh registry (imports done):")
    print(format_series(result))
    return result


def bench_rerun(steps: int, pairs: int, work: Path) -> dict:
    from editflow.cache import Cache
    from editflow.engine.api import run_recipe
    from editflow.engine.events import CollectEvents

    runs = counter()
    loads = {"cold": [], "hit": []}
    warm = Cache(work / "rerun")

    def run(cache: Cache, out: Path, side: str) -> None:
        events = CollectEvents()
        run_recipe(QUICKSTART, _overrides(steps), cache=cache, out_dir=out, device="cpu",
                   events=events)  # fmt: skip
        loads[side].append(len(events.of("loaded")))

    def cold() -> None:
        n = runs()
        run(Cache(work / f"rerun-cold{n}"), work / f"rerun-out{n}", "cold")

    def hit() -> None:
        run(warm, work / "rerun-out", "hit")

    hit()  # fills the warm cache (and its output folder): every later call is all hits
    result = compare(
        "cold run (fresh cache, model load)", lambda: measure(cold),
        "all-hit rerun", lambda: measure(hit), pairs=pairs,
    )  # fmt: skip
    result["model loads per run"] = {side: values[-pairs:] for side, values in loads.items()}
    result["what"] = f"quick start, tiny, 64 px, {steps} steps, in process, imports done"
    print(f"all-hit rerun vs cold run: {result['what']}")
    print(format_comparison(result))
    print(f"  model loads: cold {loads['cold'][-1]}, all-hit {loads['hit'][-1]}")
    return result


def bench_process_start(repeats: int) -> dict:
    argv = [sys.executable, "-m", "editflow", "--version"]
    result = series("python -m editflow --version", lambda: measure_command(argv),
                    repeats=repeats)  # fmt: skip
    print("process start:")
    print(format_series(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=50, help="steps of the overhead run")
    parser.add_argument("--rerun-steps", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (1 keeps shared 2-core machines from oversubscribing)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warm_guest_memory(4.0)  # see support.warm_guest_memory
    torch.manual_seed(0)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        os.environ.setdefault("EDITFLOW_MODELS", str(models_dir()))  # built once
        results["overhead"] = bench_overhead(args.steps, args.pairs, work)
        results["rerun"] = bench_rerun(args.rerun_steps, args.pairs, work)
        results["model_load"] = bench_model_load(args.pairs, work)
        results["process_start"] = bench_process_start(args.pairs)
    print(write_results("bench_core", results, command=command_line()))


if __name__ == "__main__":
    main()
