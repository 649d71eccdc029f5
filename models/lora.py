"""LoRA files a recipe adds to its model (``[[model.lora]]``; Hu et al. 2021, eq. 3).

A LoRA holds low-rank factors ``B A`` for some of the UNet's and text encoder's linear layers;
applied at ``scale``, a layer's weight becomes ``W + scale * alpha / r * B A``. Files are read
in the layouts diffusers' LoRA loaders take (diffusers/peft names ``unet.<layer>.lora_A.weight``,
kohya names ``lora_unet_<layer>.lora_down.weight``), from ``.safetensors`` only: a pickle can
run code when it is loaded.

Planning checks each file without loading a tensor and hashes it; the digests and scales join
the model's fingerprint (:class:`~editflow.models.references.ResolvedModel`), so the key of
every stage that uses ``model.id`` changes with them. Loading applies them, through diffusers'
own loaders (peft), to a UNet or text encoder that was just loaded from disk, fuses them and
removes the peft layers: stages see a plain module. A model with LoRA has another fingerprint
than the same model without, so it is held by another registry, and the base weights that
other recipes of the same process use are never changed in place.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from editflow.documents import Table
from editflow.errors import ModelUnavailableError, Problem
from editflow.models.identity import hash_files, sha256_file

# The parts a Stable Diffusion LoRA can change, as diffusers' loader names them.
LORA_COMPONENTS = ("unet", "text_encoder")
# How each component's tensor names start in the layouts diffusers reads: its own (peft)
# and kohya's.
_PART_PREFIXES_OF = (("unet.", "lora_unet_"), ("text_encoder.", "lora_te_"))


class LoraEntry(Table):
    """One LoRA file applied to the model's UNet and text encoder (``[[model.lora]]``)."""

    path: str = Field(description="LoRA weights (.safetensors), relative to the recipe")
    scale: float = Field(
        1.0,
        allow_inf_nan=False,
        description="How much of the LoRA is added: W + scale * BA (0 leaves the model as it is)",
    )
    adapter_name: str | None = Field(
        None,
        min_length=1,
        description="Its name among the model's adapters (default lora_INDEX); not in cache keys",
    )


@dataclass(frozen=True)
class LoraFile:
    """A LoRA entry checked and hashed at plan time.

    Attributes:
        key: Where the recipe names it (``model.lora[0]``).
        path: The file.
        sha256: Its digest when planned; loading refuses a file that no longer has it.
        scale: How much of it is fused.
        adapter_name: Its name in peft.
        parts: The components its factors change (``unet``, ``text_encoder`` or both), from
            its tensor names.
    """

    key: str
    path: Path
    sha256: str
    scale: float
    adapter_name: str
    parts: tuple[str, ...] = LORA_COMPONENTS

    def identity(self) -> dict[str, Any]:
        """What enters cache keys: the file's content and how much of it (not its name)."""
        return {"lora": self.sha256, "scale": self.scale}


def resolve_lora(
    entries: Sequence[LoraEntry], *, base_dir: Path, hash_memo: Path | None
) -> tuple[list[LoraFile], list[Problem]]:
    """Check and hash the recipe's LoRA files; reads their headers, loads no tensor.

    Returns:
        The files, and a problem for each entry that cannot be used.
    """
    files: list[LoraFile] = []
    problems: list[Problem] = []
    names: set[str] = set()
    for index, entry in enumerate(entries):
        key = f"model.lora[{index}]"
        path = Path(base_dir) / Path(entry.path).expanduser()
        reason, parts = _read_lora_header(path, entry.path)
        if reason is not None:
            problems.append(Problem(reason, key=f"{key}.path"))
            continue
        name = entry.adapter_name or f"lora_{index}"
        if name in names:
            problems.append(
                Problem(f"adapter name {name!r} is used twice", key=f"{key}.adapter_name")
            )
            continue
        names.add(name)
        sha256 = hash_files(path.parent, [path.name], hash_memo)[path.name]
        files.append(LoraFile(key, path, sha256, entry.scale, name, parts))
    return files, problems


def _read_lora_header(path: Path, value: str) -> tuple[str | None, tuple[str, ...]]:
    """Why ``path`` is not a LoRA file editflow loads (or None), and the components its
    tensors change; from its header alone."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return f"file not found: {value} (relative paths start at the recipe's folder)", ()
    if path.suffix != ".safetensors":
        return (
            f"{value}: LoRA weights are read from .safetensors files only (a pickle can run code)"
        ), ()
    try:
        with safe_open(path, framework="numpy") as handle:
            names = list(handle.keys())
    except (SafetensorError, OSError) as error:
        return f"{value} is not a safetensors file: {error}", ()
    # diffusers' loader accepts a file only when every tensor name says "lora".
    others = [name for name in names if "lora" not in name]
    if not names or others:
        example = f" (such as {others[0]!r})" if others else ""
        return (
            f"{value} is not a LoRA: {len(others) or 'no'} tensor names lack 'lora'{example}"
        ), ()
    parts = tuple(
        part
        for part, prefixes in zip(LORA_COMPONENTS, _PART_PREFIXES_OF, strict=True)
        if any(name.startswith(prefixes) for name in names)
    )
    if not parts:
        every = [prefix for prefixes in _PART_PREFIXES_OF for prefix in prefixes]
        return (
            f"{value} is not a LoRA of a Stable Diffusion UNet or text encoder: no tensor name"
            f" starts with {', '.join(repr(prefix) for prefix in every)}"
        ), ()
    return None, parts


def apply_lora(module: Any, component: str, files: Sequence[LoraFile]) -> None:
    """Fuse each LoRA's factors for ``component`` into ``module`` at its scale, in place.

    As diffusers' pipelines do: ``load_lora_weights``, ``set_adapters(names, scales)``,
    ``fuse_lora``, ``unload_lora_weights``; afterwards ``module`` holds ``W + scale * delta``
    in its own layers and no peft layer remains. A compiled module is changed through its
    original (compilation happens at the first call).

    Raises:
        ModelUnavailableError: A file changed since planning, or does not fit the module.
    """
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader

    if component not in LORA_COMPONENTS or not files:
        return
    target = getattr(module, "_orig_mod", module)
    parts = _parts_class()(**{component: target})
    loaded = []
    for lora in files:
        if sha256_file(lora.path) != lora.sha256:
            raise ModelUnavailableError(
                f"{lora.path.name} changed since the recipe was planned",
                key=f"{lora.key}.path",
                hint="run again: the new file gets new cache keys",
            )
        try:
            state_dict, alphas, metadata = Loader.lora_state_dict(
                str(lora.path), return_lora_metadata=True
            )
            if not any(name.startswith(f"{component}.") for name in state_dict):
                continue  # a LoRA may change only the UNet, or only the text encoder
            load = (
                Loader.load_lora_into_unet
                if component == "unet"
                else Loader.load_lora_into_text_encoder
            )
            load(state_dict, alphas, target, adapter_name=lora.adapter_name, metadata=metadata)
        except (ValueError, KeyError, RuntimeError) as error:
            raise ModelUnavailableError(
                f"{lora.path.name} does not fit the model's {component}: {_first_reason(error)}",
                key=f"{lora.key}.path",
                hint="use a LoRA trained for this model",
            ) from None
        if lora.adapter_name not in getattr(target, "peft_config", {}):
            raise ModelUnavailableError(
                f"{lora.path.name} changes no layer of the model's {component}",
                key=f"{lora.key}.path",
                hint="use a LoRA trained for this model",
            )
        loaded.append(lora)
    if loaded:
        names = [lora.adapter_name for lora in loaded]
        parts.set_adapters(names, [lora.scale for lora in loaded])
        parts.fuse_lora(components=[component], adapter_names=names)
        parts.unload_lora_weights()


def _first_reason(error: Exception) -> str:
    """An error's first line, with the line it introduces ("Error(s) in ...:" and a detail)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [repr(error)]
    return " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]


@functools.cache
def _parts_class() -> type:
    """A stand-in for a pipeline over the parts that are loaded, so that the pipeline's own
    LoRA methods apply to them (they skip a part that is None)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    class LoraParts(StableDiffusionLoraLoaderMixin):
        def __init__(self, unet: Any = None, text_encoder: Any = None) -> None:
            self.unet, self.text_encoder = unet, text_encoder
            self._merged_adapters: set[str] = set()

    return LoraParts
