"""Writing files so that an interrupted job never leaves a truncated one behind."""

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

PathLike = str | os.PathLike


@contextlib.contextmanager
def atomic_write(path: PathLike, prefix: str | None = None) -> Iterator[BinaryIO]:
    """Open a temporary binary file beside `path`; when the block succeeds it replaces `path` (`os.replace`, atomic on
    POSIX and Windows), when it fails it is deleted. `path` therefore either keeps its old content or is complete.

    Args:
        path (`PathLike`):
            the file to write; its folder is created if needed.
        prefix (`str`, *optional*):
            start of the temporary file's name (default `.<name>-`); it ends in `.tmp`, so globs such as
            `*.parquet` or `*.json` never see it, and a caller can find leftovers of a killed process by the prefix.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=prefix or f".{os.path.basename(path)}-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(descriptor, "wb") as file:
            yield file
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
