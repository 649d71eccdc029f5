"""What measuring a sweep costs: a trade-off recipe with its metric stages, tables and plots
against the same sweep without them (issue #27: metrics at most 5% of the sweep they measure).

Three sides run the recipe's whole ``[sweep]`` in process on a fresh cache each time (every
stage computed), with the models each side needs already loaded (its own warm registry),
interleaved (A B C, C B A, ...): the sweep without its ``metric.*`` stages, tables and plots;
with its metric stages; and with the metric stages, tables and plots (the recipe as it is).
The one-time cost of loading the metric networks (tiny CLIP and LPIPS) is reported apart,
from the first run of each side. ``--set`` overrides apply to every side: the committed
recipes are sized for the test suite (32 px, a few steps), where any fixed cost looms large.

    python bench/bench_metrics.py [--recipe manifests/edit_friendly/tradeoff.toml] [--pairs 5]
        [--set stages.invert.num_inference_steps=50 ...]

Writes bench/results/bench_metrics.json.
"""

from __future__ import annotations

from quiet import quiet

quiet()  # before diffusers and transformers are imported

import argparse
import copy
import re
import tempfile
import tomllib
from pathlib import Path

import tomli_w
import torch
from harness import command_line, compare_many, format_comparison, measure, write_results

ROOT = Path(__file__).resolve().parents[1]


def variant(document: dict, folder: Path, *, metrics: bool, tables: bool) -> dict:
    """The recipe with or without its metric stages and its tables and plots; input files made
    absolute so the copy can live elsewhere."""
    copied = copy.deepcopy(document)
    if not metrics:
        copied["stages"] = {
            name: stage
            for name, stage in document["stages"].items()
            if not str(stage.get("kind", "")).startswith("metric.")
        }
    if not tables:
        copied.pop("tables", None)
        copied.pop("plots", None)
    for section in copied.get("inputs", {}).values():
        for field, value in section.items():
            if isinstance(value, str) and field in ("image", "mask", "text", "keypoints"):
                if not value.startswith("skimage:"):
                    section[field] = str((folder / value).resolve())
    return copied


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--recipe", type=Path, default=ROOT / "manifests/edit_friendly/tradeoff.toml"
    )
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    torch.set_num_threads(1)

    from editflow.cache import Cache
    from editflow.cli.sweeps import run_sweep, table_axes

    recipe = args.recipe.resolve()
    document = tomllib.loads(recipe.read_text())
    metric_stages = sorted(
        name for name, stage in document["stages"].items() if stage["kind"].startswith("metric.")
    )
    sides = {
        "sweep without metrics": (False, False),
        "with its metric stages": (True, False),
        "with metric stages, tables and plots": (True, True),
    }
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        registries: dict[str, object] = {}
        runs = iter(range(10**6))

        def sweep(side: str, metrics: bool, tables: bool):
            path = work / f"side{len(registries)}-{recipe.name}"
            registries[side] = None
            copied = variant(document, recipe.parent, metrics=metrics, tables=tables)
            path.write_text(tomli_w.dumps(copied))
            axes = table_axes(copied)

            def once() -> None:
                folder = work / f"run{next(runs)}"
                result = run_sweep(
                    path, axes, cache=Cache(str(folder / "cache")), out_root=folder / "out",
                    device="cpu", registry=registries[side], threads=1,
                    overrides=args.overrides,
                )  # fmt: skip
                registries[side] = result.outcomes[-1].registry

            return lambda: measure(once)

        calls = {side: sweep(side, *flags) for side, flags in sides.items()}
        first = {side: call().wall for side, call in calls.items()}  # loads each side's models
        result = compare_many(calls, rounds=args.pairs, warmup=0)
    result["what"] = (
        f"{recipe.relative_to(ROOT)} {' '.join('--set ' + o for o in args.overrides)}: its"
        f" [sweep] on a fresh cache each run, models loaded (each side its own); metric"
        f" stages: {', '.join(metric_stages)}; target: metric stages <= 1.05x"
    )
    result["first runs (model loads included), wall s"] = first
    print(result["what"])
    print(format_comparison(result, unit="s"))
    print("first runs, loading models: " + ", ".join(f"{k} {v:.2f} s" for k, v in first.items()))
    # One results file per setting: bench_metrics.json, bench_metrics-<values set>.json.
    values = "-".join(override.partition("=")[2] for override in args.overrides)
    name = "bench_metrics" + ("-" + re.sub(r"[^A-Za-z0-9.]+", "_", values)[:40] if values else "")
    print(write_results(name, {"metrics in a sweep": result}, command=command_line()))


if __name__ == "__main__":
    main()
