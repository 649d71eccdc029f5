"""The parameter vocabulary the kinds share: one declaration, range and description each.

A kind writes ``num_inference_steps: Steps = 50``; a parameter it inherits from the stage
producing an input is ``Steps | None = None`` (the reference says where the default comes
from, from :attr:`StageKind.inherits`). A parameter whose meaning is the method's own
(``cfg_src``, ``skip``) is declared where it is used.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

Steps = Annotated[
    int, Field(ge=1, le=999, description="Denoising steps of the schedule (DDIM steps)")
]
GuidanceScale = Annotated[
    float, Field(ge=1.0, le=30.0, description="Classifier-free guidance scale (1 = no CFG)")
]
Eta = Annotated[
    float, Field(ge=0.0, le=1.0, description="DDIM eta: 0 is deterministic, 1 is DDPM-like")
]
Prompt = Annotated[str, Field(description="The text prompt")]
NegativePrompt = Annotated[str, Field(description="The negative (unconditional) prompt of CFG")]
T0 = Annotated[
    int,
    Field(
        ge=1,
        le=999,
        description="DiffusionCLIP's t0: invert to, or generate from, this timestep on the"
        " grid linspace(0, 1, n) * t0 with n the step count",
    ),
]
