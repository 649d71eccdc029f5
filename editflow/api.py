"""editflow from Python (a notebook, a script): run, plan, validate and explain a recipe
given as a path, a TOML string or a dict, and read each stage's outputs by name.

    >>> import editflow
    >>> result = editflow.run(QUICKSTART, set=FAST, cache=CACHE, progress=False)
    >>> sorted(result.computed) == sorted(result.stages)
    True
    >>> edit = result["decode_edit"]
    >>> edit.images[0].size
    (64, 64)
    >>> edit.tensor().shape
    torch.Size([1, 3, 64, 64])
    >>> editflow.run(QUICKSTART, set=FAST, cache=CACHE, progress=False).computed
    []

``set`` overrides values as ``--set`` does (Python values, or ``"KEY=VALUE"`` strings);
``sweep`` runs the Cartesian product of its values and gives one result per point. What a
recipe gets wrong raises :class:`editflow.errors.EditflowError`, whose message is the
command line's (every problem, one line each). See ``docs/python.md``.
"""

from __future__ import annotations

import json
import tempfile
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editflow.errors import EditflowError

Recipe = str | Path | Mapping[str, Any]


@dataclass
class StageOutputs:
    """One stage's outputs, read from the cache when asked for."""

    stage: str
    kind: str
    key: str
    values: Mapping[str, Any]

    def __getitem__(self, output: str) -> Any:
        """An output by name: a tensor, a text, tuned weights or a step sequence."""
        if output not in self.values:
            raise KeyError(f"stage {self.stage!r} ({self.kind}) has no output {output!r};"
                           f" its outputs: {', '.join(self.values)}")  # fmt: skip
        return self.values[output]

    def tensor(self, output: str | None = None) -> Any:
        """An output as a tensor (the stage's only tensor output when not named)."""
        return self[output or self._only("a tensor", lambda v: hasattr(v, "shape"))]

    @property
    def text(self) -> str:
        """The stage's text output (a caption)."""
        return self[self._only("a text", lambda value: isinstance(value, str))]

    @property
    def images(self) -> list[Any]:
        """The stage's image output as PIL images, one per item of the batch."""
        from editflow.stages.images import to_pil

        batch = self.tensor(self._only("an image", _is_image))
        return [to_pil(item) for item in batch]

    def _only(self, what: str, test: Any) -> str:
        names = [name for name, value in self.values.items() if test(value)]
        if len(names) != 1:
            raise KeyError(f"stage {self.stage!r} has {len(names)} outputs that are {what}:"
                           f" name one of {', '.join(self.values)}")  # fmt: skip
        return names[0]


def _is_image(value: Any) -> bool:
    return hasattr(value, "shape") and len(value.shape) == 4 and value.shape[1] == 3


@dataclass
class Result:
    """A run: what computed, what hit, the files written, and every needed stage's outputs
    by name (``result["decode_edit"]``), read from the cache on first use."""

    plan: Any
    cache: Any
    computed: list[str]
    hits: list[str]
    written: list[Path]
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def stages(self) -> list[str]:
        """The stages the run needed, in order."""
        return [stage.name for stage in self.plan.needed]

    def __getitem__(self, stage: str) -> StageOutputs:
        from editflow.cache.artifacts import read_outputs
        from editflow.engine.execute import layouts

        planned = self.plan.stages.get(stage)
        if planned is None or not planned.needed:
            raise KeyError(f"no stage {stage!r} ran; the stages: {', '.join(self.stages)}")
        if stage not in self.values:
            entry = self.cache.get(planned.key)
            self.values[stage] = read_outputs(self.cache, entry, layouts(planned))
        return StageOutputs(stage, planned.kind.kind, planned.key, self.values[stage])


def run(
    recipe: Recipe,
    *,
    set: Mapping[str, Any] | Sequence[str] | None = None,  # noqa: A002 (the CLI's word)
    sweep: Mapping[str, Sequence[Any]] | None = None,
    cache: str | Path | None = None,
    out: str | Path | None = None,
    targets: Sequence[str] | None = None,
    device: str = "auto",
    progress: bool = True,
) -> Any:
    """Run a recipe (a path, a TOML string or a dict) through the cache.

    Args:
        set: Overrides, ``{"stages.edit.guidance_scale": 12}`` or ``["KEY=VALUE", ...]``.
        sweep: ``{"stages.edit.skip": [10, 20]}``: one :class:`Result` per point, in a dict
            keyed by the point's label.
        cache: Cache folder or fsspec URL (default ``$EDITFLOW_CACHE`` or
            ``~/.cache/editflow``).
        out: Folder for the exported images (default: none are written).
        progress: Progress bars (in a notebook too).

    Returns:
        A :class:`Result`, or with ``sweep`` a dict of them.
    """
    from editflow.engine.api import open_cache, run_recipe

    path, document = _source(recipe)
    overrides, store = _overrides(set), open_cache(cache)
    if sweep:
        return _run_sweep(path, document, overrides, sweep, store, out, device, progress)
    with _display(progress) as events:
        result = run_recipe(path, overrides, cache=store, out_dir=out, device=device,
                            events=events, targets=list(targets) if targets else None,
                            document=document)  # fmt: skip
    return Result(result.plan, store, result.computed, result.hits, result.written)


def plan(recipe: Recipe, *, set: Any = None, cache: str | Path | None = None) -> Any:  # noqa: A002
    """The plan (stages in order, their keys), loading no weights and writing nothing."""
    from editflow.engine.api import open_cache, plan_recipe

    path, document = _source(recipe)
    return plan_recipe(path, _overrides(set), cache=open_cache(cache), document=document)


def validate(recipe: Recipe, *, set: Any = None) -> list[str]:  # noqa: A002
    """Every problem with the recipe, one line each (empty when it is valid)."""
    with tempfile.TemporaryDirectory() as folder:
        try:
            plan(recipe, set=set, cache=folder)
        except EditflowError as error:
            return error.render().splitlines()
    return []


def explain(
    recipe: Recipe, stage: str, *, set: Any = None, cache: str | Path | None = None
) -> list[str]:  # noqa: A002
    """Why the stage's key differs from its last run in this cache, in ``plan``'s words."""
    from editflow.engine.api import open_cache
    from editflow.engine.execute import last_run_record
    from editflow.engine.keys import describe_changes

    store = open_cache(cache)
    planned = plan(recipe, set=set, cache=cache)
    if stage not in planned.stages:
        raise EditflowError(f"no stage {stage!r} in the recipe")
    record = store.get_record(last_run_record(planned, stage))
    if record is None:
        return ["no earlier run of this stage is recorded in this cache"]
    return describe_changes(record.get("preimage"), planned.stages[stage].preimage)


def _source(recipe: Recipe) -> tuple[Path, dict[str, Any] | None]:
    """The recipe's path (inputs resolve from its folder) and its document when it is not a
    file: a dict or a TOML string stands for ``recipe.toml`` in the working folder."""
    here = Path.cwd() / "recipe.toml"
    if isinstance(recipe, Mapping):
        return here, json.loads(json.dumps(recipe))
    if isinstance(recipe, str) and "\n" in recipe:
        try:
            return here, tomllib.loads(recipe)
        except tomllib.TOMLDecodeError as error:
            raise EditflowError(f"not a TOML recipe: {error}", file="<recipe string>") from None
    return Path(recipe), None


def _overrides(values: Mapping[str, Any] | Sequence[str] | None) -> list[str]:
    """``--set`` strings: a value is written as TOML (JSON's numbers, strings and lists are)."""
    if values is None:
        return []
    if isinstance(values, Mapping):
        return [f"{key}={_toml_value(value)}" for key, value in values.items()]
    return list(values)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return (
            "{"
            + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items())
            + "}"
        )
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return json.dumps(value)


def _run_sweep(path: Path, document: Any, overrides: list[str], sweep: Mapping[str, Sequence[Any]],
               store: Any, out: Any, device: str, progress: bool) -> dict[str, Result]:  # fmt: skip
    from editflow.cli.sweeps import parse_sweep, run_sweep

    if document is not None:
        raise EditflowError("a sweep runs a recipe file: give its path", file="<recipe>")
    axes = [parse_sweep(f"{key}={','.join(_toml_value(v) for v in values)}")
            for key, values in sweep.items()]  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch, _display(progress) as events:
        swept = run_sweep(path, axes, cache=store, out_root=Path(out or scratch), device=device,
                          events=events, overrides=overrides)  # fmt: skip
    return {
        point.label: Result(outcome.plan, store, outcome.computed, outcome.hits, outcome.written)
        for point, outcome in zip(swept.points, swept.outcomes, strict=True)
    }


class _display:
    """The run's progress bars (rich, which draws in notebooks too), or nothing."""

    def __init__(self, progress: bool) -> None:
        self.progress = progress

    def __enter__(self) -> Any:
        from editflow.engine.events import CollectEvents

        if not self.progress:
            self.sink: Any = CollectEvents()
            return self.sink
        from editflow.cli.progress import ProgressDisplay

        self.sink = ProgressDisplay()
        return self.sink

    def __exit__(self, *exc: object) -> None:
        if self.progress:
            self.sink.close()
