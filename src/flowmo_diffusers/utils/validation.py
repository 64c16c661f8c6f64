"""Checks of user-given values (arguments, `config.json` entries) that name the value and what was expected.

`bool` is a subclass of `int` in Python and a JSON `true` loads as `True`: every integer check here refuses booleans,
so `"depth": true` is an error, not a depth of 1. numpy integers (`np.int64(2)`) are accepted as integers.
"""

from __future__ import annotations

import argparse
import numbers
from typing import Any, Optional


def is_integer(value: Any) -> bool:
    """Whether `value` is an integer (Python or numpy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and not _is_numpy_bool(value)


def is_real(value: Any) -> bool:
    """Whether `value` is a real number (int, float, numpy scalar), not a bool nor complex."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not _is_numpy_bool(value)


def _is_numpy_bool(value: Any) -> bool:
    return type(value).__name__ == "bool_" and type(value).__module__ == "numpy"


def check_int(name: str, value: Any, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    """`int(value)` if `value` is an integer in `[minimum, maximum]`, else a TypeError / ValueError naming `name`."""
    if not is_integer(value):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be an integer in {_range(minimum, maximum)}, got {value}")
    return value


def check_float(
    name: str, value: Any, minimum: Optional[float] = None, maximum: Optional[float] = None
) -> float:
    """`float(value)` if `value` is a finite real number in `[minimum, maximum]`, else TypeError / ValueError."""
    if not is_real(value):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be in {_range(minimum, maximum)}, got {value}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """`value` if it is a bool, else a TypeError naming `name` (so that `"false"` or `0` is not read as a flag)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be true or false, got {value!r} ({type(value).__name__})")
    return value


def _range(minimum, maximum) -> str:
    low = "-inf" if minimum is None else minimum
    high = "inf" if maximum is None else maximum
    return f"[{low}, {high}]"


def positive_int(text: str) -> int:
    """`argparse` type of flags that must be at least 1 (e.g. `--checkpoints_total_limit`): refused at parsing."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


__all__ = ["check_bool", "check_float", "check_int", "is_integer", "is_real", "positive_int"]
