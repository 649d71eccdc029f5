"""The command line: plan, explain, schema, cache maintenance, JSON event lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import ROOT

from editflow.engine.cli import main

QUICKSTART = str(ROOT / "manifests" / "quickstart.toml")
FAST = [
    "--set", "stages.invert.num_inference_steps=3",
    "--set", "stages.reconstruct.num_inference_steps=3",
    "--set", "stages.edit.num_inference_steps=3",
]  # fmt: skip


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _plan_lines(out: str) -> dict[str, str]:
    return {line.split()[0]: line for line in out.strip().splitlines()}


def test_plan_shows_misses_with_reasons_then_hits(tmp_path: Path, capsys) -> None:
    cache = str(tmp_path / "cache")
    code, out, _ = _run(capsys, "plan", QUICKSTART, "--cache", cache, *FAST)
    assert code == 0
    assert all(line.endswith("miss: never run") for line in _plan_lines(out).values())
    assert not (tmp_path / "cache").exists(), "plan writes nothing"

    code, _, _ = _run(
        capsys, "run", QUICKSTART, "--cache", cache, "--out", str(tmp_path / "o"), *FAST
    )
    assert code == 0
    _, out, _ = _run(capsys, "plan", QUICKSTART, "--cache", cache, *FAST)
    assert all(line.endswith("hit") for line in _plan_lines(out).values())

    _, out, _ = _run(
        capsys, "plan", QUICKSTART, "--cache", cache, *FAST,
        "--set", "stages.edit.guidance_scale=5", "--target", "decode_edit",
    )  # fmt: skip
    lines = _plan_lines(out)
    assert lines["edit"].endswith("miss: params.guidance_scale: 3.0 -> 5.0")
    assert lines["decode_edit"].endswith("miss: input 'latents' changed upstream (edit)")
    assert lines["invert"].endswith("hit")
    assert lines["figure"].endswith("skip (not needed by the targets)")


def test_explain_lists_the_changed_preimage_fields(tmp_path: Path, capsys) -> None:
    cache = str(tmp_path / "cache")
    _run(capsys, "run", QUICKSTART, "--cache", cache, "--out", str(tmp_path / "o"), *FAST)
    code, out, _ = _run(
        capsys, "explain", QUICKSTART, "edit", "--cache", cache, *FAST,
        "--set", "stages.edit.prompt=a photo of a horse",
    )  # fmt: skip
    assert code == 0
    assert "  params.prompt: 'a photo of a dog' -> 'a photo of a horse'" in out.splitlines()
    _, out, _ = _run(capsys, "explain", QUICKSTART, "edit", "--cache", cache, *FAST)
    assert "unchanged since the last run (entry present)" in out


def test_log_json_emits_one_event_per_line(tmp_path: Path, capsys) -> None:
    code, out, _ = _run(
        capsys, "run", QUICKSTART, "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o"),
        "--log-json", "--target", "encode",
    )  # fmt: skip
    assert code == 0
    events = [json.loads(line) for line in out.strip().splitlines()]
    assert [e["type"] for e in events] == ["pending", "running", "loaded", "done"]
    assert events[1]["stage"] == "encode" and events[1]["message"] == "never run"
    assert events[2]["message"] == "vae"


def test_schema_is_json_schema_with_every_stage_kind(capsys) -> None:
    code, out, _ = _run(capsys, "schema")
    assert code == 0
    schema = json.loads(out)
    assert schema["title"] == "editflow recipe"
    kinds = {
        definition["properties"]["kind"]["const"]
        for definition in schema["$defs"].values()
        if "kind" in definition.get("properties", {})
    }
    assert {"encode.vae", "invert.ddim", "sample.ddim", "decode.vae", "figure.grid"} <= kinds


def test_cache_commands_list_measure_verify_and_remove(tmp_path: Path, capsys) -> None:
    cache = str(tmp_path / "cache")
    _run(
        capsys,
        "run",
        QUICKSTART,
        "--cache",
        cache,
        "--out",
        str(tmp_path / "o"),
        "--target",
        "encode",
    )
    _, out, _ = _run(capsys, "cache", "--cache", cache, "ls")
    [line] = out.strip().splitlines()
    assert "encode.vae" in line and "encode" in line
    key_prefix = line.split()[0]
    _, out, _ = _run(capsys, "cache", "--cache", cache, "du")
    assert out.startswith("1 entries, ")
    code, out, _ = _run(capsys, "cache", "--cache", cache, "verify")
    assert (code, out.strip()) == (0, "all entries intact")
    _, out, _ = _run(capsys, "cache", "--cache", cache, "rm", key_prefix)
    assert out.strip() == "removed 1 entries"
    code, _, err = _run(capsys, "cache", "--cache", cache, "rm", "ffff")
    assert (code, err.strip()) == (2, "cache rm: no entry match 'ffff'")
    _, out, _ = _run(capsys, "cache", "--cache", cache, "gc")
    assert out.startswith("removed 0 entries")


def test_run_on_an_fsspec_memory_cache_then_all_hits(tmp_path: Path, capsys) -> None:
    url = f"memory://editflow-cli-{tmp_path.name}"
    argv = ["run", QUICKSTART, "--cache", url, "--out", str(tmp_path / "o"), *FAST, "--log-json"]
    _run(capsys, *argv)
    code, out, _ = _run(capsys, *argv)
    types = [json.loads(line)["type"] for line in out.strip().splitlines()]
    assert code == 0
    assert "running" not in types and "loaded" not in types
    assert types.count("cached") == 7


def test_a_stage_error_names_the_stage_exits_2_and_leaves_no_entry(tmp_path: Path, capsys) -> None:
    from editflow.cache import Cache
    from editflow.engine.api import plan_recipe

    recipe = str(ROOT / "manifests" / "pix2pix_zero" / "custom_sentences.toml")
    cache = tmp_path / "cache"
    argv = [
        "run",
        recipe,
        "--cache",
        str(cache),
        "--out",
        str(tmp_path / "o"),
        "--target",
        "guided",
    ]
    overrides = [f"stages.{n}.num_inference_steps=2" for n in ("invert", "reference", "guided")]
    overrides.append("stages.invert.regularize_rounds=1")
    sets = [arg for o in overrides for arg in ("--set", o)]
    # Drop the reference maps from the guided edit: the stage itself finds the problem.
    text = Path(recipe).read_text().replace('attention_maps = "reference.attention_maps"\n', "")
    edited = tmp_path / "no_maps.toml"
    edited.write_text(text)
    for name in ("cat.txt", "dog.txt"):
        (tmp_path / name).write_text((Path(recipe).parent / name).read_text())
    argv[1] = str(edited)
    code, _, err = _run(capsys, *argv, *sets)
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"{edited}: stages.guided: stage 'guided' (sample.pix2pix_zero) failed: "
        "stages.guided.attention_maps: xa_guidance is 0.1 but no attention_maps are connected "
        "(connect a guide.attention_reference stage or set xa_guidance = 0)"
    )
    plan = plan_recipe(edited, overrides, cache=Cache(cache))
    assert not Cache(cache).has(plan.stages["guided"].key)
    assert Cache(cache).has(plan.stages["invert"].key)  # finished stages stay cached
    assert not (tmp_path / "o").exists()
