"""Interpolation between images (Wang & Golland 2023).

- :mod:`.frames`: the frame tree, noise levels, slerp and the branching
  denoise-interpolate-denoise.
- :mod:`.textual_inversion`, :mod:`.invert`: per-image prompt embeddings
  (``invert.textual_inversion``).
- :mod:`.pose`: OpenPose keypoints, read and drawn for ControlNet pose guidance.
- :mod:`.sample`: ``sample.interpolate``.
"""

from editflow.stages.interpolation.invert import InvertTextualInversion
from editflow.stages.interpolation.sample import SampleInterpolate

KINDS = (InvertTextualInversion, SampleInterpolate)
