"""Lazy imports of the evaluation-only dependencies.

`flowmo_diffusers` installs without scikit-image, scipy, lpips or pytorch-fid (they
live in the `eval` extra), so the metric modules import them on first use and
explain how to install them instead of failing at `import flowmo_diffusers`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# import name -> PyPI distribution name, for the error message.
_DISTRIBUTION_NAMES = {
    "skimage": "scikit-image",
    "scipy": "scipy",
    "lpips": "lpips",
    "pytorch_fid": "pytorch-fid",
    "evaluate": "evaluate",
    "datasets": "datasets",
}


def require(module_name: str) -> ModuleType:
    """Import `module_name` or raise an ImportError that says how to install it."""
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        distribution = _DISTRIBUTION_NAMES.get(module_name.split(".")[0], module_name)
        raise ImportError(
            f"flowmo_diffusers.metrics needs `{distribution}` for this metric. "
            f"Install the evaluation extra with `pip install 'flowmo-diffusers[eval]'` "
            f"(or `pip install {distribution}`)."
        ) from error
