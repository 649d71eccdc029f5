"""Models: references, identity, lazy loading of declared components, the built-in tiny model.

Stages declare :class:`ComponentSpec` values; the engine resolves the providers they name
with :func:`resolve_providers` (no weights are read) and gives each running stage a view of
:class:`RunModels` that loads exactly what it declared.
"""

from editflow.models.loading import Captioner, ModelWithProcessor
from editflow.models.providers import (
    PROVIDER_TABLE,
    PROVIDERS,
    TINY_ID,
    ModelSpec,
    Provider,
    ResolvedModel,
    models_dir,
    resolve_model,
    resolve_providers,
)
from editflow.models.registry import ModelRegistry, RunModels, StageModels
from editflow.models.section import ModelSection, resolve_device
from editflow.models.specs import ComponentSpec

__all__ = [
    "PROVIDERS",
    "PROVIDER_TABLE",
    "TINY_ID",
    "Captioner",
    "ComponentSpec",
    "ModelRegistry",
    "ModelSection",
    "ModelSpec",
    "ModelWithProcessor",
    "Provider",
    "ResolvedModel",
    "RunModels",
    "StageModels",
    "models_dir",
    "resolve_model",
    "resolve_providers",
    "resolve_device",
]
