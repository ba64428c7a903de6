"""Adapter to systemd's notification protocol (sd_notify): the only module that imports sdnotify.

:class:`Notifier` tells our manager (systemd, or the supervisor for its children) how we are:
``READY=1``, ``STATUS=``, ``WATCHDOG=1``, ``STOPPING=1``. Without ``NOTIFY_SOCKET`` it does
nothing. :class:`NotifyListener` is the other end, which the supervisor gives its children.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

import sdnotify

log = logging.getLogger(__name__)

#: Environment variables of the protocol; a child gets its own NOTIFY_SOCKET.
NOTIFY_SOCKET = "NOTIFY_SOCKET"
_MAX_DATAGRAM = 4096


#: Seconds a notification may wait for room in the receiver's queue before it is dropped.
SEND_TIMEOUT = 0.5


class Notifier:
    """Sends sd_notify messages to ``$NOTIFY_SOCKET`` (read once, at construction)."""

    def __init__(self, timeout: float = SEND_TIMEOUT) -> None:
        self.enabled = bool(os.environ.get(NOTIFY_SOCKET))
        self._sd = sdnotify.SystemdNotifier() if self.enabled else None
        if self._sd is not None and self._sd.socket is not None:
            # A datagram socket blocks while the receiver's queue is full (only 10 messages
            # by default): a stalled reader must not stall the supervisor, or even its stop.
            self._sd.socket.settimeout(timeout)

    def send(self, *assignments: str) -> None:
        """Send ``KEY=VALUE`` assignments in one datagram (a lost message is not an error;
        one that the receiver has no room for within the timeout is lost)."""
        if self._sd is not None and self._sd.socket is not None:
            try:  # sdnotify would encode as Latin-1 and drop what does not fit; systemd reads UTF-8
                self._sd.socket.sendall("\n".join(assignments).encode("utf-8"))
            except OSError as exc:
                log.debug("sd_notify failed: %s", exc)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def reloading(self) -> None:
        self.send("RELOADING=1")


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings systemd expects (half of WatchdogSec=), or None.

    Follows sd_watchdog_enabled(3): ``WATCHDOG_USEC`` set, and ``WATCHDOG_PID`` unset or ours."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2e6


@dataclass(frozen=True)
class Notification:
    """One datagram a child sent: its assignments, and its pid (from SCM_CREDENTIALS or MAINPID)."""

    pid: int | None
    fields: dict[str, str]


class NotifyListener:
    """A datagram socket at ``path`` receiving children's sd_notify messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        os.chmod(path, 0o600)

    def receive(self, timeout: float) -> Notification | None:
        """Wait up to ``timeout`` s for one message; None on timeout or after :meth:`close`."""
        self.sock.settimeout(timeout)
        try:
            data, ancdata, _flags, _addr = self.sock.recvmsg(_MAX_DATAGRAM, socket.CMSG_SPACE(12))
        except (TimeoutError, OSError):
            return None
        pid: int | None = None
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(payload) >= 4:
                pid = struct.unpack("=i", payload[:4])[0]  # struct ucred
        fields = dict(
            line.split("=", 1) for line in data.decode("utf-8", "replace").splitlines() if "=" in line
        )
        if fields.get("MAINPID", "").isdigit():
            pid = int(fields["MAINPID"])
        return Notification(pid, fields)

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)
