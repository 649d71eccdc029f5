"""pix2pix-zero (Parmar et al., SIGGRAPH 2023).

- :mod:`.direction`: edit directions from sentence banks (``direction.derive``,
  ``direction.bank_mean``).
- :mod:`.attention`: recording cross-attention maps and the guidance loss on them.
- :mod:`.edit`: the reference pass and the cross-attention guided edit, as plain loops.
- :mod:`.guide`: ``guide.attention_reference``; :mod:`.sample`: ``sample.pix2pix_zero``.

Its regularised inversion is ``invert.ddim`` with ``regularize = true`` (the regulariser is
in :mod:`editflow.stages.ddim_loops`, as DDIM inversion runs it).
"""

from editflow.stages.pix2pix_zero.direction import BankMean, DeriveDirection
from editflow.stages.pix2pix_zero.guide import GuidePix2PixZeroReference
from editflow.stages.pix2pix_zero.sample import SamplePix2PixZero

KINDS = (BankMean, DeriveDirection, GuidePix2PixZeroReference, SamplePix2PixZero)
