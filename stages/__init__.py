"""Stage kinds: the one explicit registry the recipe union, schema and README come from.

Adding a kind means adding it to ``STAGE_KINDS``; a duplicate kind fails at import.
"""

from __future__ import annotations

from editflow.stages.base import ArtifactType, Params, Port, StageContext, StageKind
from editflow.stages.caption import CaptionBlip
from editflow.stages.compositing import ComposePaste, SampleLocalIlvr
from editflow.stages.decode import DecodeVae
from editflow.stages.direction import BankMean, DeriveDirection
from editflow.stages.edit_friendly_statistics import FigureNoiseStatistics
from editflow.stages.encode import EncodeVae
from editflow.stages.figure import FigureAnimation, FigureGrid
from editflow.stages.finetune import FinetuneDiffusionclip
from editflow.stages.guide import GuidePix2PixZeroReference
from editflow.stages.invert import InvertDdim, InvertEditFriendly, InvertTextualInversion
from editflow.stages.pixels import DecodePixels, EncodePixels
from editflow.stages.rank import RankClip
from editflow.stages.sample import (
    SampleDdim,
    SampleEditFriendly,
)
from editflow.stages.sample_interpolate import SampleInterpolate
from editflow.stages.sample_pix2pix_zero import SamplePix2PixZero
from editflow.stages.sample_unseen_domain import SampleUnseenDomain

STAGE_KINDS: tuple[type[StageKind], ...] = (
    CaptionBlip,
    ComposePaste,
    EncodeVae,
    EncodePixels,
    InvertDdim,
    InvertEditFriendly,
    InvertTextualInversion,
    BankMean,
    DeriveDirection,
    GuidePix2PixZeroReference,
    SampleDdim,
    SampleEditFriendly,
    SamplePix2PixZero,
    SampleLocalIlvr,
    SampleInterpolate,
    SampleUnseenDomain,
    FinetuneDiffusionclip,
    DecodeVae,
    DecodePixels,
    RankClip,
    FigureGrid,
    FigureAnimation,
    FigureNoiseStatistics,
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
    "StageContext",
    "StageKind",
]
