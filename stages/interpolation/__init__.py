"""Interpolation between images (Wang & Golland 2023).

- :mod:`.frames`: the frame tree, noise levels, slerp and the branching
  denoise-interpolate-denoise.
- :mod:`.textual_inversion`, :mod:`.invert`: per-image prompt embeddings
  (``invert.textual_inversion``).
- :mod:`.pose`: OpenPose keypoints, read and drawn for ControlNet pose guidance.
- :mod:`.sample`: ``sample.interpolate``.
- :mod:`.checks`: what the model must have (text for prompts and embeddings, a matching
  ControlNet for poses), checked while planning.
"""

from editflow.stages.interpolation.invert import InvertTextualInversion
from editflow.stages.interpolation.sample import SampleInterpolate

KINDS = (InvertTextualInversion, SampleInterpolate)
