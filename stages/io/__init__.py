"""Kinds every method uses to get images in and results out: captions, VAE and pixel-space
encoding and decoding, CLIP ranking, figures (grids and animations)."""

from editflow.stages.io.caption import CaptionBlip
from editflow.stages.io.decode import DecodeVae
from editflow.stages.io.encode import EncodeVae
from editflow.stages.io.figure import FigureAnimation, FigureGrid
from editflow.stages.io.pixels import DecodePixels, EncodePixels
from editflow.stages.io.rank import RankClip

KINDS = (
    CaptionBlip,
    EncodeVae,
    EncodePixels,
    DecodeVae,
    DecodePixels,
    RankClip,
    FigureGrid,
    FigureAnimation,
)
