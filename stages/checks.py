"""The one check hook's view: what a kind's ``check(params, view) -> list[Problem]`` sees.

A kind states every rule that ties its parameters to its inputs and models in
:meth:`~editflow.stages.base.StageKind.check`. The plan runs it once per stage, after
parameters are inherited and models resolved and before anything runs; ``run`` never
repeats it. ``StageKind.call`` runs it for direct Python use. See ``docs/checks.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CheckView:
    """What a kind's :meth:`StageKind.check` sees while planning; nothing is loaded.

    Attributes:
        references: Input port -> the reference (or list of references) connected.
        sizes: Input port -> the (height, width) in pixels of the image its value comes from,
            where the plan knows it.
        models: Provider (``model.id`` ...) -> its resolved model (configs and hashes, no
            weights), for the providers the stage's configuration uses; empty for a stage
            the targets do not need.
        configs: ``configs(component, provider)``: a model part's config (``unet``,
            ``vae`` ...), or ``None`` where it is not known without loading.
    """

    references: Mapping[str, str | list[str]] = field(default_factory=dict)
    sizes: Mapping[str, tuple[int, int] | None] = field(default_factory=dict)
    models: Mapping[str, Any] = field(default_factory=dict)
    configs: Callable[[str, str], Mapping[str, Any] | None] = lambda component, provider: None

    def config(self, component: str, provider: str = "model.id") -> Mapping[str, Any] | None:
        """A part's config, from the resolved model's files (no weights are read)."""
        return self.configs(component, provider)

    @property
    def vae_factor(self) -> int | None:
        """Pixels per latent pixel of the model's VAE: each down block but the last halves
        the image. ``None`` for a model without a VAE or one not known yet."""
        vae = self.config("vae")
        if vae is None or "block_out_channels" not in vae:
            return None
        return 2 ** (len(vae["block_out_channels"]) - 1)

    def text_free_model(self) -> str | None:
        """How errors name the model when it has no text encoder (from its identity, or from
        the UNet's config in ``StageKind.call``'s view; nothing loads); ``None`` when it has
        one or that is not known yet, so nothing is refused on a guess."""
        from editflow.models.providers import has_component

        model = self.models.get("model.id")
        if model is not None:
            return None if has_component(model, "text_encoder") else f"model '{model.spec.id}'"
        unet = self.config("unet")
        if unet is not None and "cross_attention_dim" not in unet:
            return "the model"
        return None

    def latent_size(self, port: str) -> tuple[int, int] | None:
        """The latent (height, width) of the image behind ``port``, where both are known."""
        size, factor = self.sizes.get(port), self.vae_factor
        if size is None or factor is None:
            return None
        return size[0] // factor, size[1] // factor
