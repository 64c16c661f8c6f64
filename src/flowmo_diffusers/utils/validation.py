"""Checks of user-given values (arguments, `config.json` entries) that name the value and what was expected.

`bool` is a subclass of `int` in Python and a JSON `true` loads as `True`: every integer check here refuses booleans,
so `"depth": true` is an error, not a depth of 1. numpy integers (`np.int64(2)`) are accepted as integers.
"""

from __future__ import annotations

import argparse
import numbers
from typing import Any

import numpy as np
import torch


def is_integer(value: Any) -> bool:
    """Whether `value` is an integer (Python or numpy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and not _is_numpy_bool(value)


def is_real(value: Any) -> bool:
    """Whether `value` is a real number (int, float, numpy scalar), not a bool nor complex."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not _is_numpy_bool(value)


def _is_numpy_bool(value: Any) -> bool:
    return type(value).__name__ == "bool_" and type(value).__module__ == "numpy"


class WrongTypeError(TypeError, ValueError):
    """A value of the wrong type (a string, a bool, a float where an integer belongs).

    Both a TypeError, Python's convention, and a ValueError, diffusers' (a pipeline's `check_inputs` raises
    ValueError for every bad argument), so that callers catching either, as the hand-written checks these helpers
    replace made them do, keep working.
    """


def _integer_kind(minimum: int | None, maximum: int | None) -> str:
    if maximum is None and minimum == 1:
        return "a positive integer"
    if maximum is None and minimum is not None:
        return f"an integer >= {minimum}"
    if minimum is None and maximum is not None:
        return f"an integer <= {maximum}"
    return "an integer"  # an interval is named by the range error


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """`int(value)` if `value` is an integer in `[minimum, maximum]`, else an error naming `name`.

    Raises:
        WrongTypeError: not an integer (a bool, a float, a string); a TypeError and a ValueError.
        ValueError: outside `[minimum, maximum]`.
    """
    kind = _integer_kind(minimum, maximum)
    if not is_integer(value):
        raise WrongTypeError(f"{name} must be {kind}, got {value!r} ({type(value).__name__})")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        expected = f"an integer in {_range(minimum, maximum)}" if kind == "an integer" else kind
        raise ValueError(f"{name} must be {expected}, got {value}")
    return value


def check_optional_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int | None:
    """None (the argument's default: not set), or [`check_int`]'s `int(value)`."""
    return None if value is None else check_int(name, value, minimum, maximum)


def check_float(
    name: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
) -> float:
    """`float(value)` if `value` is a finite real number in `[minimum, maximum]` (`exclusive_minimum`: strictly above
    `minimum`), else an error naming `name`.

    Raises:
        WrongTypeError: not a real number (a bool, a string, a complex number); a TypeError and a ValueError.
        ValueError: NaN or infinite, or out of range.
    """
    if minimum is not None and maximum is not None:
        kind = "a real number"  # the range error names the interval
    else:
        kind = "a finite real number" + (
            f" {'>' if exclusive_minimum else '>='} {minimum:g}" if minimum is not None
            else f" <= {maximum:g}" if maximum is not None else ""
        )
    if not is_real(value):
        raise WrongTypeError(f"{name} must be {kind}, got {value!r} ({type(value).__name__})")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    if exclusive_minimum and value <= minimum:
        raise ValueError(f"{name} must be greater than {minimum:g}, got {value:g}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        if kind == "a real number":
            raise ValueError(f"{name} must lie in {_range(minimum, maximum)}, got {value:g}")
        raise ValueError(f"{name} must be {kind}, got {value:g}")
    return value


def check_optional_float(
    name: str, value: Any, minimum: float | None = None, maximum: float | None = None, exclusive_minimum: bool = False
) -> float | None:
    """None (the argument's default: not set), or [`check_float`]'s `float(value)`."""
    return None if value is None else check_float(name, value, minimum, maximum, exclusive_minimum)


def check_bool(name: str, value: Any) -> bool:
    """`value` if it is a bool, else a [`WrongTypeError`] naming `name` (so that `"false"` or `0` is not a flag)."""
    if not isinstance(value, bool):
        raise WrongTypeError(f"{name} must be true or false, got {value!r} ({type(value).__name__})")
    return value


def _range(minimum, maximum) -> str:
    def bound(value, infinity):
        return infinity if value is None else f"{value:g}" if isinstance(value, float) else str(value)

    return f"[{bound(minimum, '-inf')}, {bound(maximum, 'inf')}]"


def _int_at_least(text: str, minimum: int, expected: str) -> int:
    """`text` as an int of at least `minimum`, else `argparse.ArgumentTypeError` saying what was `expected`."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """`argparse` type of flags that must be at least 1 (e.g. `--checkpoints_total_limit`): refused at parsing."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """`argparse` type of flags where 0 is allowed (e.g. `--max_skipped_steps 0`: stop at the first bad step)."""
    return _int_at_least(text, 0, "an integer >= 0")


__all__ = [
    "WrongTypeError",
    "check_bool",
    "check_float",
    "check_int",
    "check_optional_float",
    "check_optional_int",
    "is_integer",
    "is_real",
    "non_negative_int",
    "positive_int",
]


# ----------------------------------------------------------------------------------------------------------------------
# tensors given to models and pipelines (shapes and dtypes only: never a tensor value, so nothing waits on the device)
# ----------------------------------------------------------------------------------------------------------------------


def check_tensor(name: str, value: Any, shape: tuple[int | None, ...] | None = None) -> torch.Tensor:
    """`value` if it is a `torch.Tensor` of `shape` (`None` entries take any size), else an error naming `name`.

    Raises:
        TypeError: `value` is not a tensor (a numpy array says how to convert it).
        ValueError: the tensor's shape is not `shape`.
    """
    if not isinstance(value, torch.Tensor):
        hint = ": convert it with torch.from_numpy(...)" if isinstance(value, np.ndarray) else ""
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}{hint}")
    if shape is not None and (
        value.ndim != len(shape) or any(size is not None and size != got for size, got in zip(shape, value.shape))
    ):
        sizes = ", ".join("*" if size is None else str(size) for size in shape)
        raise ValueError(f"{name} must have shape ({sizes}{',' if len(shape) == 1 else ''}), got {tuple(value.shape)}")
    return value


def check_floating_dtype(name: str, value: torch.Tensor, dtype: torch.dtype) -> None:
    """Raise ValueError unless the float tensor `value` can meet weights of `dtype`.

    Without autocast a matmul needs one dtype on both sides (otherwise PyTorch fails deep inside the first layer);
    under autocast half and single precision are cast for it, float64 never is.
    """
    if value.dtype == dtype:
        return
    if value.dtype != torch.float64 and torch.is_autocast_enabled(value.device.type):
        return
    raise ValueError(
        f"{name} must have the model's dtype {dtype}, got {value.dtype}: pass {name}.to({dtype}) (or run under "
        "autocast for half / single precision)"
    )


def as_integer_tensor(name: str, value: Any) -> torch.Tensor:
    """Integer ids given as a tensor, a numpy array or a (nested) list of ints -> a tensor (tensors pass unchanged).

    Raises:
        TypeError: strings (`"1,2"`, `["1", "2"]`) or other non-numbers.
        ValueError: a ragged nested list (rows of different lengths), or numbers that are not integers (floats,
            bools).
    """
    if not isinstance(value, torch.Tensor):
        if isinstance(value, (str, bytes)):
            raise TypeError(
                f"{name} must be integer ids (a tensor, an array or a nested list of ints), got the string {value!r:.60}"
            )
        try:
            array = np.asarray(value)
        except ValueError:  # numpy (>= 1.24) refuses ragged nesting
            raise ValueError(
                f"{name} must be a rectangular (batch, length) array of ids, got a nested list whose rows have "
                "different lengths"
            ) from None
        if array.size == 0 and array.dtype.kind == "f":
            array = array.astype(np.int64)  # `[]` is float to numpy; the caller says that no id was given
        if array.dtype.kind in "USO":
            kinds = sorted({type(item).__name__ for item in np.asarray(array, dtype=object).reshape(-1)})
            raise TypeError(f"{name} must be integer ids, got elements of type {kinds}")
        value = torch.from_numpy(array)
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers (an integer tensor of ids), got dtype {value.dtype}")
    return value


__all__ += ["as_integer_tensor", "check_floating_dtype", "check_tensor"]


# ----------------------------------------------------------------------------------------------------------------------
# config.json values
# ----------------------------------------------------------------------------------------------------------------------


class IntRule:
    """An integer in `[minimum, maximum]` (never a bool, never a string)."""

    def __init__(self, minimum: int, maximum: int):
        self.minimum, self.maximum = minimum, maximum

    def __call__(self, name: str, value: Any) -> None:
        check_int(name, value, self.minimum, self.maximum)


class FloatRule:
    """A finite real number in `[minimum, maximum]` (`exclusive_minimum`: strictly above `minimum`)."""

    def __init__(self, minimum: float | None = None, maximum: float | None = None, exclusive_minimum=False):
        self.minimum, self.maximum, self.exclusive_minimum = minimum, maximum, exclusive_minimum

    def __call__(self, name: str, value: Any) -> None:
        check_float(name, value, self.minimum, self.maximum, self.exclusive_minimum)


class BoolRule:
    def __call__(self, name: str, value: Any) -> None:
        check_bool(name, value)


class IntSequenceRule:
    """A list (or tuple) of `length` integers, each in `[minimum, maximum]`."""

    def __init__(self, length: int, minimum: int, maximum: int):
        self.length, self.minimum, self.maximum = length, minimum, maximum

    def __call__(self, name: str, value: Any) -> None:
        if not isinstance(value, (list, tuple)) or len(value) != self.length:
            raise TypeError(f"{name} must be a list of {self.length} integers, got {value!r}")
        for index, item in enumerate(value):
            check_int(f"{name}[{index}]", item, self.minimum, self.maximum)


class OptionalRule:
    """None, or what `rule` accepts."""

    def __init__(self, rule):
        self.rule = rule

    def __call__(self, name: str, value: Any) -> None:
        if value is not None:
            self.rule(name, value)


class FloatPairRule:
    """A list (or tuple) of two finite real numbers, the first at most the second."""

    def __call__(self, name: str, value: Any) -> None:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise TypeError(f"{name} must be a pair [low, high] of numbers, got {value!r}")
        low, high = (check_float(f"{name}[{index}]", item) for index, item in enumerate(value))
        if low > high:
            raise ValueError(f"{name} must be [low, high] with low <= high, got {list(value)}")


def validate_config(owner: str, values: dict, rules: dict) -> None:
    """Check `config.json` (or constructor) values against `rules` (`{key: rule}`), before any weight exists.

    Raises:
        ValueError: naming `owner`, the key, what was expected and what was found (also for a wrong type, e.g.
            `"32"` as a string or `true` as a depth: a config file is data, and its errors are value errors).
    """
    for key, rule in rules.items():
        if key not in values:
            continue
        try:
            rule(key, values[key])
        except (TypeError, ValueError) as error:
            raise ValueError(f"{owner} config: {error}") from None


__all__ += [
    "BoolRule",
    "FloatPairRule",
    "FloatRule",
    "IntRule",
    "IntSequenceRule",
    "OptionalRule",
    "validate_config",
]
