"""DiffusionCLIP (Kim, Kwon, Ye; CVPR 2022).

- :mod:`.finetuning`: the directional CLIP loss and the two fine-tuning loops.
- :mod:`.templates`: CLIP's ImageNet prompt templates the text direction averages over.
- :mod:`.finetune`: ``finetune.diffusionclip``; :mod:`.unseen_domain`:
  ``sample.unseen_domain``.

Inversion and generation to ``t0`` are ``invert.ddim`` and ``sample.ddim`` with ``t0`` set,
on the time grid of :mod:`editflow.stages.grid_scheduler`.
"""

from editflow.stages.diffusionclip.finetune import FinetuneDiffusionclip
from editflow.stages.diffusionclip.unseen_domain import SampleUnseenDomain

KINDS = (FinetuneDiffusionclip, SampleUnseenDomain)
