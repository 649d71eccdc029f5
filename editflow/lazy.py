"""Heavy libraries imported on first use, so that declaring stages, validating and planning
recipes, and runs whose every stage hits the cache never import torch, diffusers or
transformers (ENGINE.md, "Execution": a cached run is a lookup, not a model load).

``torch = lazy("torch")`` stands in for ``import torch``: the first attribute access imports
the module; annotations stay strings (``from __future__ import annotations``).
"""

from __future__ import annotations

import functools
import importlib
import types
from collections.abc import Callable
from typing import Any, TypeVar

Function = TypeVar("Function", bound=Callable[..., Any])


class LazyModule(types.ModuleType):
    """A module that is imported when one of its attributes is first read."""

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("__") and attribute.endswith("__"):
            raise AttributeError(attribute)  # introspection must not import anything
        return getattr(importlib.import_module(self.__name__), attribute)


def lazy(name: str) -> Any:
    """A stand-in for ``import name`` that imports on first attribute access."""
    return LazyModule(name)


def no_grad(function: Function) -> Function:
    """``@torch.no_grad()`` without importing torch until the function runs."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.no_grad():
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
