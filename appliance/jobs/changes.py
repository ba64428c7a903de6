"""Waiting for a change in a folder (Linux inotify): how the forwarder learns at once that
another process (the Storage SCP, a CD import) wrote the index, without looking many times
a second.

:class:`FolderWatch` is a wake-up only: it says that some file directly in the folder was
written, never what; the caller looks at its own state then (and on a timeout all the same,
so a missed or dropped event costs time, never data). :func:`watch` returns None where
inotify cannot be had (another system, the user's limit of inotify instances reached).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import threading
from pathlib import Path

log = logging.getLogger(__name__)

#: inotify(7): a file in the watched folder was written.
IN_MODIFY = 0x00000002
IN_CLOEXEC = os.O_CLOEXEC
IN_NONBLOCK = os.O_NONBLOCK
#: Bytes read from the inotify descriptor at once (events are 16 bytes and a name).
_READ = 64 * 1024


class FolderWatch:
    """An inotify descriptor watching writes to the files of one folder, and a pipe that
    :meth:`poke` writes to; :meth:`close` releases both."""

    def __init__(self, fd: int, folder: Path) -> None:
        self.fd = fd
        self.folder = folder
        self._poke_r, self._poke_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._lock = threading.Lock()
        self._closed = False
        self._poller = select.poll()
        for watched in (fd, self._poke_r):
            self._poller.register(watched, select.POLLIN)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a write in the folder or a :meth:`poke`;
        return True if either came (every event so far is consumed)."""
        ready = self._poller.poll(max(timeout, 0.0) * 1000)
        for fd, _ in ready:
            _drain(fd)
        return bool(ready)

    def poke(self) -> None:
        """End a :meth:`wait` now (from another thread; nothing once closed)."""
        with self._lock:
            if self._closed:
                return
            try:
                os.write(self._poke_w, b"\0")
            except BlockingIOError:  # the pipe is full: a wake-up is pending anyway
                pass

    def close(self) -> None:
        """Close the descriptors (no thread may be in :meth:`wait`)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for fd in (self.fd, self._poke_r, self._poke_w):
                try:
                    os.close(fd)
                except OSError:
                    pass


def _drain(fd: int) -> None:
    while True:
        try:
            if not os.read(fd, _READ):
                return
        except (BlockingIOError, InterruptedError):
            return


def watch(folder: Path) -> FolderWatch | None:
    """A :class:`FolderWatch` on ``folder``, or None (logged) if inotify is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
    except (OSError, AttributeError) as exc:
        log.info("no inotify (%s): the forwarding queue is looked at on a timer only", exc)
        return None
    if fd < 0:
        code = ctypes.get_errno()
        log.info("no inotify (%s): the forwarding queue is looked at on a timer only",
                 os.strerror(code) + (" (fs.inotify.max_user_instances reached)" if code == errno.EMFILE else ""))
        return None
    if libc.inotify_add_watch(fd, os.fsencode(folder), IN_MODIFY) < 0:
        code = ctypes.get_errno()
        os.close(fd)
        log.info("cannot watch %s with inotify (%s): the forwarding queue is looked at on a timer only", folder,
                 os.strerror(code))
        return None
    return FolderWatch(fd, folder)
