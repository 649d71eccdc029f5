"""What the benchmarks share besides quiet output: where the built-in models are kept."""

from __future__ import annotations

from pathlib import Path


def models_dir() -> Path:
    """The folder ``editflow run`` keeps built-in models in ($EDITFLOW_MODELS, else the default
    cache's ``models/``), so a benchmark builds ``tiny`` once, not once per run."""
    from editflow.engine.api import models_dir_for, open_cache

    return models_dir_for(open_cache())
