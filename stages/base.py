"""What a stage kind is: typed named ports, a parameter model, a version, and a ``run``.

A stage kind never touches files, recipes or the cache. The engine hands it tensors (and
strings) keyed by input name plus a :class:`StageContext`, and gets tensors back keyed by
output name. Everything here is declaration; the method math lives in sibling modules.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from pydantic import ValidationError

from editflow.documents import Table, error_message
from editflow.lazy import lazy
from editflow.models.specs import ComponentSpec

torch = lazy("torch")


class ArtifactType(enum.StrEnum):
    """The kinds of values that flow between stages. A reference must connect equal types."""

    IMAGE = "image"  # float (N, 3, H, W) in [0, 1]
    MASK = "mask"  # float (N, 1, H, W) in [0, 1]
    LATENT = "latent"  # float (N, C, h, w)
    NOISE_SEQUENCE = "noise_sequence"  # float (T, N, C, h, w) noise maps, one chunk per step
    LATENT_TRAJECTORY = "latent_trajectory"  # float (T + 1, N, C, h, w) latents per level
    ATTENTION_MAPS = "attention_maps"  # float16, streamed per layer and step
    TEXT = "text"  # str
    EMBEDDING = "embedding"  # float (N, tokens, D)
    DIRECTION = "direction"  # float (1, tokens, D)
    SCORES = "scores"  # float (N,)
    WEIGHTS = "weights"  # {parameter name: float32 tensor}: tuned model weights
    KEYPOINTS = "keypoints"  # float (N, 18, 3) OpenPose body points: x, y in [0, 1], confidence


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
        streamed: For a step-sequence output: the stage writes it step by step, in order,
            through ``ctx.step_writer`` while it runs.
        follows: For a step-sequence input: the stage reads it with ``len()`` and ``[i]``
            only, in step order, so it may run alongside the stage producing it (a streamed
            output) and read each step as it is written (the Ray executor does this).
    """

    name: str
    type: ArtifactType
    description: str
    optional: bool = False
    many: bool = False
    export: bool = False
    size_of: str | None = None
    timing: str | None = None
    streamed: bool = False
    follows: bool = False


class Params(Table):
    """Base of every stage's parameter model: strict keys and types, immutable, documented."""


class ModelComponents(Protocol):
    """The model parts a stage may ask for; loaded on first access, once per run."""

    def get(self, component: str) -> Any:
        """Return ``unet``, ``vae``, ``text_encoder``, ``tokenizer`` or another part."""
        ...

    @property
    def scheduler_config(self) -> Mapping[str, Any]:
        """The model's own scheduler config (schedulers are always built from it)."""
        ...


def derive_seed(seed: int, *path: str | int) -> int:
    """Derive a 63-bit seed from the recipe seed and a path such as (stage name, item).

    sha256 over a fixed encoding, so the result never depends on the process, the order in
    which stages run, or how many other stages draw noise.
    """
    digest = hashlib.sha256(struct.pack(">q", seed))
    for part in path:
        digest.update(b"\x00" + str(part).encode())
    return int.from_bytes(digest.digest()[:8], "big") >> 1


@dataclass
class StageContext:
    """Everything a running stage may use besides its inputs.

    Attributes:
        name: The stage's name in the recipe (part of its seed path).
        seed: The recipe seed.
        device: Where tensors are computed.
        dtype: The recipe's compute dtype.
        models: Lazily loaded model components (``None`` for stages that need none).
        progress: Called with (step, total) as long work advances.
        stream_writer: Opens a streamed output (attention maps) that is written step by step
            instead of returned whole; ``None`` when the engine does not offer one.
        step_writer: ``step_writer(output, shape, dtype)`` opens a ``streamed`` step-sequence
            output (``write(step, tensor)``, steps in order); the stage still returns the
            whole tensor. ``None`` when the engine does not offer one.
        references: Input port name -> the recipe reference(s) it is connected to (for
            labels; the values come as ``run``'s keyword arguments).
    """

    name: str
    seed: int
    device: torch.device
    dtype: torch.dtype
    models: ModelComponents | None = None
    progress: Callable[[int, int], None] = lambda step, total: None
    stream_writer: Callable[..., Any] | None = None
    step_writer: Callable[..., Any] | None = None
    references: Mapping[str, str | list[str]] = field(default_factory=dict)

    def generator(self, item: int = 0) -> torch.Generator:
        """A CPU generator seeded from (recipe seed, stage name, item)."""
        return torch.Generator("cpu").manual_seed(derive_seed(self.seed, self.name, item))


class StageKind:
    """Base of a stage kind. Subclasses fill the class attributes and implement ``run``.

    ``run(self, ctx, params, *, <one keyword argument per input port>)`` receives the
    kind's own params model and its inputs by name (an optional port that is not connected
    arrives as ``None``), and returns ``{output name: value}``. A test checks that every
    kind's ``run`` signature names exactly its input ports.

    Attributes:
        kind: ``family.method``, unique across the registry (``invert.ddim``).
        version: Bumped whenever the numbers a stage produces change; part of its key.
        description: One line for the schema and the README.
        params: The pydantic model of the stage's parameters (defaults from METHODS.md).
        inputs: Named input ports.
        outputs: Named output ports.
        seeded: Whether the stage draws random numbers (then the seed and the stage name
            enter its key).
        components: Model parts it needs, as specs; empty means no model is resolved or
            loaded for it.
    """

    kind: ClassVar[str]
    version: ClassVar[str]
    description: ClassVar[str]
    params: ClassVar[type[Params]] = Params
    inputs: ClassVar[tuple[Port, ...]] = ()
    outputs: ClassVar[tuple[Port, ...]] = ()
    seeded: ClassVar[bool] = False
    components: ClassVar[tuple[ComponentSpec, ...]] = ()
    # Input port -> {parameter: fallback}: parameters the stage takes from the stage that
    # produces that input (an edit takes its inversion's step count), so the two cannot
    # disagree; the fallback applies when the input is not connected to such a stage.
    inherits: ClassVar[Mapping[str, Mapping[str, Any]]] = {}

    @classmethod
    def output_port(cls, name: str) -> Port | None:
        return next((port for port in cls.outputs if port.name == name), None)

    @classmethod
    def component_specs(
        cls, params: Any, references: Mapping[str, str | list[str]] | None = None
    ) -> tuple[ComponentSpec, ...]:
        """The model parts this configuration uses (a kind may need none for some params, or
        more for some connected inputs)."""
        return cls.components

    @classmethod
    def inherit(
        cls, params: Any, producers: Mapping[str, tuple[str, Any]]
    ) -> tuple[Any, list[tuple[str | None, str]]]:
        """Fill the parameters of :attr:`inherits` left out (``None``) from their producers.

        Args:
            params: The stage's params as the recipe gives them.
            producers: Input port -> (producing stage's name, its resolved params).

        Returns:
            The resolved params, and ``(field, message)`` per problem: a value given that
            disagrees with the producer's, or resolved params that break a rule.
        """
        updates: dict[str, Any] = {}
        problems: list[tuple[str | None, str]] = []
        for port, fallbacks in cls.inherits.items():
            stage, theirs = producers.get(port, ("", None))
            for name, fallback in fallbacks.items():
                own, given = getattr(params, name), getattr(theirs, name, None)
                if own is None:
                    updates[name] = given if given is not None else fallback
                elif given is not None and own != given:
                    problems.append(
                        (name, f"is {own!r} but {port} come from {stage!r}, which has {given!r}"
                               " (leave it out to take the producer's)")
                    )  # fmt: skip
        if not updates:
            return params, problems
        try:
            return cls.params.model_validate({**params.model_dump(), **updates}), problems
        except ValidationError as error:
            return params, problems + [(None, error_message(item, [])) for item in error.errors()]

    @classmethod
    def check_models(cls, params: Any, models: Mapping[str, Any]) -> list[tuple[str | None, str]]:
        """Rules that need the resolved models (``provider -> ResolvedModel``), checked while
        planning from their configs; no weight is read."""
        return []

    @classmethod
    def check(
        cls,
        params: Any,
        references: Mapping[str, str | list[str]],
        sizes: Mapping[str, tuple[int, int] | None],
    ) -> list[tuple[str | None, str]]:
        """Rules that tie parameters to the inputs the recipe connects.

        Checked while planning, before anything runs.

        Args:
            params: The stage's validated params.
            references: Input port name -> the reference (or list of references) connected.
            sizes: Input port name -> the (height, width) in pixels of the image its value
                comes from, where the plan knows it.

        Returns:
            ``(field, message)`` per problem; ``field`` is a parameter or input name, or
            ``None`` for the stage as a whole.
        """
        return []

    @classmethod
    def is_seeded(cls, params: Any) -> bool:
        """Whether this configuration draws random numbers (kinds may depend on params)."""
        return cls.seeded

    def run(self, ctx: StageContext, params: Any, **inputs: Any) -> dict[str, Any]:
        """Compute the outputs from the inputs; every declared output must be returned."""
        raise NotImplementedError

    def call(self, ctx: StageContext, params: Any, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """``run`` with the inputs as a mapping; optional ports left out arrive as ``None``,
        and inherited parameters left out take their fallbacks.

        Raises:
            TypeError: A required input is missing or an unknown one is given.
        """
        ports = {port.name for port in self.inputs}
        unknown = set(inputs) - ports
        missing = {port.name for port in self.inputs if not port.optional} - set(inputs)
        if unknown or missing:
            raise TypeError(
                f"{self.kind}: unknown inputs {sorted(unknown)}, missing {sorted(missing)}"
            )
        params, problems = self.inherit(params, {})
        if problems:
            raise ValueError(f"{self.kind}: {problems[0][1]}")
        return self.run(ctx, params, **{name: inputs.get(name) for name in ports})


def step_reporter(
    progress: Callable[[int, int], None], total: int, first: int = 0
) -> Callable[[Mapping[str, Any]], None]:
    """Adapt ``progress(step, total)`` to the loops' per-step ``callback(info)``.

    ``first`` is the loop index of the first step reported as step 1 (an edit that skips
    levels starts at ``i = skip``).
    """

    def report(info: Mapping[str, Any]) -> None:
        progress(int(info["i"]) - first + 1, total)

    return report
