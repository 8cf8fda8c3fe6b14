"""The one way this package downloads: with a socket timeout, so that a dead network fails instead of hanging."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["DOWNLOAD_TIMEOUT_S", "DataNotFoundError", "download_timeout"]

class DataNotFoundError(FileNotFoundError):
    """A data set is not on disk and cannot be prepared from local files."""


#: seconds a download may wait on the network before it fails
DOWNLOAD_TIMEOUT_S = 30.0


@contextmanager
def download_timeout(seconds: float = DOWNLOAD_TIMEOUT_S) -> Iterator[None]:
    """Give every socket opened inside the block a timeout of ``seconds`` (the previous default is restored).

    Example:
        >>> with download_timeout(5.0):
        ...     socket.getdefaulttimeout()
        5.0
    """
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)
