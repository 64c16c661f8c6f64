"""Image data shared by training, evaluation and pre-tokenization: datasets, decoding and transforms, batch loaders."""

from . import datasets, loaders, transforms

# Each module's __all__ is the one list of its public names; the package offers them all.
from .datasets import *  # noqa: F403
from .loaders import *  # noqa: F403
from .transforms import *  # noqa: F403

__all__ = [*datasets.__all__, *loaders.__all__, *transforms.__all__]

# The loader's entry points and its skipped-image accounting live in modules of their own (sampling and streams are
# internal); the package offers their names as before.
from . import builders, decoding  # noqa: E402
from .builders import *  # noqa: E402, F403
from .decoding import *  # noqa: E402, F403

__all__ += [*builders.__all__, *decoding.__all__]
