"""Writing files so that an interrupted job never leaves a truncated one behind, with the modes the user asked for.

Every file the package writes gets the mode a plain `open()` would give it under the process' umask (0644 under
umask 022, 0664 under 002: a group sharing a cluster folder can read, or write, what a job wrote). `tempfile.mkstemp`
and `tempfile.mkdtemp` ignore the umask (they create 0600 files and 0700 folders, so that a temporary file is private
while it is written), so what goes through them here is given the umask's mode before it is published.
"""

import contextlib
import os
import stat
import tempfile
import threading
from collections.abc import Iterator
from typing import BinaryIO

PathLike = str | os.PathLike

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process' umask, read without changing it where the kernel shows it (`Umask:` in `/proc/self/status`, Linux
    4.7 and later); elsewhere set and restored under a lock.

    Read at every call rather than cached: a program may change its umask after importing this package.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # `os.umask` can only be read by setting it. The temporary value is the strictest one, so that a file another thread
    # creates in between is private rather than too open; the lock keeps two callers from restoring each other's value.
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The permission bits of a new file (`0o666 & ~umask`) or folder (`0o777 & ~umask`) under the current umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def apply_default_mode(path: PathLike, recursive: bool = False) -> None:
    """Give `path` (and, with `recursive`, everything under a folder `path`) the mode `open()` / `os.makedirs` would give
    a new file / folder under the current umask: for a folder this package filled whole through libraries that do not
    follow the umask (a checkpoint before it is published), where [`follow_umask`]'s bookkeeping is not needed.
    """
    file_mode, folder_mode = default_mode(), default_mode(directory=True)
    os.chmod(path, folder_mode if os.path.isdir(path) else file_mode)
    if recursive and os.path.isdir(path):
        for root, folders, files in os.walk(path):
            for name in folders:
                os.chmod(os.path.join(root, name), folder_mode)
            for name in files:
                os.chmod(os.path.join(root, name), file_mode)


def _identities(folder: str) -> dict[str, tuple[int, int]]:
    """`path -> (inode, mode)` of everything under `folder` (symbolic links left out: chmod would follow them)."""
    found = {}
    for root, folders, files in os.walk(folder):
        for name in folders + files:
            path = os.path.join(root, name)
            try:
                status = os.lstat(path)
            except FileNotFoundError:  # removed while listed
                continue
            if not stat.S_ISLNK(status.st_mode):
                found[path] = (status.st_ino, status.st_mode)
    return found


@contextlib.contextmanager
def follow_umask(folder: PathLike) -> Iterator[None]:
    """Give what a library writes under `folder` inside the block the modes a plain `open()` / `os.makedirs` would.

    For writers this package does not control: safetensors (0.5 and later) writes every file through a 0600 temporary
    file that it renames, so diffusers' `save_pretrained` and Accelerate's `save_state` publish 0600 weights whatever the
    umask. Only files and folders that are new when the block ends (a path not there before, or replaced by another
    inode, or of another mode: a freed inode number can come back) are changed: a file that was there before keeps its
    mode, as it would under `open()`, and so does `folder`.
    """
    folder = os.fspath(folder)
    before = _identities(folder) if os.path.isdir(folder) else {}
    yield
    file_mode, folder_mode = default_mode(), default_mode(directory=True)
    for path, identity in _identities(folder).items():
        if before.get(path) != identity:
            with contextlib.suppress(FileNotFoundError):  # a temporary file renamed since it was listed
                os.chmod(path, folder_mode if stat.S_ISDIR(identity[1]) else file_mode)


class FollowUmaskSaveMixin:
    """`save_pretrained` whose files get the umask's modes ([`follow_umask`]), for diffusers models and pipelines.

    Put it before `ModelMixin` / `DiffusionPipeline` in the bases.
    """

    def save_pretrained(self, save_directory: PathLike, *args, **kwargs):
        with follow_umask(save_directory):
            return super().save_pretrained(save_directory, *args, **kwargs)


@contextlib.contextmanager
def atomic_write(path: PathLike, prefix: str | None = None) -> Iterator[BinaryIO]:
    """Open a temporary binary file beside `path`; when the block succeeds it replaces `path` (`os.replace`, atomic on
    POSIX and Windows), when it fails it is deleted. `path` therefore either keeps its old content or is complete, and
    has the mode a plain `open()` would give it under the umask (see [`default_mode`]), not `mkstemp`'s 0600.

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
        # Before the first byte, so that the published file never had another mode (os.fchmod: POSIX; Windows keeps
        # only a read-only flag, which mkstemp does not set).
        if hasattr(os, "fchmod"):
            os.fchmod(descriptor, default_mode())
        with os.fdopen(descriptor, "wb") as file:
            yield file
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


__all__ = ["FollowUmaskSaveMixin", "apply_default_mode", "atomic_write", "current_umask", "default_mode", "follow_umask"]
