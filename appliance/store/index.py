"""The SQLite index of the store: patient, study, series and instance levels.

WAL mode, a small pool of connections lent per call, schema versioned with ``PRAGMA user_version``.
The index is a cache of what the files say: ``Store.reindex`` rebuilds it from them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from appliance.dicom.attributes import COLUMNS
from appliance.errors import StoreDiskError, StoreError, StoreFullError
from appliance.store.find import Found, Match, find_sql, instances_sql

log = logging.getLogger(__name__)

#: Page cache of one index connection, in KiB.
_CACHE_KIB = 1024
SCHEMA_VERSION = 3

#: Idle connections kept for the next call; more are opened while needed and closed after.
MAX_IDLE_CONNECTIONS = 4

#: Below this many free bytes, an I/O error of SQLite is taken for a full disk.
NEARLY_FULL = 2**20

_READ = "the index could not be read"

_LEVEL_COLUMNS = {
    level: [c for _, c, lvl in COLUMNS if lvl == level] for level in ("patient", "study", "series", "instance")
}
_INSTANCE_EXTRA = [
    "series_uid",
    "path",
    "transfer_syntax",
    "size",
    "received_at",
    "calling_ae",
    "origin",
    "flags",
]
_INSTANCE_COLUMNS = [c for c in _LEVEL_COLUMNS["instance"]] + _INSTANCE_EXTRA

#: Index.add's statements, written once (SQLite's statement cache then finds them as they are).
_ADD_SERIES = (f"INSERT INTO series (study_uid, {', '.join(_LEVEL_COLUMNS['series'])})"
               f" VALUES (?, {', '.join('?' * len(_LEVEL_COLUMNS['series']))})"
               " ON CONFLICT (series_uid) DO UPDATE SET volume_stale = 1")
_ADD_INSTANCE = (f"INSERT OR REPLACE INTO instances ({', '.join(_INSTANCE_COLUMNS)})"
                 f" VALUES ({', '.join('?' * len(_INSTANCE_COLUMNS))})")


def _cols(names: list[str], skip: tuple[str, ...] = ()) -> str:
    return ",\n  ".join(f"{n}" for n in names if n not in skip)


_SCHEMA = f"""
CREATE TABLE patients (
  id INTEGER PRIMARY KEY,
  patient_id TEXT NOT NULL,
  patient_name TEXT NOT NULL,
  UNIQUE (patient_id, patient_name)
);
CREATE TABLE studies (
  study_uid TEXT PRIMARY KEY,
  patient INTEGER NOT NULL REFERENCES patients(id),
  study_date TEXT,
  study_time TEXT,
  first_received TEXT NOT NULL,
  last_received TEXT NOT NULL
);
CREATE TABLE series (
  series_uid TEXT PRIMARY KEY,
  study_uid TEXT NOT NULL REFERENCES studies(study_uid),
  {_cols(_LEVEL_COLUMNS["series"], ("series_uid",))},
  volume_ok INTEGER,
  volume_reason TEXT,
  volume_stale INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE instances (
  sop_instance_uid TEXT PRIMARY KEY,
  {_cols(_INSTANCE_COLUMNS, ("sop_instance_uid",))}
);
CREATE INDEX instances_series ON instances(series_uid);
CREATE INDEX series_study ON series(study_uid);
CREATE INDEX studies_received ON studies(last_received);
"""

#: Version 2: the forwarding queue. It lives here so that an object and its queue entries
#: are written in one transaction; unlike the four tables above it is not rebuilt from the
#: files (reindex keeps it), it is the box's own durable state.
_FORWARD_SCHEMA = """
CREATE TABLE IF NOT EXISTS forward_queue (
  id INTEGER PRIMARY KEY,
  destination TEXT NOT NULL,
  sop_instance_uid TEXT NOT NULL,
  study_uid TEXT NOT NULL,
  series_uid TEXT NOT NULL,
  size INTEGER NOT NULL,
  queued_at TEXT NOT NULL,
  not_before REAL NOT NULL,
  next_try REAL NOT NULL DEFAULT 0,
  attempts INTEGER NOT NULL DEFAULT 0,
  state TEXT NOT NULL DEFAULT 'pending',
  reason TEXT,
  UNIQUE (destination, sop_instance_uid)
);
CREATE INDEX IF NOT EXISTS forward_due ON forward_queue(destination, state, id);
CREATE INDEX IF NOT EXISTS forward_study ON forward_queue(study_uid);
CREATE INDEX IF NOT EXISTS forward_series ON forward_queue(destination, series_uid);
CREATE TABLE IF NOT EXISTS forward_destinations (
  destination TEXT PRIMARY KEY,
  next_try REAL NOT NULL DEFAULT 0,
  failures INTEGER NOT NULL DEFAULT 0,
  last_success TEXT,
  last_error TEXT,
  last_error_at TEXT,
  sent INTEGER NOT NULL DEFAULT 0,
  dropped INTEGER NOT NULL DEFAULT 0
)
"""


#: The destinations with an entry due (see Index.forward_due): the distinct destinations by
#: stepping through the forward_due index, those not backing off, with one entry due each.
_DUE_DESTINATIONS = """
WITH RECURSIVE dests(name) AS (
  SELECT (SELECT min(destination) FROM forward_queue)
  UNION ALL
  SELECT (SELECT min(destination) FROM forward_queue WHERE destination > dests.name) FROM dests WHERE name IS NOT NULL
)
SELECT dests.name FROM dests LEFT JOIN forward_destinations d ON d.destination = dests.name
WHERE dests.name IS NOT NULL AND coalesce(d.next_try, 0) <= :now
  AND EXISTS (SELECT 1 FROM forward_queue q WHERE q.destination = dests.name AND q.state = 'pending'
              AND q.not_before <= :now AND q.next_try <= :now)
"""


#: Version 3: indexes for Query/Retrieve matching (C-FIND over 10,000 studies in a few
#: milliseconds): a patient's studies, study dates, patient names as PN matching compares
#: them (case-insensitively), and modalities.
_QR_INDEXES = """
CREATE INDEX IF NOT EXISTS studies_patient ON studies(patient);
CREATE INDEX IF NOT EXISTS studies_date ON studies(study_date);
CREATE INDEX IF NOT EXISTS patients_name_nocase ON patients(patient_name COLLATE NOCASE);
CREATE INDEX IF NOT EXISTS series_modality ON series(modality)
"""


@dataclass(frozen=True)
class InstanceRow:
    """What the index knows of one stored object."""

    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    path: str
    transfer_syntax: str
    size: int
    received_at: str
    calling_ae: str | None
    flags: str | None


@dataclass(frozen=True)
class StudySummary:
    """One study as listings show it: its patient, date and how many series and instances it holds."""

    study_uid: str
    patient_id: str
    patient_name: str
    study_date: str | None
    last_received: str
    series: int
    instances: int


@dataclass(frozen=True)
class StudyUsage:
    """One study as deletion and retention see it: its patient, when it last received an
    object, and how many objects and bytes it holds."""

    study_uid: str
    patient_id: str
    patient_name: str
    study_date: str | None
    first_received: str
    last_received: str
    instances: int
    bytes: int


@dataclass(frozen=True)
class ForwardItem:
    """One queued object for one destination, with what sending it needs."""

    id: int
    destination: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    size: int
    attempts: int
    #: None when the object is no longer stored (deleted since it was queued).
    path: str | None
    sop_class_uid: str | None
    transfer_syntax: str | None


@dataclass(frozen=True)
class ForwardState:
    """One destination's queue: what waits, what was set aside, how the last tries went."""

    destination: str
    pending: int
    pending_bytes: int
    #: When the oldest waiting object was queued (ISO 8601), or None.
    oldest: str | None
    set_aside: int
    #: Epoch seconds before which the destination is not tried again (after a failure).
    next_try: float
    failures: int
    last_success: str | None
    last_error: str | None
    last_error_at: str | None
    sent: int
    dropped: int


@dataclass(frozen=True)
class RecentStudy:
    """One of the latest studies: its date, modalities (comma-separated) and number of instances."""

    study_uid: str
    study_date: str | None
    last_received: str
    modalities: str | None
    instances: int


@dataclass(frozen=True)
class SeriesSummary:
    """One series: its attributes, its 3D verdict (None: not decided) and its number of instances."""

    series_uid: str
    study_uid: str
    modality: str | None
    series_number: int | None
    frame_of_reference_uid: str | None
    volume_ok: bool | None
    volume_reason: str | None
    instances: int


@dataclass(frozen=True)
class InstanceSummary:
    """One instance as ``appliance ls instances`` shows it."""

    sop_instance_uid: str
    series_uid: str
    sop_class_uid: str
    transfer_syntax: str
    size: int
    received_at: str
    calling_ae: str | None
    origin: str | None
    flags: str | None


_STUDY_LISTING = (
    "SELECT st.*, p.patient_id, p.patient_name,"
    " (SELECT count(*) FROM series s WHERE s.study_uid = st.study_uid) AS nseries,"
    " (SELECT count(*) FROM instances i JOIN series s USING (series_uid)"
    "   WHERE s.study_uid = st.study_uid) AS n"
    " FROM studies st JOIN patients p ON p.id = st.patient ORDER BY st.last_received"
)
_RECENT_STUDIES = (
    "SELECT st.study_uid, st.study_date, st.last_received,"
    " (SELECT group_concat(DISTINCT s.modality) FROM series s WHERE s.study_uid = st.study_uid) AS mods,"
    " (SELECT count(*) FROM instances i JOIN series s USING (series_uid) WHERE s.study_uid = st.study_uid) AS n"
    " FROM studies st ORDER BY st.last_received DESC LIMIT ?"
)
_SERIES = "SELECT s.*, (SELECT count(*) FROM instances i WHERE i.series_uid = s.series_uid) AS n FROM series s"
_INSTANCE = "SELECT i.*, s.study_uid FROM instances i JOIN series s USING (series_uid)"


def _set_wal(con: sqlite3.Connection, timeout: float = 30.0) -> None:
    """Put the database in WAL mode (a no-op once it is). While another process switches a
    new database, SQLite answers "database is locked" at once instead of waiting for the
    busy timeout, so this retries for up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            con.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class Index:
    """The index database at ``path``; safe to share between threads.

    Each method borrows a connection from a small pool for its own duration and gives it
    back however the method ends, so threads that come and go (one per association) hold
    no descriptors once they are gone. At most ``max_idle`` connections wait in the pool;
    extra ones are closed when given back. SQLite's errors leave as :class:`StoreError`
    (:class:`StoreFullError` for a full disk, :class:`StoreDiskError` for an I/O error or a
    read-only disk)."""

    def __init__(self, path: Path, *, max_idle: int = MAX_IDLE_CONNECTIONS) -> None:
        self.path = path
        self.max_idle = max_idle
        self._idle: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        #: Bumped by close(): connections borrowed before are closed when given back.
        self._generation = 0
        #: Held by this process's write transactions (see _writing).
        self._write_lock = threading.RLock()
        try:
            with self._connection("cannot open the index") as con:
                version = con.execute("PRAGMA user_version").fetchone()[0]
                if version in (0, 1, 2):
                    version = self._create(con)
            if version != SCHEMA_VERSION:
                raise StoreError(
                    f"the index {path} has schema version {version}, this software knows {SCHEMA_VERSION}; "
                    "run 'appliance reindex' to rebuild it from the stored files"
                )
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _create(con: sqlite3.Connection) -> int:
        """Create the schema unless another process has just done so; return its version.

        On a new data partition the supervisor, its SCP and a CD import may all open the
        index at once: the write lock makes one of them the creator, the others find the
        version it set."""
        with _transaction(con):
            version: int = con.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        con.execute(statement)
            if version in (0, 1):  # 1 -> 2: the forwarding queue
                for statement in _FORWARD_SCHEMA.split(";"):
                    if statement.strip():
                        con.execute(statement)
            if version in (0, 1, 2):  # 2 -> 3: the Query/Retrieve indexes
                for statement in _QR_INDEXES.split(";"):
                    if statement.strip():
                        con.execute(statement)
                con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                version = SCHEMA_VERSION
        return version

    def _open(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        try:
            con.row_factory = sqlite3.Row
            _set_wal(con)
            # Durability comes from the fsynced object files: an index row lost in a power
            # cut is rebuilt from its file at the next start (Store.recover).
            con.execute("PRAGMA synchronous=NORMAL")
            # Each pooled connection keeps its own page cache: 1 MiB each (SQLite's default
            # is 2 MiB) bounds what the pool holds as the index grows.
            con.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
            con.execute("PRAGMA foreign_keys=ON")
        except BaseException:
            con.close()
            raise
        return con

    @contextlib.contextmanager
    def _connection(self, what: str) -> Iterator[sqlite3.Connection]:
        """Borrow a connection for one call and give it back (or close it) afterwards.
        ``what`` introduces the message of a :class:`StoreError` made of SQLite's error."""
        with self._lock:
            generation = self._generation
            con = self._idle.pop() if self._idle else None
        try:
            if con is None:
                con = self._open()
            yield con
        except sqlite3.Error as exc:
            raise _index_error(exc, what, self.path) from exc
        finally:
            if con is not None:
                self._give_back(con, generation)

    def _give_back(self, con: sqlite3.Connection, generation: int) -> None:
        with self._lock:
            # A connection left inside a transaction (its ROLLBACK failed) is not reused.
            if generation == self._generation and len(self._idle) < self.max_idle and not con.in_transaction:
                self._idle.append(con)
                return
        _close_quietly(con)

    @contextlib.contextmanager
    def _writing(self, what: str) -> Iterator[sqlite3.Connection]:
        """Borrow a connection and run the block as one write transaction.

        This process's writers take turns on a lock first: SQLite's own wait for its write
        lock sleeps 1 ms and more between tries, which five associations storing at once
        met on nearly every object (another process, a CD import or the forwarder, still
        meets it, rarely)."""
        with self._write_lock, self._connection(what) as con, _transaction(con):
            yield con

    def close(self) -> None:
        """Close the idle connections; those in use are closed when given back. The index
        stays usable: a later call opens a new connection."""
        with self._lock:
            idle, self._idle = self._idle, []
            self._generation += 1
        for con in idle:
            _close_quietly(con)

    # -- writing -------------------------------------------------------------

    def add(self, values: dict[str, Any], forward: Sequence[tuple[str, float]] = ()) -> None:
        """Insert or replace one instance with its patient, study and series rows, and, in
        the same transaction, queue it for each (destination, stable_after seconds) of ``forward``."""
        now = values["received_at"]
        with self._writing("the index could not record the object") as con:
            self._queue_forward(con, values, forward)
            con.execute(
                "INSERT INTO patients (patient_id, patient_name) VALUES (?, ?) ON CONFLICT DO NOTHING",
                (values.get("patient_id") or "", values.get("patient_name") or ""),
            )
            patient = con.execute(
                "SELECT id FROM patients WHERE patient_id = ? AND patient_name = ?",
                (values.get("patient_id") or "", values.get("patient_name") or ""),
            ).fetchone()[0]
            con.execute(
                "INSERT INTO studies (study_uid, patient, study_date, study_time, first_received, last_received)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (study_uid) DO UPDATE SET last_received = excluded.last_received",
                (values["study_uid"], patient, values.get("study_date"), values.get("study_time"), now, now),
            )
            con.execute(_ADD_SERIES, [values["study_uid"], *map(values.get, _LEVEL_COLUMNS["series"])])
            con.execute(_ADD_INSTANCE, list(map(values.get, _INSTANCE_COLUMNS)))

    def remove(self, sop_instance_uid: str) -> None:
        """Delete an instance row, and its series/study/patient rows once empty."""
        with self._writing("the index could not drop a row") as con:
            row = con.execute(
                "SELECT series_uid FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
            ).fetchone()
            con.execute("DELETE FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,))
            if row:
                con.execute("UPDATE series SET volume_stale = 1 WHERE series_uid = ?", (row[0],))
            self._prune(con)

    @staticmethod
    def _prune(con: sqlite3.Connection) -> None:
        con.execute("DELETE FROM series WHERE series_uid NOT IN (SELECT series_uid FROM instances)")
        con.execute("DELETE FROM studies WHERE study_uid NOT IN (SELECT study_uid FROM series)")
        con.execute("DELETE FROM patients WHERE id NOT IN (SELECT patient FROM studies)")

    @staticmethod
    def _queue_forward(con: sqlite3.Connection, values: dict[str, Any], forward: Sequence[tuple[str, float]]) -> None:
        at = time.time()
        for destination, stable_after in forward:
            not_before = at + stable_after
            if stable_after > 0:  # the series is not stable yet: its waiting objects wait longer
                con.execute("UPDATE forward_queue SET not_before = max(not_before, ?) WHERE destination = ?"
                            " AND series_uid = ? AND state = 'pending'", (not_before, destination, values["series_uid"]))
            con.execute(
                "INSERT INTO forward_queue (destination, sop_instance_uid, study_uid, series_uid, size, queued_at,"
                " not_before) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (destination, sop_instance_uid) DO UPDATE SET"
                " state = 'pending', attempts = 0, next_try = 0, reason = NULL, size = excluded.size,"
                " queued_at = excluded.queued_at, not_before = excluded.not_before",
                (destination, values["sop_instance_uid"], values["study_uid"], values["series_uid"],
                 values.get("size") or 0, values["received_at"], not_before))

    def remove_instances(self, rows: list[tuple[str, str]]) -> int:
        """Delete the instances given as (SOP Instance UID, path) in one transaction, each
        only if its row still names that path, and their series/study/patient rows once
        empty; return how many rows were deleted."""
        removed = 0
        with self._writing("the index could not drop rows") as con:
            series = set()
            for uid, path in rows:
                r = con.execute("SELECT series_uid FROM instances WHERE sop_instance_uid = ? AND path = ?",
                                (uid, path)).fetchone()
                if r is None:
                    continue
                con.execute("DELETE FROM instances WHERE sop_instance_uid = ?", (uid,))
                con.execute("DELETE FROM forward_queue WHERE sop_instance_uid = ?", (uid,))
                series.add(r[0])
                removed += 1
            for s in series:
                con.execute("UPDATE series SET volume_stale = 1 WHERE series_uid = ?", (s,))
            if removed:
                self._prune(con)
        return removed

    def clear(self) -> None:
        """Delete every row (before a rebuild)."""
        with self._writing("the index could not be cleared") as con:
            for table in ("instances", "series", "studies", "patients"):
                con.execute(f"DELETE FROM {table}")

    def set_verdict(self, series_uid: str, ok: bool | None, reason: str) -> None:
        """Record the 3D verdict of a series."""
        with self._connection("the index could not record a 3D verdict") as con:
            con.execute(
                "UPDATE series SET volume_ok = ?, volume_reason = ?, volume_stale = 0 WHERE series_uid = ?",
                (None if ok is None else int(ok), reason, series_uid),
            )

    # -- reading -------------------------------------------------------------

    def instance(self, sop_instance_uid: str) -> InstanceRow | None:
        """Return the row of one instance, or None."""
        with self._connection(_READ) as con:
            r = con.execute(_INSTANCE + " WHERE sop_instance_uid = ?", (sop_instance_uid,)).fetchone()
        return None if r is None else _instance_row(r)

    def instances(self, series_uid: str | None = None) -> list[InstanceRow]:
        """Return every instance, or those of one series."""
        sql = _INSTANCE
        args: tuple[str, ...] = ()
        if series_uid is not None:
            sql += " WHERE series_uid = ?"
            args = (series_uid,)
        with self._connection(_READ) as con:
            return [_instance_row(r) for r in con.execute(sql + " ORDER BY i.rowid", args)]

    def paths(self) -> dict[str, str]:
        """Return {stored path: SOP Instance UID} of every instance."""
        with self._connection(_READ) as con:
            return {r[0]: r[1] for r in con.execute("SELECT path, sop_instance_uid FROM instances")}

    def geometry(self, series_uid: str) -> list[sqlite3.Row]:
        """Return the rows the 3D verdict needs, for one series."""
        with self._connection(_READ) as con:
            return con.execute(
                "SELECT sop_instance_uid, sop_class_uid, image_position_patient, image_orientation_patient,"
                " slice_thickness, spacing_between_slices, number_of_frames FROM instances WHERE series_uid = ?",
                (series_uid,),
            ).fetchall()

    def stale_series(self) -> list[str]:
        """Return the series whose 3D verdict must be recomputed."""
        with self._connection(_READ) as con:
            return [r[0] for r in con.execute("SELECT series_uid FROM series WHERE volume_stale = 1")]

    def ordered_instances(self, series_uid: str) -> list[InstanceRow]:
        """Return the instances of one series by instance number, then SOP Instance UID."""
        with self._connection(_READ) as con:
            return [_instance_row(r) for r in con.execute(
                _INSTANCE + " WHERE series_uid = ? ORDER BY i.instance_number, i.sop_instance_uid", (series_uid,))]

    def study_instances(self, study_uid: str) -> list[InstanceRow]:
        """Return the instances of one study by series UID, instance number, then SOP Instance UID."""
        with self._connection(_READ) as con:
            return [_instance_row(r) for r in con.execute(
                _INSTANCE + " WHERE s.study_uid = ? ORDER BY i.series_uid, i.instance_number, i.sop_instance_uid",
                (study_uid,))]

    def level_of(self, uid: str) -> str | None:
        """Return "study" or "series" if ``uid`` is a stored study or series, else None."""
        with self._connection(_READ) as con:
            if con.execute("SELECT 1 FROM studies WHERE study_uid = ?", (uid,)).fetchone():
                return "study"
            if con.execute("SELECT 1 FROM series WHERE series_uid = ?", (uid,)).fetchone():
                return "series"
        return None

    def study_uids(self, received_after: str | None = None) -> list[str]:
        """Return the studies (those last received after ``received_after`` if given) by first receipt."""
        with self._connection(_READ) as con:
            if received_after is None:
                rows = con.execute("SELECT study_uid FROM studies ORDER BY first_received")
            else:
                rows = con.execute("SELECT study_uid FROM studies WHERE last_received > ? ORDER BY first_received",
                                   (received_after,))
            return [r[0] for r in rows]

    def series_in_study(self, study_uid: str, *, uid_breaks_ties: bool = True) -> list[str]:
        """Return the series of one study by series number, then by UID (or, with
        ``uid_breaks_ties=False``, equal numbers in SQLite's order, as USB exports always had)."""
        sql = "SELECT series_uid FROM series WHERE study_uid = ? ORDER BY series_number"
        with self._connection(_READ) as con:
            return [r[0] for r in con.execute(sql + (", series_uid" if uid_breaks_ties else ""), (study_uid,))]

    def series(self, series_uid: str) -> SeriesSummary | None:
        """Return one series, or None."""
        with self._connection(_READ) as con:
            r = con.execute(_SERIES + " WHERE s.series_uid = ?", (series_uid,)).fetchone()
        return None if r is None else _series_summary(r)

    def series_listing(self) -> list[SeriesSummary]:
        """Return every series by study UID, then series number."""
        with self._connection(_READ) as con:
            return [_series_summary(r) for r in con.execute(_SERIES + " ORDER BY s.study_uid, s.series_number")]

    def instance_listing(self) -> list[InstanceSummary]:
        """Return every instance by series UID, then instance number."""
        with self._connection(_READ) as con:
            return [
                InstanceSummary(r["sop_instance_uid"], r["series_uid"], r["sop_class_uid"], r["transfer_syntax"],
                                r["size"], r["received_at"], r["calling_ae"], r["origin"], r["flags"])
                for r in con.execute("SELECT * FROM instances ORDER BY series_uid, instance_number")
            ]

    def study_listing(self) -> list[StudySummary]:
        """Return every study with its patient and counts, by last receipt."""
        with self._connection(_READ) as con:
            return [
                StudySummary(r["study_uid"], r["patient_id"], r["patient_name"], r["study_date"], r["last_received"],
                             r["nseries"], r["n"])
                for r in con.execute(_STUDY_LISTING)
            ]

    def study_usage(self, study_uids: list[str] | None = None) -> list[StudyUsage]:
        """Return every study (or those of ``study_uids`` that are stored) with its size,
        least recently received first."""
        sql = ("SELECT st.study_uid, st.study_date, st.first_received, st.last_received, p.patient_id,"
               " p.patient_name, count(i.sop_instance_uid) AS n, coalesce(sum(i.size), 0) AS bytes"
               " FROM studies st JOIN patients p ON p.id = st.patient"
               " LEFT JOIN series s ON s.study_uid = st.study_uid"
               " LEFT JOIN instances i ON i.series_uid = s.series_uid")
        args: tuple[str, ...] = ()
        if study_uids is not None:
            if not study_uids:
                return []
            sql += f" WHERE st.study_uid IN ({', '.join('?' * len(study_uids))})"
            args = tuple(study_uids)
        sql += " GROUP BY st.study_uid ORDER BY st.last_received, st.study_uid"
        with self._connection(_READ) as con:
            return [StudyUsage(r["study_uid"], r["patient_id"], r["patient_name"], r["study_date"],
                               r["first_received"], r["last_received"], r["n"], r["bytes"])
                    for r in con.execute(sql, args)]

    def studies_of_patient(self, patient_id: str) -> list[str]:
        """Return the studies of every patient with this Patient ID, least recently received first."""
        with self._connection(_READ) as con:
            return [r[0] for r in con.execute(
                "SELECT st.study_uid FROM studies st JOIN patients p ON p.id = st.patient"
                " WHERE p.patient_id = ? ORDER BY st.last_received", (patient_id,))]

    def recent_studies(self, limit: int) -> list[RecentStudy]:
        """Return the ``limit`` studies last received, latest first."""
        with self._connection(_READ) as con:
            return [
                RecentStudy(r["study_uid"], r["study_date"], r["last_received"], r["mods"], r["n"])
                for r in con.execute(_RECENT_STUDIES, (limit,))
            ]

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> Iterator[sqlite3.Row]:
        """Run a read-only query; for tests only: library code calls the named queries above."""
        with self._connection(_READ) as con:
            return iter(con.execute(sql, args).fetchall())

    # -- query/retrieve -------------------------------------------------------

    def find(self, level: str, matches: Sequence[Match], columns: Sequence[str], *, after: int = 0,
             limit: int = 500) -> list[Found]:
        """Return up to ``limit`` entities of ``level`` ("patient", "study", "series",
        "image") that every match of ``matches`` holds, past the key ``after``, in key order,
        each with the values of ``columns`` (names of :data:`~appliance.store.find.FIND_COLUMNS`)
        and one stored file. Raise ValueError for a column the level does not have."""
        sql, args = find_sql(level, matches, columns, after, limit)
        with self._connection(_READ) as con:
            return [Found(r["key_"], {c: r[c] for c in columns}, r["path_"]) for r in con.execute(sql, args)]

    def find_instances(self, level: str, matches: Sequence[Match]) -> list[InstanceRow]:
        """Return every stored instance of the ``level`` entities that ``matches`` select
        (what a C-MOVE or C-GET retrieves), by study, series, instance number and UID."""
        sql, args = instances_sql(level, matches)
        with self._connection(_READ) as con:
            return [_instance_row(r) for r in con.execute(sql, args)]

    # -- forwarding ---------------------------------------------------------

    def forward_due(self, now: float, since: int = 0) -> list[str]:
        """Return the destinations with objects due to be sent at ``now`` (epoch seconds);
        ``since``: among the entries queued after that one (:meth:`forward_last_id`) only,
        which reads those entries and no others."""
        with self._connection(_READ) as con:
            if since:
                return [r[0] for r in con.execute(
                    "SELECT DISTINCT q.destination FROM forward_queue q NOT INDEXED LEFT JOIN forward_destinations d"
                    " USING (destination) WHERE q.id > ? AND q.state = 'pending' AND q.not_before <= ?"
                    " AND q.next_try <= ? AND coalesce(d.next_try, 0) <= ?", (since, now, now, now))]
            # Destination by destination (a skip over the index, not a read of every entry),
            # and within one only until an entry is due: a destination down for days with a
            # backlog of 100,000 objects costs a few index lookups per look, not a scan
            # (25 ms, every 0.2 s).
            return [r[0] for r in con.execute(_DUE_DESTINATIONS, {"now": now})]

    def forward_last_id(self) -> int:
        """Return the id of the entry queued last (0 if the queue is empty): it changes when
        any process queues an object, and one look costs a few microseconds."""
        with self._connection(_READ) as con:
            return int(con.execute("SELECT coalesce(max(id), 0) FROM forward_queue").fetchone()[0])

    def forward_batch(self, destination: str, now: float, limit: int, max_bytes: int) -> list[ForwardItem]:
        """Return the next objects due for ``destination``, in arrival order, at most
        ``limit`` of them and (beyond the first) ``max_bytes`` together."""
        out: list[ForwardItem] = []
        total = 0
        with self._connection(_READ) as con:
            for r in con.execute(
                    "SELECT q.*, i.path, i.sop_class_uid, i.transfer_syntax FROM forward_queue q"
                    " LEFT JOIN instances i USING (sop_instance_uid) WHERE q.destination = ? AND q.state = 'pending'"
                    " AND q.not_before <= ? AND q.next_try <= ? ORDER BY q.id LIMIT ?",
                    (destination, now, now, limit)):
                if out and total + r["size"] > max_bytes:
                    break
                total += r["size"]
                out.append(ForwardItem(r["id"], r["destination"], r["sop_instance_uid"], r["study_uid"],
                                       r["series_uid"], r["size"], r["attempts"], r["path"], r["sop_class_uid"],
                                       r["transfer_syntax"]))
        return out

    def forward_sent(self, item_id: int, destination: str, at: str) -> None:
        """The destination took the object: drop it from the queue, count it."""
        with self._writing("the forwarding queue could not be updated") as con:
            con.execute("DELETE FROM forward_queue WHERE id = ?", (item_id,))
            con.execute("INSERT INTO forward_destinations (destination, last_success, sent) VALUES (?, ?, 1)"
                        " ON CONFLICT (destination) DO UPDATE SET last_success = excluded.last_success,"
                        " sent = sent + 1, failures = 0, next_try = 0", (destination, at))

    def forward_retry(self, item_id: int, next_try: float, reason: str) -> None:
        """The object failed for a reason that may pass: try it again from ``next_try``."""
        with self._writing("the forwarding queue could not be updated") as con:
            con.execute("UPDATE forward_queue SET attempts = attempts + 1, next_try = ?, reason = ? WHERE id = ?",
                        (next_try, reason, item_id))

    def forward_set_aside(self, item_id: int, reason: str) -> None:
        """The destination refused the object for good: keep it aside with the reason; it no longer blocks."""
        with self._writing("the forwarding queue could not be updated") as con:
            con.execute("UPDATE forward_queue SET state = 'set-aside', reason = ?, attempts = attempts + 1"
                        " WHERE id = ?", (reason, item_id))

    def forward_drop(self, item_ids: list[int], destination: str) -> None:
        """Drop queue entries (objects no longer stored, or beyond a backlog cap), counting those of a cap."""
        with self._writing("the forwarding queue could not be updated") as con:
            for item_id in item_ids:
                con.execute("DELETE FROM forward_queue WHERE id = ?", (item_id,))
            con.execute("INSERT INTO forward_destinations (destination, dropped) VALUES (?, ?)"
                        " ON CONFLICT (destination) DO UPDATE SET dropped = dropped + excluded.dropped",
                        (destination, len(item_ids)))

    def forward_failed(self, destination: str, error: str, at: str,
                       delay: Callable[[int], float]) -> tuple[int, float]:
        """No association (or it broke): the destination waits ``delay(failures in a row)``
        seconds; return (failures in a row, seconds to wait)."""
        with self._writing("the forwarding queue could not be updated") as con:
            row = con.execute("SELECT failures FROM forward_destinations WHERE destination = ?",
                              (destination,)).fetchone()
            failures = (int(row[0]) if row else 0) + 1
            wait = delay(failures)
            con.execute("INSERT INTO forward_destinations (destination, next_try, failures, last_error, last_error_at)"
                        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (destination) DO UPDATE SET next_try = excluded.next_try,"
                        " failures = excluded.failures, last_error = excluded.last_error,"
                        " last_error_at = excluded.last_error_at", (destination, time.time() + wait, failures, error, at))
        return failures, wait

    def forward_note_error(self, destination: str, error: str, at: str) -> None:
        """Record the last error of a destination without making it wait (an object refused)."""
        with self._writing("the forwarding queue could not be updated") as con:
            con.execute("INSERT INTO forward_destinations (destination, last_error, last_error_at) VALUES (?, ?, ?)"
                        " ON CONFLICT (destination) DO UPDATE SET last_error = excluded.last_error,"
                        " last_error_at = excluded.last_error_at", (destination, error, at))

    def forward_requeue(self, destination: str | None = None) -> int:
        """Put the objects set aside (for ``destination``, or all) back in the queue; return how many."""
        with self._writing("the forwarding queue could not be updated") as con:
            sql = "UPDATE forward_queue SET state = 'pending', attempts = 0, next_try = 0 WHERE state = 'set-aside'"
            cur = con.execute(sql + (" AND destination = ?" if destination else ""),
                              (destination,) if destination else ())
            if destination:
                con.execute("UPDATE forward_destinations SET next_try = 0, failures = 0 WHERE destination = ?",
                            (destination,))
            else:
                con.execute("UPDATE forward_destinations SET next_try = 0, failures = 0")
            return cur.rowcount

    def forward_oldest(self, destination: str, excess_objects: int, excess_bytes: int) -> list[int]:
        """Return the oldest waiting entries of ``destination`` that make up the excess over a cap."""
        out: list[int] = []
        n = b = 0
        with self._connection(_READ) as con:
            for r in con.execute("SELECT id, size FROM forward_queue WHERE destination = ? AND state = 'pending'"
                                 " ORDER BY id", (destination,)):
                if n >= excess_objects and b >= excess_bytes:
                    break
                out.append(r[0])
                n += 1
                b += r[1]
        return out

    def forward_states(self) -> list[ForwardState]:
        """Return every destination with queued objects or a history, by name."""
        with self._connection(_READ) as con:
            q = {r["destination"]: r for r in con.execute(
                "SELECT destination, sum(state = 'pending') AS pending,"
                " sum(CASE WHEN state = 'pending' THEN size ELSE 0 END) AS bytes,"
                " min(CASE WHEN state = 'pending' THEN queued_at END) AS oldest,"
                " sum(state = 'set-aside') AS aside FROM forward_queue GROUP BY destination")}
            d = {r["destination"]: r for r in con.execute("SELECT * FROM forward_destinations")}
        out = []
        for name in sorted(set(q) | set(d)):
            qr, dr = q.get(name), d.get(name)
            out.append(ForwardState(
                name, int(qr["pending"] or 0) if qr else 0, int(qr["bytes"] or 0) if qr else 0,
                qr["oldest"] if qr else None, int(qr["aside"] or 0) if qr else 0,
                float(dr["next_try"]) if dr else 0.0, int(dr["failures"]) if dr else 0,
                dr["last_success"] if dr else None, dr["last_error"] if dr else None,
                dr["last_error_at"] if dr else None, int(dr["sent"]) if dr else 0, int(dr["dropped"]) if dr else 0))
        return out

    def forward_set_aside_items(self, destination: str, limit: int = 50) -> list[tuple[str, str]]:
        """Return (SOP Instance UID, reason) of objects set aside for ``destination``."""
        with self._connection(_READ) as con:
            return [(r[0], r[1] or "") for r in con.execute(
                "SELECT sop_instance_uid, reason FROM forward_queue WHERE destination = ? AND state = 'set-aside'"
                " ORDER BY id LIMIT ?", (destination, limit))]

    def forward_studies(self) -> set[str]:
        """Return the studies with objects still queued for forwarding (waiting or set aside)."""
        with self._connection(_READ) as con:
            return {r[0] for r in con.execute("SELECT DISTINCT study_uid FROM forward_queue")}

    def forward_left_in_study(self, study_uid: str) -> int:
        """Return how many objects of a study are still queued for forwarding."""
        with self._connection(_READ) as con:
            return int(con.execute("SELECT count(*) FROM forward_queue WHERE study_uid = ?",
                                   (study_uid,)).fetchone()[0])

    def counts(self) -> dict[str, int]:
        """Return the number of patients, studies, series and instances."""
        with self._connection(_READ) as con:
            return {
                t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                for t in ("patients", "studies", "series", "instances")
            }


@contextlib.contextmanager
def _transaction(con: sqlite3.Connection) -> Iterator[None]:
    """Run the block as one write transaction of ``con``: COMMIT, or ROLLBACK on any error.

    SQLite rolls a transaction back by itself on some errors (a full disk, an I/O error);
    a ROLLBACK then would fail and hide the error, so it runs only while one is active."""
    con.execute("BEGIN IMMEDIATE")
    try:
        yield
        con.execute("COMMIT")
    except BaseException:
        if con.in_transaction:
            try:
                con.execute("ROLLBACK")
            except sqlite3.Error as exc:  # the connection is closed, not reused (see _give_back)
                log.debug("ROLLBACK failed after an error: %s", exc)
        raise


def _close_quietly(con: sqlite3.Connection) -> None:
    try:
        con.close()
    except sqlite3.Error as exc:  # e.g. the checkpoint at close on a full disk; the WAL keeps the data
        log.debug("closing an index connection: %s", exc)


def _index_error(exc: sqlite3.Error, what: str, path: Path) -> StoreError:
    """Turn SQLite's ``exc`` into the StoreError a caller branches on."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    if code == sqlite3.SQLITE_IOERR and _nearly_full(path):
        code = sqlite3.SQLITE_FULL  # e.g. growing index.sqlite-shm: SQLite says "disk I/O error"
    if code == sqlite3.SQLITE_FULL:
        return StoreFullError(f"the store's disk is full: {what}")
    if code == sqlite3.SQLITE_READONLY:
        return StoreDiskError(f"the store's disk is read-only: {what} ({exc})")
    if code in (sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN):
        return StoreDiskError(f"the store's disk cannot be written or read: {what} ({exc})")
    if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return StoreError(f"{what}: the index {path} is damaged ({exc}); run 'appliance reindex' to rebuild it")
    return StoreError(f"{what}: {exc} (index {path})")


def _nearly_full(path: Path) -> bool:
    """True if the file system holding ``path`` has less than :data:`NEARLY_FULL` free."""
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < NEARLY_FULL


def _series_summary(r: sqlite3.Row) -> SeriesSummary:
    ok = r["volume_ok"]
    return SeriesSummary(
        series_uid=r["series_uid"],
        study_uid=r["study_uid"],
        modality=r["modality"],
        series_number=r["series_number"],
        frame_of_reference_uid=r["frame_of_reference_uid"],
        volume_ok=None if ok is None else bool(ok),
        volume_reason=r["volume_reason"],
        instances=r["n"],
    )


def _instance_row(r: sqlite3.Row) -> InstanceRow:
    return InstanceRow(
        sop_instance_uid=r["sop_instance_uid"],
        sop_class_uid=r["sop_class_uid"],
        series_uid=r["series_uid"],
        study_uid=r["study_uid"],
        path=r["path"],
        transfer_syntax=r["transfer_syntax"],
        size=r["size"],
        received_at=r["received_at"],
        calling_ae=r["calling_ae"],
        flags=r["flags"],
    )
