"""Loading torch files without running code: the one error every refusal raises, and the one safe `torch.load`.

Everything this package reads from disk or the Hub is safetensors, JSON or a torch pickle loaded with
`weights_only=True`. A pickle that names anything outside torch's allow-list is refused with an
[`UnsafeCheckpointError`] that names the file, and never with torch's own advice to turn the safe loader off.
"""

from __future__ import annotations

import os
import pickle
import re
from typing import Any

import torch


class UnsafeCheckpointError(ValueError):
    """A file cannot be loaded without the risk of running code (or cannot be read safely), so it is not loaded."""


def unsafe_pickle_error(path: str | os.PathLike, error: BaseException) -> UnsafeCheckpointError:
    """The refusal of a pickle that `torch.load(weights_only=True)` rejected, naming `path` and the refused global.

    Args:
        path (`str` or `os.PathLike`):
            The refused file.
        error (`BaseException`):
            torch's `pickle.UnpicklingError`; only the refused global's name is taken from it, because torch's message
            advises turning the safe loader off, i.e. running the file's code.

    Returns:
        `UnsafeCheckpointError`: raise it `from None`, so that torch's advice is not chained either.
    """
    # torch >= 2.4 words it "GLOBAL <module>.<name>".
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    what = f" (it references {found.group(1)})" if found else ""
    return UnsafeCheckpointError(
        f"{path} contains non-tensor pickled objects{what}, so it is refused for safety: unpickling them could "
        "run arbitrary code. FlowMo checkpoints hold only tensors and plain containers (dicts, lists, numbers, "
        "strings). Obtain the checkpoint from its original source, or re-save its state dicts as tensors only."
    )


def load_torch_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load(path, weights_only=True)`, with a refused pickle turned into an [`UnsafeCheckpointError`].

    Args:
        path (`str` or `os.PathLike`):
            A torch file (`.pth`, `.pt`, `.bin`).
        map_location (`str` or `torch.device`, *optional*, defaults to `"cpu"`):
            Where the tensors are loaded.

    Returns:
        `Any`: the tensors and plain containers the file holds.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise unsafe_pickle_error(path, error) from None


__all__ = ["UnsafeCheckpointError", "load_torch_file", "unsafe_pickle_error"]
