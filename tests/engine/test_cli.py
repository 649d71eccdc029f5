"""The command line: plan, explain, schema, cache maintenance, JSON event lines."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from support import ROOT

from editflow.cli import main

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
    assert [e["type"] for e in events] == [
        "run-start", "pending", "running", "loading", "loaded", "done", "run-end"
    ]  # fmt: skip
    assert {e["schema_version"] for e in events} == {2}
    assert events[0]["message"] == QUICKSTART and "stage" not in events[0]
    assert events[2]["stage"] == "encode" and events[2]["message"] == "never run"
    # The model part a stage's first use loads, announced before and timed after, with the
    # stage whose use loaded it.
    loading, loaded = events[3], events[4]
    assert (loading["stage"], loading["message"]) == ("encode", "vae") and "seconds" not in loading
    assert (loaded["stage"], loaded["kind"], loaded["message"]) == ("encode", "encode.vae", "vae")
    assert loaded["key"] == events[2]["key"] and loaded["seconds"] > 0
    assert events[-1]["message"] == "ok" and events[-1]["seconds"] >= loaded["seconds"]


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
    # Each stage's title is its kind's class name; one vocabulary field reads the same in all.
    titles = {d["properties"]["kind"]["const"]: d["title"] for d in schema["$defs"].values()
              if "kind" in d.get("properties", {})}  # fmt: skip
    assert (
        titles["invert.ddim"] == "InvertDdim" and titles["sample.local_ilvr"] == "SampleLocalIlvr"
    )
    steps = {
        kind: schema["$defs"][title]["properties"]["num_inference_steps"]
        for kind, title in titles.items()
        if "num_inference_steps" in schema["$defs"][title]["properties"]
    }
    assert len(steps) >= 6
    described = {
        json.dumps(field.get("anyOf", [field])[0].get("description")) for field in steps.values()
    }
    assert described == {json.dumps("Denoising steps of the schedule (DDIM steps)")}


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
    code, _, err = _run(capsys, "cache", "--cache", cache, "rm", "ffffffff")
    assert (code, err.strip()) == (2, "cache rm: no entry match 'ffffffff'")
    _, out, _ = _run(capsys, "cache", "--cache", cache, "gc")
    assert out.startswith("removed 0 entries")


def test_run_on_an_fsspec_memory_cache_then_all_hits(tmp_path: Path, capsys) -> None:
    url = f"memory://editflow-cli-{tmp_path.name}"
    argv = ["run", QUICKSTART, "--cache", url, "--out", str(tmp_path / "o"), *FAST, "--log-json"]
    _run(capsys, *argv)
    code, out, _ = _run(capsys, *argv)
    types = [json.loads(line)["type"] for line in out.strip().splitlines()]
    assert code == 0
    assert "running" not in types and "loaded" not in types and "loading" not in types
    assert types.count("cached") == 7
    assert (types[0], types[-1]) == ("run-start", "run-end")


def test_a_stage_error_names_the_stage_exits_2_and_leaves_no_entry(tmp_path: Path, capsys) -> None:
    from editflow.cache import Cache
    from editflow.engine.api import plan_recipe

    # Interpolation between one image: the reference count could hold a batch of two, so the
    # plan cannot tell; the stage can, once its inputs are computed.
    recipe = ROOT / "manifests" / "interpolation" / "photos.toml"
    cache = tmp_path / "cache"
    overrides = [
        'stages.interpolate.latents=["encode_left.latents"]',
        "stages.embeddings.iterations=1",
    ]
    sets = [arg for o in overrides for arg in ("--set", o)]
    argv = ["run", str(recipe), "--cache", str(cache), "--out", str(tmp_path / "o")]
    code, _, err = _run(capsys, *argv, "--target", "interpolate", *sets)
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"{recipe}: stages.interpolate: stage 'interpolate' (sample.interpolate) failed: "
        "stages.interpolate.latents: latents needs exactly two images, got 1"
    )
    plan = plan_recipe(recipe, overrides, cache=Cache(cache))
    assert not Cache(cache).has(plan.stages["interpolate"].key)
    assert Cache(cache).has(plan.stages["encode_left"].key)  # finished stages stay cached
    assert not (tmp_path / "o").exists()


def test_guidance_without_reference_maps_is_refused_before_anything_runs(
    tmp_path: Path, capsys
) -> None:
    recipe = ROOT / "manifests" / "pix2pix_zero" / "custom_sentences.toml"
    text = recipe.read_text().replace('attention_maps = "reference.attention_maps"\n', "")
    edited = tmp_path / "no_maps.toml"
    edited.write_text(text)
    for name in ("cat.txt", "dog.txt"):
        (tmp_path / name).write_text((recipe.parent / name).read_text())
    code, _, err = _run(
        capsys, "run", str(edited), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o")
    )
    lines = text.splitlines()
    line = next(n for n, line in enumerate(lines, 1) if line.strip() == "[stages.guided]")
    assert code == 2
    assert err.strip() == (
        f"{edited}:{line}: stages.guided.attention_maps: xa_guidance is 0.1 but no "
        "attention_maps are connected"
        " (connect a guide.attention_reference stage or set xa_guidance = 0)"
    )
    assert not (tmp_path / "c").exists() and not (tmp_path / "o").exists()


def test_plan_and_explain_name_a_changed_list_input_in_the_same_words(
    tmp_path: Path, capsys
) -> None:
    cache = str(tmp_path / "cache")
    _run(capsys, "run", QUICKSTART, "--cache", cache, "--out", str(tmp_path / "o"), *FAST)
    change = ["--set", "stages.edit.guidance_scale=5"]
    _, out, _ = _run(capsys, "plan", QUICKSTART, "--cache", cache, *FAST, *change)
    assert _plan_lines(out)["figure"].endswith(
        "miss: input 'images' changed upstream (decode_edit)"
    )
    _, out, _ = _run(capsys, "explain", QUICKSTART, "figure", "--cache", cache, *FAST, *change)
    assert out.splitlines()[2:] == ["  input 'images' changed upstream (decode_edit)"]

    fewer = [
        "--set",
        'stages.figure.images=["inputs.photo"]',
        "--set",
        'stages.figure.labels=["in"]',
    ]
    _, out, _ = _run(capsys, "plan", QUICKSTART, "--cache", cache, *FAST, *fewer)
    assert _plan_lines(out)["figure"].endswith(
        "miss: input 'images' now reads 1 references (was 3); params.labels: "
        "['input', 'reconstruction', 'edit: dog'] -> ['in']"
    )


def test_plan_columns_line_up(tmp_path: Path, capsys) -> None:
    _, out, _ = _run(capsys, "plan", QUICKSTART, "--cache", str(tmp_path / "c"), *FAST)
    lines = out.strip().splitlines()
    keys = {line.index(line.split()[2]) for line in lines}
    assert len(keys) == 1, "the key column starts at the same place on every line"


def test_cache_actions_take_the_cache_option_after_the_action_too(tmp_path: Path, capsys) -> None:
    cache = str(tmp_path / "cache")
    out_dir = str(tmp_path / "o")
    _run(capsys, "run", QUICKSTART, "--cache", cache, "--out", out_dir, "--target", "encode")
    _, before, _ = _run(capsys, "cache", "--cache", cache, "ls")
    code, after, _ = _run(capsys, "cache", "ls", "--cache", cache)
    assert code == 0 and after == before and "encode.vae" in after
    code, out, _ = _run(capsys, "cache", "du", "--cache", cache)
    assert code == 0 and out.startswith("1 entries, ")


def test_cache_rm_wants_a_unique_prefix_of_8_characters_or_all(tmp_path: Path, capsys) -> None:
    cache = str(tmp_path / "cache")
    _run(capsys, "run", QUICKSTART, "--cache", cache, "--out", str(tmp_path / "o"), "--target",
         "invert", *FAST)  # fmt: skip
    _, out, _ = _run(capsys, "cache", "ls", "--cache", cache)
    first = out.split()[0]
    code, _, err = _run(capsys, "cache", "rm", first[:1], "--cache", cache)
    assert code == 2
    assert err.strip() == (
        f"cache rm: key prefix '{first[0]}' is shorter than 8 characters "
        "(give a longer prefix (see 'editflow cache ls'), or --all to remove every entry)"
    )
    code, _, err = _run(capsys, "cache", "rm", "--cache", cache)
    assert (code, err.strip()) == (2, "cache rm: give entry keys or --all (not both)")
    _, out, _ = _run(capsys, "cache", "rm", first[:8], "--cache", cache)
    assert out.strip() == "removed 1 entries"
    _, out, _ = _run(capsys, "cache", "rm", "--all", "--cache", cache)
    assert out.strip() == "removed 1 entries"
    _, out, _ = _run(capsys, "cache", "ls", "--cache", cache)
    assert out.strip() == "the cache is empty"


def test_cache_ls_columns_line_up_with_long_stage_names(tmp_path: Path, capsys) -> None:
    long_name = "encode_the_photograph_of_the_cat_with_the_vae"
    text = Path(QUICKSTART).read_text().replace("[stages.encode]", f"[stages.{long_name}]")
    text = text.replace('"encode.latents"', f'"{long_name}.latents"')
    recipe = tmp_path / "long.toml"
    recipe.write_text(text)
    cache = str(tmp_path / "cache")
    _run(capsys, "run", str(recipe), "--cache", cache, "--out", str(tmp_path / "o"), "--target",
         "invert", *FAST)  # fmt: skip
    _, out, _ = _run(capsys, "cache", "ls", "--cache", cache)
    lines = out.strip().splitlines()
    assert len(lines) == 2
    sizes = {line.index(" KiB") for line in lines}
    assert len(sizes) == 1, f"the size column is aligned:\n{out}"


def test_last_run_records_follow_the_recipe_inside_its_repository(tmp_path: Path, capsys) -> None:
    """A fresh clone (another absolute path) sharing the cache knows what ran before."""
    cache = str(tmp_path / "cache")
    clones = []
    for name in ("developer", "ci"):
        clone = tmp_path / name / "repo"
        (clone / ".git").mkdir(parents=True)
        (clone / "recipes").mkdir()
        (clone / "recipes" / "quick.toml").write_text(Path(QUICKSTART).read_text())
        clones.append(clone / "recipes" / "quick.toml")
    _run(capsys, "run", str(clones[0]), "--cache", cache, "--out", str(tmp_path / "o"), *FAST)
    _, out, _ = _run(
        capsys, "plan", str(clones[1]), "--cache", cache, *FAST,
        "--set", "stages.edit.guidance_scale=5",
    )  # fmt: skip
    assert _plan_lines(out)["edit"].endswith("miss: params.guidance_scale: 3.0 -> 5.0")


@pytest.mark.parametrize("delay", [1.5, 3.0, 4.5])
def test_ctrl_c_prints_one_line_and_exits_130(tmp_path: Path, delay: float) -> None:
    """Interrupted while importing, planning or computing: never a traceback."""
    import os
    import signal
    import subprocess
    import sys
    import time

    steps = [f"stages.{n}.num_inference_steps=400" for n in ("invert", "reconstruct", "edit")]
    argv = [sys.executable, "-m", "editflow", "run", QUICKSTART, "--cache", str(tmp_path / "c"),
            "--out", str(tmp_path / "o"), *[a for s in steps for a in ("--set", s)]]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # A shell's background job (CI's, say) starts with SIGINT ignored; Ctrl-C reaches a
    # foreground process, so the child gets the default disposition back.
    process = subprocess.Popen(
        argv, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "interrupted"


@pytest.mark.parametrize("converted", [ImportError, RuntimeError, OSError])
def test_ctrl_c_turned_into_a_library_error_still_ends_as_an_interrupt(
    converted: type[Exception], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """numpy met Ctrl-C in its own import and raised "ImportError: PyCapsule_Import could not
    import module datetime" with a traceback (a stress run of 40 interrupts found it)."""
    import os
    import signal

    import editflow.cli

    def command(args: object) -> int:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(10**6):  # the handler runs between two bytecodes of this loop
                pass
        except KeyboardInterrupt:
            raise converted("a library's own words") from None
        raise AssertionError("SIGINT never arrived")

    monkeypatch.setitem(editflow.cli.COMMANDS, "schema", command)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    try:
        assert main(["schema"]) == 130
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert capsys.readouterr().err == "interrupted\n"


def test_an_error_without_ctrl_c_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    import signal

    import editflow.cli

    def command(args: object) -> int:
        raise ImportError("a bug")

    monkeypatch.setitem(editflow.cli.COMMANDS, "schema", command)
    with pytest.raises(ImportError, match="a bug"):
        main(["schema"])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "handler restored"


def test_the_command_skips_pythons_teardown_but_not_exit_handlers_or_threads(
    tmp_path: Path,
) -> None:
    """entry() ends with os._exit once only daemon threads are left: exit handlers libraries
    registered still run, a thread still working is waited for, and the status is kept."""
    import subprocess
    import sys

    script = f"""
import atexit, sys, threading, time
atexit.register(lambda: print("exit handler ran", flush=True))
def late():
    time.sleep(3)  # still working when the command is done
    print("thread finished", flush=True)
if sys.argv[1] == "thread":
    threading.Thread(target=late).start()
sys.argv = ["editflow", "validate", {QUICKSTART!r}, "--cache", {str(tmp_path / "c")!r}]
from editflow.__main__ import entry
entry()
"""
    for case in ("plain", "thread"):
        done = subprocess.run([sys.executable, "-c", script, case], capture_output=True,
                              text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert "quickstart.toml: ok" in lines[0] and lines[-1] == "exit handler ran", lines
        assert ("thread finished" in lines) == (case == "thread"), lines
    bad = subprocess.run([sys.executable, "-m", "editflow", "validate", str(tmp_path / "none.toml")],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.strip().endswith("recipe file not found")


def test_output_into_a_closed_pipe_ends_quietly() -> None:
    """`editflow schema | head -1`: the reader leaves early; no traceback, exit 0."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write
    try:
        process = subprocess.run(
            [sys.executable, "-m", "editflow", "schema"], stdout=write_end,
            stderr=subprocess.PIPE, text=True, timeout=120,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert process.returncode == 0, process.stderr
    assert "Traceback" not in process.stderr
