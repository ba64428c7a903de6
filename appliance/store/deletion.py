"""Deleting stored studies and series: files and index rows together, crash-safely.

A deletion first writes a journal (``deleting/<name>.json``: every object's SOP Instance
UID, path and file identity), then, in chunks under the objects' UID locks, drops their
index rows in one transaction and removes their files, and removes the journal last. A
power cut or ``kill -9`` at any moment leaves each object either stored and indexed, or
with its row gone and its file still there: :func:`finish_pending` (run before recovery at
every start of the service, and before every deletion) completes the journal, so the
deletion ends as it was asked. An object stored again since (a new file under the same
name) is recognised by its file identity and kept.

One deletion runs at a time (``.delete-lock``). A study is not deleted while it may still
be arriving (an object received in the last ``quiet_seconds``), while an export or a send
reads it (:func:`appliance.store.marks.busy`), or while it is protected.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterable, Protocol

from appliance import audit
from appliance.errors import StoreError
from appliance.store.disk import fsync_dir, store_error
from appliance.store.index import Index, InstanceRow, StudyUsage
from appliance.store.marks import StudyMarks, busy_studies, delete_lock


class Store(Protocol):
    """What a deletion needs of :class:`appliance.store.store.Store` (which calls this module)."""

    data_dir: Path
    objects: Path
    index: Index

    def hold_uids(self, uids: list[str]) -> contextlib.AbstractContextManager[None]: ...

log = logging.getLogger(__name__)

JOURNAL_DIR = "deleting"
#: Objects whose rows are dropped in one transaction and whose files are then removed.
CHUNK = 200
#: A study that received an object this recently may still be arriving: it is kept.
DEFAULT_QUIET_SECONDS = 300.0


class DeletionRefused(StoreError):
    """Nothing was deleted: the selection names nothing stored, or everything in it must be kept."""


@dataclass(frozen=True)
class Kept:
    """A study a deletion left alone, and why (in words)."""

    study_uid: str
    patient: str
    why: str


@dataclass
class DeleteReport:
    """What a deletion did."""

    what: str
    studies: list[str] = field(default_factory=list)
    series: list[str] = field(default_factory=list)
    instances: int = 0
    bytes_freed: int = 0
    kept: list[Kept] = field(default_factory=list)

    def summary(self) -> str:
        """One line in words, e.g. ``deleted 2 studies: 310 objects, 164.2 MB freed``."""
        parts = []
        if self.studies:
            parts.append(f"{len(self.studies)} {'study' if len(self.studies) == 1 else 'studies'}")
        if self.series:
            parts.append(f"{len(self.series)} series")
        if not parts:
            return f"deleted nothing of {self.what}"
        return (f"deleted {' and '.join(parts)} ({self.what}): {self.instances} object(s), "
                f"{self.bytes_freed / 1e6:.1f} MB freed")

    def render(self) -> str:
        """The summary and one line per study kept."""
        return "\n".join([self.summary(), *(f"kept study {k.study_uid} ({k.patient}): {k.why}" for k in self.kept)])


@dataclass(frozen=True)
class _Item:
    uid: str
    path: str  # relative to the data directory, as the index records it
    ino: int | None  # None: the file was already gone when the journal was written
    mtime_ns: int | None
    size: int


def _patient(u: StudyUsage) -> str:
    name = u.patient_name.replace("^", " ").strip()
    return f"patient {u.patient_id or '(no ID)'}" + (f", {name}" if name else "")


def _cutoff(quiet_seconds: float) -> str:
    return (datetime.now(timezone.utc) - timedelta(seconds=quiet_seconds)).isoformat(timespec="milliseconds")


def why_kept(u: StudyUsage, *, protected: bool, busy: bool, quiet_seconds: float) -> str | None:
    """Why study ``u`` may not be deleted now, in words, or None."""
    if protected:
        return "it is protected; remove the protection first"
    if busy:
        return "an export to a USB stick or a remote SCP is reading it; delete it after the export"
    if quiet_seconds > 0 and u.last_received > _cutoff(quiet_seconds):
        return (f"it received an object at {u.last_received[:19].replace('T', ' ')} UTC and may still be "
                f"arriving; it can be deleted {quiet_seconds / 60:g} minutes after its last object")
    return None


def delete_studies(store: Store, study_uids: Iterable[str], *, what: str = "",
                   quiet_seconds: float = DEFAULT_QUIET_SECONDS, reason: str = "asked",
                   chunk: int = CHUNK) -> DeleteReport:
    """Delete whole studies (those that may be deleted now; the report says why others were
    kept). Raises DeletionRefused if none of ``study_uids`` is stored, or none may be deleted."""
    uids = list(dict.fromkeys(study_uids))
    report = DeleteReport(what or (f"study {uids[0]}" if len(uids) == 1 else f"{len(uids)} studies"))
    with delete_lock(store.data_dir):
        finish_pending(store)
        usage = store.index.study_usage(uids)
        if not usage:
            raise DeletionRefused(f"nothing to delete: {report.what} is not stored")
        may_go = _may_go(store, usage, quiet_seconds, report)
        chosen = [u for u in usage if u.study_uid in may_go]
        if not chosen:
            raise DeletionRefused(f"nothing was deleted: {report.kept[0].why}" if len(report.kept) == 1 else
                                  "nothing was deleted:\n" + "\n".join(
                                      f"  study {k.study_uid} ({k.patient}): {k.why}" for k in report.kept))
        rows = [r for u in chosen for r in store.index.study_instances(u.study_uid)]
        _run(store, rows, f"{reason}: {report.what}", report, chunk)
        gone = {u.study_uid for u in chosen} - {u.study_uid for u in store.index.study_usage([u.study_uid for u in chosen])}
        report.studies = [u.study_uid for u in chosen if u.study_uid in gone]
        StudyMarks(store.data_dir).forget(gone)
    log.info("%s (%s)", report.summary(), reason)
    _audit(store, rows, report, reason)
    return report


def _may_go(store: Store, studies: list[StudyUsage], quiet_seconds: float, report: DeleteReport) -> set[str]:
    """The studies of ``studies`` that may be deleted now; each one kept goes into
    ``report.kept`` with why (once per entry of ``studies``, as a series names its study)."""
    marks = StudyMarks(store.data_dir).get(u.study_uid for u in studies)
    busy = busy_studies(store.data_dir)
    may: set[str] = set()
    for u in studies:
        mark = marks.get(u.study_uid)
        why = why_kept(u, protected=bool(mark and mark.protected), busy=u.study_uid in busy,
                       quiet_seconds=quiet_seconds)
        if why:
            report.kept.append(Kept(u.study_uid, _patient(u), why))
        else:
            may.add(u.study_uid)
    return may


def _audit(store: Store, rows: list[InstanceRow], report: DeleteReport, reason: str) -> None:
    """The deletion in the audit trail: which studies, how many objects each, who asked."""
    audit.record(store.data_dir, audit.Event(
        "deleted", "D",
        participants=(audit.Participant("person" if "asked" in reason else "application", user=audit.shell_user()),),
        studies=audit.studies_of((r.study_uid, r.sop_instance_uid) for r in rows),
        detail=f"{reason}: {report.summary()}" + (f"; kept {len(report.kept)} study(ies)" if report.kept else "")))


def delete_series(store: Store, series_uids: Iterable[str], *, quiet_seconds: float = DEFAULT_QUIET_SECONDS,
                  reason: str = "asked") -> DeleteReport:
    """Delete whole series; the same rules as :func:`delete_studies` apply to their studies."""
    uids = list(dict.fromkeys(series_uids))
    report = DeleteReport(f"series {uids[0]}" if len(uids) == 1 else f"{len(uids)} series")
    with delete_lock(store.data_dir):
        finish_pending(store)
        found = {u: s for u in uids if (s := store.index.series(u)) is not None}
        if not found:
            raise DeletionRefused(f"nothing to delete: {report.what} is not stored")
        usage = {u.study_uid: u for u in store.index.study_usage(sorted({s.study_uid for s in found.values()}))}
        may_go = _may_go(store, [usage[s.study_uid] for s in found.values()], quiet_seconds, report)
        chosen = [series_uid for series_uid, s in found.items() if s.study_uid in may_go]
        if not chosen:
            raise DeletionRefused("nothing was deleted: " + "; ".join(k.why for k in report.kept))
        rows = [r for uid in chosen for r in store.index.ordered_instances(uid)]
        _run(store, rows, f"{reason}: {report.what}", report)
        report.series = [uid for uid in chosen if store.index.series(uid) is None]
        emptied = set(usage) - {u.study_uid for u in store.index.study_usage(list(usage))}
        StudyMarks(store.data_dir).forget(emptied)
    log.info("%s (%s)", report.summary(), reason)
    _audit(store, rows, report, reason)
    return report


def _run(store: Store, rows: list[InstanceRow], why: str, report: DeleteReport, chunk: int = CHUNK) -> None:
    """Journal ``rows``, delete them, remove the journal."""
    items = []
    for r in rows:
        try:
            st = (store.data_dir / r.path).stat()
            items.append(_Item(r.sop_instance_uid, r.path, st.st_ino, st.st_mtime_ns, st.st_size))
        except FileNotFoundError:
            items.append(_Item(r.sop_instance_uid, r.path, None, None, 0))
        except OSError as exc:
            raise store_error(exc, f"cannot read {r.path}") from exc
    journal = _write_journal(store.data_dir, why, items)
    instances, freed = _execute(store, items, chunk)
    report.instances += instances
    report.bytes_freed += freed
    _remove_journal(journal)


def finish_pending(store: Store) -> int:
    """Complete the deletions a crash interrupted (see the module's description); return how
    many objects they removed. Callers hold the deletion lock, or are alone on the store."""
    folder = store.data_dir / JOURNAL_DIR
    if not folder.is_dir():
        return 0
    total = 0
    for journal in sorted(folder.glob("*.json")):
        try:
            data = json.loads(journal.read_text())
            items = [_Item(*i) for i in data["items"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # A journal is renamed into place complete: an unreadable one was never acted on.
            log.warning("ignoring the unreadable deletion journal %s (%s)", journal.name, exc)
            with contextlib.suppress(OSError):
                journal.unlink()
            continue
        instances, freed = _execute(store, items)
        log.warning("finished a deletion that was interrupted (%s): %d object(s), %.1f MB freed",
                    data.get("why", "?"), instances, freed / 1e6)
        total += instances
        _remove_journal(journal)
    for leftover in folder.glob("*.tmp"):
        with contextlib.suppress(OSError):
            leftover.unlink()
    return total


def _write_journal(data_dir: Path, why: str, items: list[_Item]) -> Path:
    folder = data_dir / JOURNAL_DIR
    name = f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S%f')}-{os.getpid()}"
    tmp, final = folder / f"{name}.tmp", folder / f"{name}.json"
    try:
        folder.mkdir(exist_ok=True)
        with open(tmp, "w") as f:
            json.dump({"why": why, "items": [[i.uid, i.path, i.ino, i.mtime_ns, i.size] for i in items]}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(folder)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise store_error(exc, "cannot record the deletion before starting it; nothing was deleted") from exc
    return final


def _remove_journal(journal: Path) -> None:
    with contextlib.suppress(OSError):
        journal.unlink()
        fsync_dir(journal.parent)


def _execute(store: Store, items: list[_Item], chunk_size: int = CHUNK) -> tuple[int, int]:
    """Delete ``items`` chunk by chunk; return (objects removed, bytes freed)."""
    removed = freed = 0
    folders: set[Path] = set()
    for start in range(0, len(items), chunk_size):
        chunk = items[start:start + chunk_size]
        with store.hold_uids([i.uid for i in chunk]):
            doomed: list[tuple[_Item, Path | None]] = []
            for i in chunk:
                path = store.data_dir / i.path
                try:
                    st = path.stat()
                except FileNotFoundError:
                    doomed.append((i, None))
                    continue
                if i.ino is None or (st.st_ino, st.st_mtime_ns) != (i.ino, i.mtime_ns):
                    continue  # stored again since the deletion was asked for: keep it
                doomed.append((i, path))
            removed += store.index.remove_instances([(i.uid, i.path) for i, _ in doomed])
            for i, found in doomed:
                if found is None:
                    continue
                try:
                    found.unlink()
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise store_error(exc, f"cannot remove {i.path}; the deletion finishes at the next start") \
                        from exc
                freed += i.size
                folders.add(found.parent)
        for folder in folders:
            with contextlib.suppress(OSError):
                fsync_dir(folder)
    # Empty series and study folders go too (a store into them meanwhile makes them again).
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        for d in (folder, folder.parent):
            if d != store.objects and store.objects in d.parents:
                with contextlib.suppress(OSError):
                    d.rmdir()
    return removed, freed
