"""What the store knows of a study beyond its files: protected, and delivered (exported or
sent) — in ``DATA_DIR/studies.sqlite`` — and which studies an export is reading right now
(``DATA_DIR/busy/``).

Kept apart from the index, which is a rebuildable cache of the files: no file says that a
person protected a study or that it reached a USB stick or a remote SCP, so ``appliance
reindex`` must not lose it. Retention reads both to decide what is safe to delete.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

from appliance.errors import StoreError
from appliance.store.disk import process_running

_SCHEMA = """
CREATE TABLE IF NOT EXISTS marks (
  study_uid TEXT PRIMARY KEY,
  protected INTEGER NOT NULL DEFAULT 0,
  delivered_at TEXT,
  delivered_to TEXT
);
"""

#: The folder of busy files: one per running export, locked while it runs.
BUSY_DIR = "busy"


@dataclass(frozen=True)
class StudyMark:
    """What is recorded of one study: protected by a person, and its last complete delivery."""

    study_uid: str
    protected: bool
    #: When the last export or send that held every object of the study started (ISO 8601, UTC).
    delivered_at: str | None
    #: Where that was: a USB stick's label, or a peer (``AE@host:port``).
    delivered_to: str | None


def now() -> str:
    """The time as the index records it (ISO 8601, UTC, milliseconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class StudyMarks:
    """The marks database at ``data_dir/studies.sqlite``; safe to share between threads.
    Every call opens and closes its own connection: marks change a few times a day."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "studies.sqlite"
        self._lock = threading.Lock()
        with self._connect() as con:
            con.executescript(_SCHEMA)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the study marks {self.path}: {exc}") from exc
        try:
            con.row_factory = sqlite3.Row
            yield con
        except sqlite3.Error as exc:
            raise StoreError(f"the study marks {self.path} could not be read or written: {exc}") from exc
        finally:
            con.close()

    def get(self, study_uids: Iterable[str] | None = None) -> dict[str, StudyMark]:
        """Return the marks of ``study_uids`` (default: all), by study UID; unmarked studies are absent."""
        with self._connect() as con:
            rows = con.execute("SELECT * FROM marks").fetchall()
        wanted = None if study_uids is None else set(study_uids)
        return {r["study_uid"]: StudyMark(r["study_uid"], bool(r["protected"]), r["delivered_at"], r["delivered_to"])
                for r in rows if wanted is None or r["study_uid"] in wanted}

    def protect(self, study_uids: Iterable[str], protected: bool = True) -> None:
        """Set or clear the protected flag of ``study_uids``."""
        with self._lock, self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            for uid in study_uids:
                con.execute("INSERT INTO marks (study_uid, protected) VALUES (?, ?)"
                            " ON CONFLICT (study_uid) DO UPDATE SET protected = excluded.protected",
                            (uid, int(protected)))
            con.execute("COMMIT")

    def delivered(self, study_uids: Iterable[str], to: str, at: str) -> None:
        """Record that every object of ``study_uids`` reached ``to`` by an export started ``at``."""
        with self._lock, self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            for uid in study_uids:
                con.execute("INSERT INTO marks (study_uid, delivered_at, delivered_to) VALUES (?, ?, ?)"
                            " ON CONFLICT (study_uid) DO UPDATE SET delivered_at = excluded.delivered_at,"
                            " delivered_to = excluded.delivered_to", (uid, at, to))
            con.execute("COMMIT")

    def forget(self, study_uids: Iterable[str]) -> None:
        """Drop the marks of deleted studies."""
        with self._lock, self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            for uid in study_uids:
                con.execute("DELETE FROM marks WHERE study_uid = ?", (uid,))
            con.execute("COMMIT")


#: Held exclusively while a deletion runs, shared while an export registers its busy file.
DELETE_LOCK = ".delete-lock"


@contextlib.contextmanager
def delete_lock(data_dir: Path, *, shared: bool = False, wait: bool = True) -> Iterator[bool]:
    """Hold the store's deletion lock (exclusive: one deletion at a time, across processes;
    shared: no deletion starts meanwhile). Yields False if ``wait`` is False and it is held."""
    try:
        fd = os.open(data_dir / DELETE_LOCK, os.O_RDWR | os.O_CREAT, 0o640)
    except OSError as exc:
        raise StoreError(f"cannot open the store's deletion lock: {exc.strerror}") from exc
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


@contextlib.contextmanager
def busy(data_dir: Path, study_uids: Iterable[str]) -> Iterator[None]:
    """Mark ``study_uids`` as being read (by an export or a send) until the block ends: a
    file in ``busy/`` naming them, locked for as long as this process runs the block, so a
    crash frees them. Deletion and retention leave busy studies alone; a deletion already
    running finishes before the mark is made."""
    folder = data_dir / BUSY_DIR
    name = f"{os.getpid()}-{threading.get_ident()}"
    path = folder / f"{name}.busy"
    try:
        folder.mkdir(exist_ok=True)
        fd = os.open(folder / f"{name}.tmp", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o640)
    except OSError as exc:
        raise StoreError(f"cannot mark studies as being exported in {folder}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, "".join(f"{uid}\n" for uid in study_uids).encode())
        with delete_lock(data_dir, shared=True):
            os.replace(folder / f"{name}.tmp", path)
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        with contextlib.suppress(OSError):
            (folder / f"{name}.tmp").unlink()
        os.close(fd)


def busy_studies(data_dir: Path) -> set[str]:
    """Return the studies a running export or send is reading (see :func:`busy`); busy
    files whose process is gone are removed."""
    folder = data_dir / BUSY_DIR
    found: set[str] = set()
    if not folder.is_dir():
        return found
    for path in folder.glob("*.busy"):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # held: an export is running
                with os.fdopen(os.dup(fd), "rb") as f:
                    found.update(line.strip() for line in f.read().decode(errors="replace").splitlines()
                                 if line.strip())
            else:  # nobody holds it: left by a crash, or its owner is just removing it
                fcntl.flock(fd, fcntl.LOCK_UN)
                if not _owner_alive(path.name):
                    with contextlib.suppress(OSError):
                        path.unlink()
        finally:
            os.close(fd)
    return found


def _owner_alive(name: str) -> bool:
    pid = name.split("-", 1)[0]
    return pid.isdigit() and (int(pid) == os.getpid() or process_running(int(pid)))
