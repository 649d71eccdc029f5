"""Edit-friendly DDPM inversion (Huberman-Spiegelglas, Kulikov, Michaeli; CVPR 2024).

- :mod:`.inversion`: the auxiliary path, the noise maps and the edit, as plain functions.
- :mod:`.reverse_steps`: the reverse steps both run (DDIM with eta, SDE DPM-Solver++ 2).
- :mod:`.kinds`: ``invert.edit_friendly`` and ``sample.edit_friendly``.
- :mod:`.statistics`: ``figure.noise_statistics``, the paper's noise-map statistics.
"""

from editflow.stages.edit_friendly.kinds import InvertEditFriendly, SampleEditFriendly
from editflow.stages.edit_friendly.statistics import FigureNoiseStatistics

KINDS = (InvertEditFriendly, SampleEditFriendly, FigureNoiseStatistics)
