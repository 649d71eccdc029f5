"""Stage kinds: the one explicit registry the recipe union, schema and README come from.

One folder per method, each holding its math and its kinds and exporting them as ``KINDS``;
``io`` holds the kinds every method uses, ``metrics`` the numbers about their results.
Adding a method is one folder and one line below.
A duplicate kind fails at import.
"""

from __future__ import annotations

from editflow.stages import (
    compositing,
    ddim,
    diffusionclip,
    edit_friendly,
    interpolation,
    io,
    metrics,
    pix2pix_zero,
)
from editflow.stages.base import ArtifactType, Params, Port, StageContext, StageKind, type_name

STAGE_KINDS: tuple[type[StageKind], ...] = (
    *io.KINDS,
    *ddim.KINDS,
    *edit_friendly.KINDS,
    *pix2pix_zero.KINDS,
    *compositing.KINDS,
    *interpolation.KINDS,
    *diffusionclip.KINDS,
    *metrics.KINDS,
)


def _registry(kinds: tuple[type[StageKind], ...]) -> dict[str, type[StageKind]]:
    registry: dict[str, type[StageKind]] = {}
    for kind in kinds:
        if kind.kind in registry:
            raise ImportError(f"stage kind {kind.kind!r} is registered twice")
        registry[kind.kind] = kind
    return registry


KINDS_BY_NAME = _registry(STAGE_KINDS)

__all__ = [
    "STAGE_KINDS",
    "KINDS_BY_NAME",
    "ArtifactType",
    "Params",
    "Port",
    "type_name",
    "StageContext",
    "StageKind",
]
