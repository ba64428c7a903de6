"""Logging to stderr for journald: sd-daemon priority prefixes, no timestamps or colours.

When stderr is not connected to the journal (``JOURNAL_STREAM`` unset, e.g. a developer's
terminal), the prefix is left out and a time is shown instead.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import warnings
from typing import TextIO

_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class JournalFormatter(logging.Formatter):
    """``<6>appliance.net.scp: message`` lines that journald turns into priorities."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6)
        text = f"{record.name}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines())


#: Loggers of libraries talking to a programmer, not to the operator: pydicom (and its children,
#: e.g. ``pydicom.pixels.decoders.base``), Python's warnings (``py.warnings``) and pynetdicom (its
#: "TCP Initialisation Error" and "Association request failed" came with every failed try of
#: the forwarder, beside our own line). A peer's or a disc's bad values, and a peer that does
#: not answer, are reported by our own messages, once each, in words.
LIBRARY_LOGGERS = ("pydicom", "py.warnings", "pynetdicom")


class _LibraryToDebug(logging.Filter):
    """On the operator's handler: a record of :data:`LIBRARY_LOGGERS` is DEBUG whatever level it
    was made at, and dropped unless the root logger is at DEBUG; a Python warning repeating the
    line pydicom has just logged in the same thread (its ``warn_and_log`` does both) is dropped."""

    def __init__(self) -> None:
        super().__init__()
        self._last = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if not any(name == lib or name.startswith(lib + ".") for lib in LIBRARY_LOGGERS):
            return True
        if not logging.getLogger().isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        if name == "py.warnings":
            if getattr(record, "warning_text", None) == getattr(self._last, "text", None):
                self._last.text = None
                return False
            return True
        self._last.text = record.getMessage()
        return True


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: TextIO | None = None, line: str | None = None) -> None:
    """``warnings.showwarning``: a warning is one DEBUG line of ``py.warnings`` (the category,
    the text, where it was raised), not two lines of source on stderr."""
    if file is not None:  # a caller that asked for a file gets it there, as Python would
        file.write(warnings.formatwarning(message, category, filename, lineno, line))
        return
    logging.getLogger("py.warnings").debug("%s: %s (%s:%d)", category.__name__, message, filename, lineno,
                                           extra={"warning_text": str(message)})


def setup(verbosity: int = 0) -> None:
    """Configure the root logger: WARNING by default, INFO with -v, DEBUG with -d.

    ``SYSTEMD_LOG_LEVEL`` (debug, info, warning, err) is honoured when no flag is given.
    pynetdicom stays at WARNING unless debugging."""
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    env = os.environ.get("SYSTEMD_LOG_LEVEL", "").lower()
    if verbosity == 0 and env:
        level = {"debug": logging.DEBUG, "info": logging.INFO, "notice": logging.INFO,
                 "warning": logging.WARNING, "err": logging.ERROR}.get(env, logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    # Library warnings (pydicom's "Invalid value for VR DA", Python's UserWarning) are the
    # library talking to a programmer: DEBUG, never the operator's terminal or journal.
    handler.addFilter(_LibraryToDebug())
    warnings.showwarning = _show_warning
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if level <= logging.DEBUG and verbosity >= 2
                                             else logging.WARNING)
