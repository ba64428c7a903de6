"""Logging to stderr for journald: sd-daemon priority prefixes, no timestamps or colours.

When stderr is not connected to the journal (``JOURNAL_STREAM`` unset, e.g. a developer's
terminal), the prefix is left out and a time is shown instead.
"""

from __future__ import annotations

import logging
import os
import sys

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


class _ToDebug(logging.Filter):
    """Logs a record at DEBUG, whatever level it was made at (and drops it unless the root
    logger is at DEBUG)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)


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
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Library warnings (pydicom's "Invalid value for VR UI", Python's UserWarning) are the
    # library talking to a programmer: DEBUG, never the operator's journal. A peer's bad
    # values are reported by our own refusals, once each.
    logging.captureWarnings(True)
    for name in ("py.warnings", "pydicom"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ToDebug) for f in logger.filters):
            logger.addFilter(_ToDebug())
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if level <= logging.DEBUG and verbosity >= 2
                                             else logging.WARNING)
