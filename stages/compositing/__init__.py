"""Cross-domain compositing (Hachnochi et al. 2023): paste, then local ILVR.

- :mod:`.local_ilvr`: the low-pass guided, masked, resampled sampling loop.
- :mod:`.kinds`: ``compose.paste`` and ``sample.local_ilvr``.
"""

from editflow.stages.compositing.kinds import ComposePaste, SampleLocalIlvr

KINDS = (ComposePaste, SampleLocalIlvr)
