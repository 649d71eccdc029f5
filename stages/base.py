"""What a stage kind is: typed named ports, a parameter model, a version, and a ``run``.

A stage kind never touches files, recipes or the cache. The engine hands it tensors (and
strings) keyed by input name plus a :class:`StageContext`, and gets tensors back keyed by
output name. Everything here is declaration; the method math lives in sibling modules.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Protocol

from pydantic import ValidationError

from editflow.documents import Table, error_message
from editflow.errors import EditflowError, ModelUnavailableError, Problem
from editflow.lazy import lazy
from editflow.models.specs import ComponentSpec
from editflow.stages.checks import CheckView
from editflow.stages.nan import check_no_nan
from editflow.stages.ports import (  # noqa: F401 (the base's public names)
    NAN_IS_A_VALUE,
    STEP_SEQUENCES,
    TYPE_NAMES,
    ArtifactType,
    Port,
    is_step_sequence,
    type_name,
)

torch = lazy("torch")


class StepSequence(Protocol):
    """A step sequence read a step at a time: ``len(steps)`` and ``steps[i]`` (docs/steps.md).

    A step is a tensor (noise maps, latent paths: ``(T, N, C, h, w)`` read as ``(N, C, h, w)``)
    or ``{layer: tensor}`` (attention maps). A whole tensor is one; so are the engine's
    readers of the cache, which read only the step asked for, and of a producer still
    writing, which wait for it. Read in step order: a reader may read the next step ahead.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


class StepSequenceWriter(Protocol):
    """Where a stage writes a step-sequence output (``ctx.write_steps``): ``write`` each
    step once, in order; the output's value is ``result()``. A written tensor must not be
    changed afterwards (it may still be on its way to storage)."""

    def write(self, index: int, value: Any) -> None:
        """Step ``index``: a tensor, or ``{layer: tensor}`` with the same layers each step."""
        ...

    def result(self) -> StepSequence:
        """The whole sequence, once every step is written (the stage returns it)."""
        ...


class MemorySteps:
    """A :class:`StepSequenceWriter` that keeps the steps in memory (the default of a context
    made outside the engine, and the engine's choice for tensor steps written whole).

    ``result()`` is the steps stacked into one tensor, or the list of ``{layer: tensor}``.
    """

    def __init__(self, length: int) -> None:
        self.length = length
        self.steps: list[Any] = []

    def write(self, index: int, value: Any) -> None:
        if index != len(self.steps):
            expected = len(self.steps)
            raise RuntimeError(f"steps must come in order: got {index}, expected {expected}")
        self.steps.append(value)

    def result(self) -> StepSequence:
        if len(self.steps) != self.length:
            raise RuntimeError(f"{len(self.steps)} of {self.length} steps were written")
        if self.steps and isinstance(self.steps[0], Mapping):
            return list(self.steps)
        return torch.stack(self.steps)


def memory_steps(output: str, length: int) -> MemorySteps:
    """``StageContext.write_steps`` outside the engine: the steps stay in memory."""
    return MemorySteps(length)


class StepsOn:
    """``steps`` with each step's tensors moved to ``device`` and ``dtype`` as it is read."""

    def __init__(self, steps: StepSequence, device: torch.device, dtype: torch.dtype) -> None:
        self.steps, self.device, self.dtype = steps, device, dtype

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, index: int) -> Any:
        step = self.steps[index]
        if isinstance(step, Mapping):
            return {layer: t.to(self.device, self.dtype) for layer, t in step.items()}
        return step.to(self.device, self.dtype)


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
        write_steps: ``write_steps(output, length)`` opens a step-sequence output
            (:func:`is_step_sequence`) of ``length`` steps: a :class:`StepSequenceWriter`,
            whose ``result()`` the stage returns as that output. Where the steps go (memory,
            the cache entry, a staging folder other workers follow) is the engine's choice;
            outside the engine they stay in memory (:class:`MemorySteps`).
        references: Input port name -> the recipe reference(s) it is connected to (for
            labels; the values come as ``run``'s keyword arguments).
    """

    name: str
    seed: int
    device: torch.device
    dtype: torch.dtype
    models: ModelComponents | None = None
    progress: Callable[[int, int], None] = lambda step, total: None
    write_steps: Callable[[str, int], StepSequenceWriter] = memory_steps
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
        drives_inpainting: Whether it gives an inpainting UNet (more input channels than
            output ones) its mask and masked image; every other kind is refused one.
        needs_text: Whether it works in the text encoder's space (whatever its params), so a
            model without one is refused.
    """

    kind: ClassVar[str]
    version: ClassVar[str]
    description: ClassVar[str]
    params: ClassVar[type[Params]] = Params
    inputs: ClassVar[tuple[Port, ...]] = ()
    outputs: ClassVar[tuple[Port, ...]] = ()
    seeded: ClassVar[bool] = False
    components: ClassVar[tuple[ComponentSpec, ...]] = ()
    drives_inpainting: ClassVar[bool] = False
    needs_text: ClassVar[bool] = False
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
    ) -> tuple[Any, list[Problem]]:
        """Fill the parameters of :attr:`inherits` left out (``None``) from their producers.

        Args:
            params: The stage's params as the recipe gives them.
            producers: Input port -> (producing stage's name, its resolved params).

        Returns:
            The resolved params, and a :class:`Problem` per value given that disagrees with
            the producer's, or per rule the resolved params break (``key``: the parameter).
        """
        updates: dict[str, Any] = {}
        problems: list[Problem] = []
        for port, fallbacks in cls.inherits.items():
            stage, theirs = producers.get(port, ("", None))
            for name, fallback in fallbacks.items():
                own, given = getattr(params, name), getattr(theirs, name, None)
                if own is None:
                    updates[name] = given if given is not None else fallback
                elif given is not None and own != given:
                    message = f"is {own!r} but {port} come from {stage!r}, which has {given!r}"
                    problems.append(
                        Problem(message, key=name, hint="leave it out to take the producer's")
                    )
        if not updates:
            return params, problems
        try:
            return cls.params.model_validate({**params.model_dump(), **updates}), problems
        except ValidationError as error:
            return params, problems + [Problem(error_message(item, [])) for item in error.errors()]

    @classmethod
    def check(cls, params: Any, view: CheckView) -> list[Problem]:
        """The rules that tie parameters to the connected inputs, their sizes and the resolved
        models; checked once, while planning, before anything runs (``run`` never repeats
        them; :meth:`call` runs them for direct Python use).

        Args:
            params: The stage's validated params, inherited values filled in.
            view: What the plan knows: references, sizes, resolved models (no weights).

        Returns:
            One :class:`Problem` per broken rule; its ``key`` is the parameter or input name,
            or ``None`` for the stage as a whole (the engine locates it in the recipe).
        """
        return []

    @classmethod
    def problems(cls, params: Any, view: CheckView) -> list[Problem]:
        """Every rule a plan checks: those all kinds share, then the kind's :meth:`check`."""
        return _shared_problems(cls, view) + cls.check(params, view)

    @classmethod
    def is_seeded(cls, params: Any) -> bool:
        """Whether this configuration draws random numbers (kinds may depend on params)."""
        return cls.seeded

    def run(self, ctx: StageContext, params: Any, **inputs: Any) -> dict[str, Any]:
        """Compute the outputs from the inputs; every declared output must be returned."""
        raise NotImplementedError

    def call(self, ctx: StageContext, params: Any, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """``run`` for direct Python use: inherited parameters left out take their fallbacks
        and :meth:`check` runs on what is given, as a plan would, then :meth:`run_planned`.

        Raises:
            TypeError: A required input is missing or an unknown one is given.
            EditflowError: The params break a rule of :meth:`check` (as a recipe would).
        """
        self._check_ports(inputs)
        params, problems = self.inherit(params, {})
        problems += self.problems(params, _call_view(self, ctx, inputs))
        if problems:
            where = f"stages.{ctx.name}"
            raise EditflowError(problems=[replace(p, key=f"{where}.{p.key}" if p.key else where)
                                          for p in problems])  # fmt: skip
        return self.run_planned(ctx, params, inputs)

    def run_planned(
        self, ctx: StageContext, params: Any, inputs: Mapping[str, Any]
    ) -> dict[str, Any]:
        """``run`` with the inputs as a mapping (optional ports left out arrive as ``None``),
        for params a plan has inherited and checked: the engine's entry."""
        self._check_ports(inputs)
        outputs = self.run(
            ctx, params, **{port.name: inputs.get(port.name) for port in self.inputs}
        )
        checked = {port.name for port in self.outputs if port.type not in NAN_IS_A_VALUE}
        check_no_nan(
            {name: outputs[name] for name in checked if name in outputs}, ctx.dtype,
            reason=lambda: self.nan_reason(params, inputs),
        )  # fmt: skip
        return outputs

    def nan_reason(self, params: Any, inputs: Mapping[str, Any]) -> str | None:
        """Why this kind's outputs came out NaN for these params and inputs, where the kind
        knows (said instead of the bare count); None: it does not."""
        return None

    def _check_ports(self, inputs: Mapping[str, Any]) -> None:
        ports = {port.name for port in self.inputs}
        unknown = set(inputs) - ports
        missing = {port.name for port in self.inputs if not port.optional} - set(inputs)
        if unknown or missing:
            raise TypeError(
                f"{self.kind}: unknown inputs {sorted(unknown)}, missing {sorted(missing)}"
            )


def _shared_problems(kind: type[StageKind], view: CheckView) -> list[Problem]:
    """A UNet that takes more channels than it predicts (an inpainting UNet: latents, mask,
    masked image) runs only in a kind that builds that conditioning (``drives_inpainting``);
    anywhere else the first step would fail on the channel count. A kind that ``needs_text``
    is refused a model without a text encoder."""
    text_free = view.text_free_model() if kind.needs_text else None
    if text_free is not None:
        return [Problem(f"{kind.kind} works with text embeddings, but {text_free} has no text"
                        " encoder (an unconditional UNet)")]  # fmt: skip
    uses_unet = any(spec.name == "unet" and spec.provider == "model.id" for spec in kind.components)
    unet = view.config("unet") if uses_unet and not kind.drives_inpainting else None
    if not unet or unet.get("in_channels") == unet.get("out_channels", unet.get("in_channels")):
        return []
    model = view.models["model.id"].spec.id
    return [Problem(f"model '{model}' has an inpainting UNet ({unet['in_channels']} input"
                    f" channels for {unet['out_channels']}): {kind.kind} gives it no mask or"
                    " masked image (use a plain model; sample.local_ilvr drives this one)")]  # fmt: skip


def _call_view(kind: StageKind, ctx: StageContext, inputs: Mapping[str, Any]) -> CheckView:
    """What :meth:`StageKind.call` checks: the inputs given (a list port's items named
    ``PORT.i``), the sizes of the images among them and the configs of the loaded parts."""
    many = {port.name for port in kind.inputs if port.many}
    references = {
        name: [f"{name}.{i}" for i in range(len(value))] if name in many else name
        for name, value in inputs.items()
    }
    images = {
        port.name for port in kind.inputs if port.type in (ArtifactType.IMAGE, ArtifactType.MASK)
    }
    first = {
        name: value[0] if isinstance(value, list | tuple) else value
        for name, value in inputs.items()
    }
    sizes = {
        name: tuple(first[name].shape[-2:]) for name in images & set(inputs) if len(first[name])
    }

    def configs(component: str, provider: str) -> Mapping[str, Any] | None:
        try:
            return getattr(ctx.models.get(component), "config", None) if ctx.models else None
        except (KeyError, ModelUnavailableError):  # not a part this kind or model has
            return None

    return CheckView(references, sizes, configs=configs)


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
