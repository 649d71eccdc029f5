"""The check every stage's outputs pass before they are cached: no NaN."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from editflow.errors import EditflowError
from editflow.lazy import lazy

torch = lazy("torch")


def check_no_nan(
    outputs: Mapping[str, Any],
    dtype: torch.dtype,
    reason: Callable[[], str | None] = lambda: None,
) -> None:
    """Refuse outputs that hold NaN: cached, they would spread to every stage downstream and
    end as a black or grey image with no word of where they came from. The engine checks
    every output but those of a type whose NaN means something (:data:`NAN_IS_A_VALUE`:
    scores, metrics); infinity passes (the PSNR of equal images).

    Raises:
        EditflowError: ``reason()`` where it says why, else naming the first such output and
            how many of its values are NaN.
    """
    for port, value in outputs.items():
        for tensor in value if isinstance(value, list | tuple) else [value]:
            if not (isinstance(tensor, torch.Tensor) and tensor.is_floating_point()):
                continue
            if bool(torch.isnan(tensor).any()):
                if (why := reason()) is not None:
                    raise EditflowError(why)
                nans = int(torch.isnan(tensor).sum())
                low = dtype in (torch.float16, torch.bfloat16)
                raise EditflowError(
                    f"output {port!r} has {nans} NaN values of {tensor.numel()}",
                    hint=f"{str(dtype).removeprefix('torch.')} can overflow where float32 does"
                    ' not: try model.dtype = "float32"'
                    if low
                    else None,
                )
