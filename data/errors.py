"""The one error type of the data package: bad input reported as one readable line."""
from __future__ import annotations

import errno
import os
from typing import Optional

from core.errors import UserError


class DataError(UserError):
    """A data problem (no shard matches, a corrupt set, an unparsable caption...) as a one-line message."""


def blocking_file(path: str) -> Optional[str]:
    """The regular file at ``path`` or above it that keeps ``path`` from being (or becoming) a folder, if any."""
    path = os.path.abspath(path)
    while True:
        if os.path.exists(path):
            return None if os.path.isdir(path) else path
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent


def os_error(exc: OSError) -> str:
    """An OSError as one line naming its file(s), e.g. "out/train: Not a directory" (the entry points print it
    instead of a traceback: an output folder under a regular file, a full disk, no permission)."""
    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    if names and exc.errno in (errno.EEXIST, errno.ENOTDIR):
        blocking = blocking_file(names[0])
        if blocking:
            return f"{blocking} is a file, not a folder" if blocking == os.path.abspath(names[0]) else \
                f"{names[0]}: {blocking} is a file, not a folder"
    reason = exc.strerror or (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return f"{' -> '.join(names)}: {reason}" if names else reason
