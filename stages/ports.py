"""The types of what flows between stages, and the ports that carry them."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ArtifactType(enum.StrEnum):
    """What flows between stages. A reference connects an output to an input that takes its type
    (the same type, or one in the input's ``accepts``)."""

    IMAGE = "image"  # float (N, 3, H, W) in [0, 1]
    MASK = "mask"  # float (N, 1, H, W) in [0, 1]
    LATENT = "latent"  # float (N, C, h, w): clean latents x0 (an image, encoded)
    INVERTED_LATENT = "inverted_latent"  # x_t of a deterministic (DDIM) inversion
    STOCHASTIC_LATENT = "stochastic_latent"  # x_T of an edit-friendly inversion
    NOISE_SEQUENCE = "noise_sequence"  # float (T, N, C, h, w) noise maps, one chunk per step
    LATENT_TRAJECTORY = "latent_trajectory"  # float (T + 1, N, C, h, w) latents per level
    ATTENTION_MAPS = "attention_maps"  # float16, streamed per layer and step
    TEXT = "text"  # str
    EMBEDDING = "embedding"  # float (N, tokens, D)
    DIRECTION = "direction"  # float (1, tokens, D)
    SCORES = "scores"  # float (N,)
    WEIGHTS = "weights"  # {parameter name: float32 tensor}: tuned model weights
    KEYPOINTS = "keypoints"  # float (N, 18, 3) OpenPose body points: x, y in [0, 1], confidence
    METRIC = "metric"  # float64 (N,): a metric's value per image (N = 1 for a batch's mean)


# Types whose NaN is a value: a frame nobody ranked, a metric undefined for an image. Every
# other type's NaN is a computation gone wrong, and fails its stage.
NAN_IS_A_VALUE = frozenset({ArtifactType.SCORES, ArtifactType.METRIC})

# What each type is, in errors: the three latent types differ in what they mean, not in shape.
TYPE_NAMES = {
    ArtifactType.LATENT: "a clean latent (x0)",
    ArtifactType.INVERTED_LATENT: "a deterministic x_T (a DDIM inversion)",
    ArtifactType.STOCHASTIC_LATENT: "a stochastic x_T (an edit-friendly inversion)",
}


def type_name(artifact: ArtifactType) -> str:
    """The type as errors name it: "an embedding", "a clean latent (x0)" ..."""
    if artifact in TYPE_NAMES:
        return TYPE_NAMES[artifact]
    article = "an" if artifact.value[0] in "aeiou" else "a"
    return f"{article} {artifact.value.replace('_', ' ')}"


@dataclass(frozen=True)
class Port:
    """One named input or output of a stage kind.

    Attributes:
        name: The field name in the recipe (inputs) or the reference suffix (outputs).
        type: The artifact type carried.
        description: One line for the schema and the README reference.
        optional: An input that may be left out of the recipe.
        many: An input that takes a list of references (for example a figure's images).
        export: An output the engine writes to the output folder (images as PNG).
        timing: For an exported image output: the output holding each image's display time
            in milliseconds; the images are then written as one animated GIF.
        size_of: For an output: the input whose image it has the pixel size of (latents of
            an image, an edit of those latents ...), so sizes are known while planning.
        accepts: For an input: further types it takes besides ``type`` (a decoder takes
            any latent).

    Whether a port carries a step sequence follows from its type (:func:`is_step_sequence`).
    """

    name: str
    type: ArtifactType
    description: str
    optional: bool = False
    many: bool = False
    export: bool = False
    size_of: str | None = None
    timing: str | None = None
    accepts: tuple[ArtifactType, ...] = ()

    def takes(self, artifact: ArtifactType) -> bool:
        """Whether this input takes a value of that type."""
        return artifact == self.type or artifact in self.accepts


STEP_SEQUENCES = frozenset(
    {ArtifactType.NOISE_SEQUENCE, ArtifactType.LATENT_TRAJECTORY, ArtifactType.ATTENTION_MAPS}
)


def is_step_sequence(port: Port) -> bool:
    """Whether a port carries a step sequence (docs/steps.md): an output the stage writes
    through ``ctx.write_steps``, an input it reads as a :class:`StepSequence`, so a consumer
    may run alongside its producer and read each step as it is written (on Ray)."""
    return port.type in STEP_SEQUENCES
