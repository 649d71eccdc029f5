"""The recipe tables of stages, derived from the stage declarations (like ``docs.py``).

Each registered kind contributes one pydantic model, its parameters plus one reference field
per input port; the union of them, discriminated on ``kind``, is what a recipe's
``[stages.NAME]`` tables are validated against and what ``editflow schema`` prints.
"""

from __future__ import annotations

from functools import cache
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, create_model

from editflow.stages import STAGE_KINDS, StageKind

# A reference names an output: "stage.output" or "inputs.name".
REFERENCE_PATTERN = r"^[A-Za-z_][A-Za-z0-9_-]*\.[A-Za-z_][A-Za-z0-9_]*$"
Reference = Annotated[
    str,
    Field(
        pattern=REFERENCE_PATTERN,
        description="'stage.output' or 'inputs.name'",
        json_schema_extra={"examples": ["invert.latents", "inputs.photo"]},
    ),
]


def stage_model(kind: type[StageKind]) -> type[BaseModel]:
    """The recipe model of one stage kind: its params plus a reference field per input."""
    fields: dict[str, Any] = {
        "kind": (Literal[kind.kind], Field(description=kind.description)),  # type: ignore[valid-type]
    }
    for port in kind.inputs:
        annotation: Any = (
            Annotated[list[Reference], Field(min_length=1)] if port.many else Reference
        )
        types = " or ".join(t.value for t in (port.type, *port.accepts))
        description = f"{types}: {port.description}"
        if port.optional:
            fields[port.name] = (annotation | None, Field(None, description=description))
        else:
            fields[port.name] = (annotation, Field(description=description))
    clash = set(kind.params.model_fields) & {port.name for port in kind.inputs}
    if clash or "kind" in kind.params.model_fields:
        raise TypeError(f"{kind.kind}: parameter names clash with inputs: {sorted(clash)}")
    name = kind.__name__
    return create_model(name, __base__=kind.params, __doc__=kind.description, **fields)


@cache
def stage_models() -> dict[str, type[BaseModel]]:
    return {kind.kind: stage_model(kind) for kind in STAGE_KINDS}


@cache
def stage_union() -> Any:
    models = tuple(stage_models().values())
    return Annotated[Union[models], Field(discriminator="kind")]  # noqa: UP007
