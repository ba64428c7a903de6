"""Small files written whole or not at all: the configuration, update requests, the kept
service password. One way to do it, so each keeps the same guarantee: after a power cut
the file holds either its old content or its new content, never a mix or nothing."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes, mode: int = 0o640) -> None:
    """Replace ``path`` with ``data``: a temp file beside it (``mode``), written, fsynced,
    renamed over ``path``, and the folder fsynced. Creates the folder if needed. On any
    failure the temp file is removed, ``path`` is left as it was, and the OSError is raised."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make the entries of the directory ``path`` (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
