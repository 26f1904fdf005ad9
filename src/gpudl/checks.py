"""Argument checks shared by the models and the data modules: each raises ValueError (TypeError for
a non-callable factory) naming the owner, the argument, what it got and what was expected, and
returns the value as a plain Python type (hyperparameters end up in checkpoints, which hold plain
types only so they load with torch.load(weights_only=True)).

    check_int(owner, "hidden", hidden)                         # an int >= 1
    check_int(owner, "batch_size", bs, allow_none=True, none_means="full batch")
    check_float(owner, "val_fraction", f, 0.0, 1.0, low_open=True, high_open=True)
    check_int_tuple(owner, "image_shape", shape, length=3)     # positive ints
    check_choice(owner, "pool", pool, ("cls", "mean"))
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence


def _is_int(value: Any) -> bool:
    # numbers.Integral covers numpy's integers; bool is an int to Python but never a size.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(owner: str, name: str, value: Any, minimum: int = 1, *, allow_none: bool = False,
              none_means: str = "") -> int | None:
    """An int >= minimum (or None when allowed); returns it as int."""
    if value is None and allow_none:
        return None
    if not _is_int(value) or value < minimum:
        extra = f" or None ({none_means})" if allow_none and none_means else " or None" if allow_none else ""
        raise ValueError(f"{owner}: {name} must be an int >= {minimum}{extra}, got {value!r}")
    return int(value)


def check_float(owner: str, name: str, value: Any, low: float = -math.inf, high: float = math.inf, *,
                low_open: bool = False, high_open: bool = False, allow_none: bool = False) -> float | None:
    """A finite real number in the interval [low, high] (an end is open when `*_open`); returns it
    as float. None passes when allowed."""
    if value is None and allow_none:
        return None
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        left = "(" if low_open or low == -math.inf else "["
        right = ")" if high_open or high == math.inf else "]"
        interval = f"{left}{low}, {high}{right}"
        extra = " or None" if allow_none else ""
        raise ValueError(f"{owner}: {name} must be a number in {interval}{extra}, got {value!r}")
    return float(value)


def check_bool(owner: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: {name} must be True or False, got {value!r}")
    return value


def check_choice(owner: str, name: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_int_tuple(owner: str, name: str, value: Any, length: int | None = None) -> tuple[int, ...]:
    """A non-empty list/tuple (Hydra passes a ListConfig) of ints >= 1, returned as a plain tuple."""
    try:
        items = tuple(value)
    except TypeError:
        items = None
    if (
        items is None
        or isinstance(value, str)
        or len(items) == 0
        or (length is not None and len(items) != length)
        or not all(_is_int(v) and v >= 1 for v in items)
    ):
        size = f"{length} " if length is not None else ""
        raise ValueError(f"{owner}: {name} must be a non-empty sequence of {size}ints >= 1, got {value!r}")
    return tuple(int(v) for v in items)


def check_factory(owner: str, name: str, value: Any) -> None:
    """An optimizer/scheduler factory: a callable (Hydra: `_partial_: true`) or None."""
    if value is not None and not callable(value):
        raise TypeError(
            f"{owner}: {name} must be a callable such as functools.partial(torch.optim.Adam, lr=1e-3) "
            f"(Hydra: _partial_: true) or None, got {type(value).__name__}"
        )
