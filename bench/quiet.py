"""Benchmarks print their figures only: no library progress bars, logs or warnings between."""

from __future__ import annotations

import logging
import os
import warnings


def quiet() -> None:
    """Silence diffusers, transformers and huggingface_hub (call before importing them)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.simplefilter("ignore")
    logging.getLogger().setLevel(logging.ERROR)
