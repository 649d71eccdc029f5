"""The Python API (editflow.run, plan, validate, explain): its docstring and docs/python.md
run as doctests, and what a notebook user meets besides."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest
from support import MANIFESTS, ROOT

import editflow
from editflow.errors import EditflowError

QUICKSTART = MANIFESTS / "quickstart.toml"
FAST = {f"stages.{name}.num_inference_steps": 2 for name in ("invert", "reconstruct", "edit")}


def _globs(tmp_path: Path) -> dict:
    return {"QUICKSTART": QUICKSTART, "FAST": FAST, "CACHE": tmp_path / "cache"}


def test_the_api_docstring_runs(tmp_path: Path) -> None:
    from editflow import api

    failures, tried = doctest.testmod(
        api, extraglobs=_globs(tmp_path), optionflags=doctest.ELLIPSIS
    )
    assert tried >= 6 and failures == 0


def test_the_python_docs_page_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a string recipe stands for recipe.toml in the working folder
    failures, tried = doctest.testfile(
        str(ROOT / "docs" / "python.md"), module_relative=False, globs=_globs(tmp_path),
        optionflags=doctest.ELLIPSIS,
    )  # fmt: skip
    assert tried >= 12 and failures == 0


def test_import_editflow_loads_no_engine_until_asked() -> None:
    import subprocess
    import sys

    code = ("import sys, editflow; print('editflow.engine' in sys.modules);"
            " editflow.run; print('editflow.engine.api' in sys.modules)")  # fmt: skip
    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout.split()  # fmt: skip
    assert lines == ["False", "False"]  # run is looked up, nothing is planned yet


def test_a_dict_recipe_and_its_errors(tmp_path: Path) -> None:
    with pytest.raises(EditflowError) as error:
        editflow.run({"schema_version": 1, "stages": {"x": {"kind": "nope"}}},
                     cache=tmp_path / "c", progress=False)  # fmt: skip
    assert "stages.x: unknown kind 'nope'" in error.value.render()
    with pytest.raises(EditflowError) as error:
        editflow.plan("schema_version = 1\n[stages\n", cache=tmp_path / "c")
    assert error.value.render().startswith("<recipe string>: not a TOML recipe: ")


def test_outputs_are_named_and_a_wrong_name_says_what_there_is(tmp_path: Path) -> None:
    result = editflow.run(QUICKSTART, set=FAST, cache=tmp_path / "c", targets=["invert"],
                          progress=False)  # fmt: skip
    assert result.stages == ["encode", "invert"]
    invert = result["invert"]
    assert invert["latents"].shape == (1, 4, 8, 8)
    with pytest.raises(KeyError, match="has no output 'noise'; its outputs: latents, trajectory"):
        invert["noise"]
    with pytest.raises(KeyError, match="no stage 'edit' ran; the stages: encode, invert"):
        result["edit"]
    with pytest.raises(KeyError, match="outputs that are a tensor: name one of"):
        invert.tensor()
