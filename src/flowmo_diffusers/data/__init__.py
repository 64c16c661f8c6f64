"""Image data shared by training, evaluation and pre-tokenization: datasets, decoding and transforms, batch loaders
and their builders, and the numbering and sharding of evaluation images (evaluation_stream). The sampling of
map-style rows and the streams are internal to the loaders."""

from . import builders, datasets, decoding, evaluation_stream, loaders, transforms

# Each module's __all__ is the one list of its public names; the package offers them all.
from .builders import *  # noqa: F403
from .datasets import *  # noqa: F403
from .decoding import *  # noqa: F403
from .evaluation_stream import *  # noqa: F403
from .loaders import *  # noqa: F403
from .transforms import *  # noqa: F403

__all__ = [
    *builders.__all__, *datasets.__all__, *decoding.__all__, *evaluation_stream.__all__, *loaders.__all__,
    *transforms.__all__,
]
