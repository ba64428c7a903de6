"""The SQLite index of the store: patient, study, series and instance levels.

WAL mode, one connection per thread, schema versioned with ``PRAGMA user_version``.
The index is a cache of what the files say: ``Store.reindex`` rebuilds it from them.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from appliance.attributes import COLUMNS
from appliance.errors import StoreError

SCHEMA_VERSION = 1

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
    """The index database at ``path``; safe to share between threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        con = self._con()
        version = con.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            version = self._create(con)
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"the index {path} has schema version {version}, this software knows {SCHEMA_VERSION}; "
                "run 'appliance reindex' to rebuild it from the stored files"
            )

    @staticmethod
    def _create(con: sqlite3.Connection) -> int:
        """Create the schema unless another process has just done so; return its version.

        On a new data partition the supervisor, its SCP and a CD import may all open the
        index at once: the write lock makes one of them the creator, the others find the
        version it set."""
        con.execute("BEGIN IMMEDIATE")
        try:
            version: int = con.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        con.execute(statement)
                con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                version = SCHEMA_VERSION
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        return version

    def _con(self) -> sqlite3.Connection:
        con: sqlite3.Connection | None = getattr(self._local, "con", None)
        if con is None:
            try:
                con = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open the index {self.path}: {exc}") from exc
            con.row_factory = sqlite3.Row
            _set_wal(con)
            # Durability comes from the fsynced object files: an index row lost in a power
            # cut is rebuilt from its file at the next start (Store.recover).
            con.execute("PRAGMA synchronous=NORMAL")
            con.execute("PRAGMA foreign_keys=ON")
            self._local.con = con
            with self._lock:
                self._all.append(con)
        return con

    def close(self) -> None:
        """Close every thread's connection."""
        with self._lock:
            for con in self._all:
                try:
                    con.close()
                except sqlite3.Error:
                    pass
            self._all.clear()
        self._local = threading.local()

    # -- writing -------------------------------------------------------------

    def add(self, values: dict[str, Any]) -> None:
        """Insert or replace one instance with its patient, study and series rows."""
        con = self._con()
        now = values["received_at"]
        con.execute("BEGIN IMMEDIATE")
        try:
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
            scols = _LEVEL_COLUMNS["series"]
            con.execute(
                f"INSERT INTO series (study_uid, {', '.join(scols)}) VALUES (?, {', '.join('?' * len(scols))})"
                " ON CONFLICT (series_uid) DO UPDATE SET volume_stale = 1",
                [values["study_uid"]] + [values.get(c) for c in scols],
            )
            con.execute(
                f"INSERT OR REPLACE INTO instances ({', '.join(_INSTANCE_COLUMNS)})"
                f" VALUES ({', '.join('?' * len(_INSTANCE_COLUMNS))})",
                [values.get(c) for c in _INSTANCE_COLUMNS],
            )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    def remove(self, sop_instance_uid: str) -> None:
        """Delete an instance row, and its series/study/patient rows once empty."""
        con = self._con()
        con.execute("BEGIN IMMEDIATE")
        try:
            row = con.execute(
                "SELECT series_uid FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
            ).fetchone()
            con.execute("DELETE FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,))
            if row:
                con.execute("UPDATE series SET volume_stale = 1 WHERE series_uid = ?", (row[0],))
            self._prune(con)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    @staticmethod
    def _prune(con: sqlite3.Connection) -> None:
        con.execute("DELETE FROM series WHERE series_uid NOT IN (SELECT series_uid FROM instances)")
        con.execute("DELETE FROM studies WHERE study_uid NOT IN (SELECT study_uid FROM series)")
        con.execute("DELETE FROM patients WHERE id NOT IN (SELECT patient FROM studies)")

    def clear(self) -> None:
        """Delete every row (before a rebuild)."""
        con = self._con()
        with con:
            con.execute("BEGIN IMMEDIATE")
            for table in ("instances", "series", "studies", "patients"):
                con.execute(f"DELETE FROM {table}")

    def set_verdict(self, series_uid: str, ok: bool | None, reason: str) -> None:
        """Record the 3D verdict of a series."""
        con = self._con()
        con.execute(
            "UPDATE series SET volume_ok = ?, volume_reason = ?, volume_stale = 0 WHERE series_uid = ?",
            (None if ok is None else int(ok), reason, series_uid),
        )

    # -- reading -------------------------------------------------------------

    def instance(self, sop_instance_uid: str) -> InstanceRow | None:
        """Return the row of one instance, or None."""
        r = self._con().execute(
            "SELECT i.*, s.study_uid FROM instances i JOIN series s USING (series_uid)"
            " WHERE sop_instance_uid = ?",
            (sop_instance_uid,),
        ).fetchone()
        return None if r is None else _instance_row(r)

    def instances(self, series_uid: str | None = None) -> list[InstanceRow]:
        """Return every instance, or those of one series."""
        sql = "SELECT i.*, s.study_uid FROM instances i JOIN series s USING (series_uid)"
        args: tuple[str, ...] = ()
        if series_uid is not None:
            sql += " WHERE series_uid = ?"
            args = (series_uid,)
        return [_instance_row(r) for r in self._con().execute(sql + " ORDER BY i.rowid", args)]

    def paths(self) -> dict[str, str]:
        """Return {stored path: SOP Instance UID} of every instance."""
        return {r[0]: r[1] for r in self._con().execute("SELECT path, sop_instance_uid FROM instances")}

    def geometry(self, series_uid: str) -> list[sqlite3.Row]:
        """Return the rows the 3D verdict needs, for one series."""
        return self._con().execute(
            "SELECT sop_instance_uid, sop_class_uid, image_position_patient, image_orientation_patient,"
            " slice_thickness, spacing_between_slices, number_of_frames FROM instances WHERE series_uid = ?",
            (series_uid,),
        ).fetchall()

    def stale_series(self) -> list[str]:
        """Return the series whose 3D verdict must be recomputed."""
        return [r[0] for r in self._con().execute("SELECT series_uid FROM series WHERE volume_stale = 1")]

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> Iterator[sqlite3.Row]:
        """Run a read-only query (for listings)."""
        return iter(self._con().execute(sql, args).fetchall())

    def counts(self) -> dict[str, int]:
        """Return the number of patients, studies, series and instances."""
        con = self._con()
        return {
            t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in ("patients", "studies", "series", "instances")
        }


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
