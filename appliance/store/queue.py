"""The USB export queue and the export history in ``DATA_DIR/usb.sqlite``.

Kept apart from the index, which is a rebuildable cache of the files: the queue and the
history record what the operator asked for and what was written, which no file says.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from appliance.errors import MediaError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (uid TEXT PRIMARY KEY, level TEXT NOT NULL, added_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS exports (
  id INTEGER PRIMARY KEY, started_at TEXT NOT NULL, finished_at TEXT NOT NULL, target TEXT NOT NULL,
  selection TEXT NOT NULL, status TEXT NOT NULL, files INTEGER NOT NULL, bytes INTEGER NOT NULL,
  moves_mark INTEGER NOT NULL
);
PRAGMA user_version = 1;
"""


@dataclass(frozen=True)
class QueueEntry:
    """A study or series waiting for the next USB export."""

    uid: str
    level: str  # "study" or "series"
    added_at: str


@dataclass(frozen=True)
class ExportRecord:
    """One finished USB export as the history keeps it."""

    started_at: str
    finished_at: str
    target: str
    selection: str
    status: str
    files: int
    bytes_written: int
    #: True if this export covered everything new, so the next "new since" starts from it.
    moves_mark: bool


class ExportQueue:
    """The export queue and history at ``data_dir/usb.sqlite``, one connection until :meth:`close`;
    raises :class:`MediaError` if the database cannot be opened."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "usb.sqlite"
        try:
            self._con = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self._con.execute("PRAGMA journal_mode=WAL")
            self._con.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise MediaError(f"cannot open the export queue {self.path}: {exc}") from exc

    def close(self) -> None:
        """Close the connection."""
        self._con.close()

    def entries(self) -> list[QueueEntry]:
        """Return the queued studies and series, oldest first."""
        return [QueueEntry(*r) for r in self._con.execute("SELECT uid, level, added_at FROM queue ORDER BY added_at")]

    def add(self, uid: str, level: str) -> bool:
        """Queue a study or series; return False if it was queued already."""
        cur = self._con.execute(
            "INSERT INTO queue (uid, level, added_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING", (uid, level, _now())
        )
        return cur.rowcount > 0

    def remove(self, uid: str) -> bool:
        """Take ``uid`` off the queue; return False if it was not queued."""
        return self._con.execute("DELETE FROM queue WHERE uid = ?", (uid,)).rowcount > 0

    def mark(self, status: str) -> str | None:
        """Return the start of the last export that ended with ``status`` and moved the mark, or None."""
        row = self._con.execute(
            "SELECT max(started_at) FROM exports WHERE status = ? AND moves_mark = 1", (status,)
        ).fetchone()
        return row[0] if row else None

    def record(self, export: ExportRecord) -> None:
        """Add a finished export to the history."""
        self._con.execute(
            "INSERT INTO exports (started_at, finished_at, target, selection, status, files, bytes, moves_mark)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (export.started_at, export.finished_at, export.target, export.selection, export.status,
             export.files, export.bytes_written, int(export.moves_mark)),
        )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
