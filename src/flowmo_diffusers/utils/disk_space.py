"""Whether a failed write means a full disk, however the writer reported it.

Not every writer keeps the errno: safetensors wraps it in its own exception ("IoError(Os { code: 28, kind:
StorageFull, ...})"), torch's C++ writer raises a bare `RuntimeError`, and network file systems report a full disk
as `EIO`. So the whole exception chain is searched, and a write error on a nearly full disk counts as well.
"""

from __future__ import annotations

import errno
import shutil

# A write error is a full disk when the errno says so, when the text of an exception that lost the errno says so, or
# when the disk has less than this left.
_OUT_OF_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_OUT_OF_SPACE_SIGNS = ("No space left", "Disk quota exceeded", "StorageFull", "QuotaExceeded", "os error 28")
_NEARLY_FULL_BYTES = 2**20


def error_chain(error: BaseException) -> list[BaseException]:
    """`error` and every exception behind it (`__cause__`, `__context__`), each once: wrappers such as safetensors'
    `SafetensorError` or a `RuntimeError` raised while handling an `OSError` keep the real fault there."""
    chain, pending = [], [error]
    while pending:
        link = pending.pop()
        if link is None or any(link is seen for seen in chain):
            continue
        chain.append(link)
        pending += [link.__context__, link.__cause__]
    return chain


def free_bytes(folder: str) -> int | None:
    """Bytes an unprivileged process can still write on the file system of `folder` (None if unknown)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def is_out_of_space(error: BaseException, free: int | None) -> bool:
    """Whether `error`, raised while writing with `free` bytes left on the disk (None: unknown), means the disk (or
    quota) is full.

    Said so by an errno or a message anywhere in the chain of `error`; or any write error on a disk with less than
    1 MiB left: network file systems report a full disk as `EIO`, and torch's C++ writer as a bare
    `RuntimeError` ("basic_ios::clear: iostream error", "PytorchStreamWriter failed writing file").
    """
    for link in error_chain(error):
        if isinstance(link, OSError) and link.errno in _OUT_OF_SPACE_ERRNOS:
            return True
        if any(sign in str(link) for sign in _OUT_OF_SPACE_SIGNS):
            return True
    return free is not None and free < _NEARLY_FULL_BYTES


def error_errno(error: BaseException, default: int = errno.EIO) -> int:
    """The first errno found in the chain of `error` ([`error_chain`]), or `default`."""
    return next((link.errno for link in error_chain(error) if isinstance(link, OSError) and link.errno), default)


__all__ = ["error_chain", "error_errno", "free_bytes", "is_out_of_space"]
