"""The store: DICOM Part 10 files on disk, written atomically, and their SQLite index.

Layout under the data directory::

    objects/<study>/<series>/<sop instance>.dcm   the stored objects, byte-exact
    tmp/                                          objects being written (emptied at start)
    superseded/                                   objects replaced under the REPLACE policy
    quarantine/                                   incomplete files found after a power cut
    index.sqlite                                  the index (WAL)
    .in-use, .uid-locks                           writer and per-UID locks (see Store)
    .clean-shutdown, .reconcile-needed            whether the next start must reconcile

An object is written to ``tmp/``, renamed into ``objects/`` and fsynced (the directory
too, unless the file system commits the rename with the file: journaled ext4); only then
does the sender hear success. A CD import indexes it before that; the SCP writes the row
right after answering, holding the object's UID lock until the row exists, so duplicates
are still found exactly. After a crash the files are the truth: :meth:`Store.recover`
indexes files the index lacks (an acknowledged object whose row was not written yet is
one: the writer withholds the clean-shutdown mark meanwhile) and drops rows whose file is
gone.

A full disk (or an I/O error, a read-only disk) at any step raises StoreFullError
(StoreDiskError) and leaves the object either stored and indexed or absent. If undoing a
step fails too, the store withholds the clean-shutdown mark, so the next start reconciles.

:class:`Store` is the one class callers use. Behind it: ``lifecycle`` (the writer lock, the
clean-shutdown mark, recovery and reindex), ``placing`` (the UID locks and the atomic
placing of one object), ``disk`` (OSError as StoreError, fsync, free space) and ``index``
(the SQL).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from appliance.config import DuplicatePolicy, ForwardRule
from appliance.conformance import TransferSyntax
from appliance.dicom import attributes, dicomio, volume
from appliance.errors import StoreDiskError, StoreError, StoreFullError
from appliance.store import deletion, lifecycle
from appliance.store.disk import (disk_usage_percent, file_fsync_commits_rename, free_bytes, remove_temp,
                                  store_error)
from appliance.store.deletion import DeleteReport, DeletionRefused
from appliance.store.index import (Index, InstanceRow, InstanceSummary, RecentStudy, SeriesSummary,
                                   StudySummary, StudyUsage)
from appliance.store.marks import StudyMark, StudyMarks, busy, delete_lock
from appliance.store.placing import Body, DuplicateConflict, Placer, StoredObject

#: What callers import from here: the store's parts behind Store are its own business.
__all__ = ["DeleteReport", "DeletionRefused", "DuplicateConflict", "Store", "StoredObject", "StudyMark",
           "StudyUsage", "disk_usage_percent", "path_component"]

log = logging.getLogger(__name__)

_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")


def path_component(uid: str) -> str:
    """Return a safe file-name component for ``uid``.

    A well-formed UID (digits and dots, at most 64 characters) is used as it is; anything
    else is replaced by a hash, so no UID can name a path outside the store."""
    if len(uid) <= 64 and _UID_RE.fullmatch(uid):
        return uid
    return "h" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def _relative_path(attrs: attributes.Attributes) -> str:
    """``objects/<study>/<series>/<sop instance>.dcm``: where the object described by
    ``attrs`` is stored, relative to the data directory (the index's ``path``)."""
    return (f"objects/{path_component(attrs['study_uid'] or '')}/{path_component(attrs['series_uid'] or '')}/"
            f"{path_component(attrs['sop_instance_uid'] or '')}.dcm")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Store:
    """The object files and the index under ``data_dir``; safe to share between threads."""

    def __init__(self, data_dir: Path, *, slice_tolerance_mm: float = 0.1) -> None:
        self.data_dir = data_dir
        self.objects = data_dir / "objects"
        self.tmp = data_dir / "tmp"
        self.superseded = data_dir / "superseded"
        self.quarantine = data_dir / "quarantine"
        self.slice_tolerance_mm = slice_tolerance_mm
        try:
            for d in (self.objects, self.tmp, self.superseded):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the store under {data_dir}: {exc.strerror}") from exc
        self.index = Index(data_dir / "index.sqlite")
        self._writer = lifecycle.Writer(data_dir)
        self._placer = Placer(data_dir, self.superseded, self.index, self._writer,
                              folder_fsync=not file_fsync_commits_rename(self.objects))
        self._marks: StudyMarks | None = None
        self._forward_rules: tuple[ForwardRule, ...] = ()
        #: Empty temp files made ahead (see :meth:`make_spare_temp`); none is made between
        #: :meth:`close` and the next :meth:`create_temp` (an association ending after the close).
        self._spares: list[tuple[Path, int]] = []
        self._spares_lock = threading.Lock()
        self._spares_closed = False

    # -- lifecycle (see appliance.store.lifecycle) ------------------------------

    def open_for_service(self) -> dict[str, int]:
        """Prepare for a service run: clear ``tmp/`` and, after an unclean stop, reconcile.

        Returns what recovery did (see :meth:`recover`)."""
        alone = self._writer.become()
        lifecycle.clear_tmp(self.tmp)
        result = {"indexed": 0, "dropped": 0}
        # A deletion cut short by a crash is finished first, or recovery would index its files
        # again (unless another process is deleting right now: it finishes them itself).
        with delete_lock(self.data_dir, wait=False) as locked:
            if locked:
                try:
                    deletion.finish_pending(self)
                except (StoreFullError, StoreDiskError) as exc:
                    self._writer.note_mismatch(f"finishing an interrupted deletion did not work: {exc}")
        if alone and self._writer.unclean:
            try:
                result = self.recover()
            except (StoreFullError, StoreDiskError) as exc:
                # Serve anyway (objects are refused while the disk is full); retry next start.
                self._writer.note_mismatch(f"checking the store's index against its files after an unclean "
                                           f"stop did not finish: {exc}")
            else:
                self._writer.reconciled()
        # else a clean stop, or another live process has the store: nothing crashed
        self.update_verdicts()
        return result

    def close(self, clean: bool = True) -> None:
        """Close the index; if this was the last writer and it stopped cleanly, mark a clean
        shutdown so the next start skips reconciliation."""
        with self._spares_lock:
            spares, self._spares = self._spares, []
            self._spares_closed = True
        for tmp, fd in spares:
            os.close(fd)
            remove_temp(tmp)
        self._placer.close()
        self.index.close()
        self._writer.close(clean)

    def recover(self) -> dict[str, int]:
        """Make index and files agree: index unindexed files, drop rows without a file.

        A file indexed again is queued by the forwarding rules too: its row and its queue
        entries were written in one transaction, so a power cut lost both or neither."""
        return lifecycle.recover(self.index, self.data_dir, self.objects, self.quarantine,
                                 lambda path, origin: self._index_file(path, origin, forward=True))

    def reindex(self) -> int:
        """Rebuild the whole index from the stored files; return how many were indexed.

        On a full or failing disk it stops with StoreFullError or StoreDiskError saying
        whether the index was left as it was or rebuilt in part (then the next start of the
        service reconciles it, and running reindex again completes it)."""
        count = lifecycle.reindex(self.index, self.objects, self._writer, self._index_file)
        self.update_verdicts()
        return count

    def _index_file(self, path: Path, origin: str, forward: bool = False) -> None:
        data = path.read_bytes()
        offset, ts = dicomio.split_part10(data)
        try:
            syntax = TransferSyntax(ts)
        except ValueError:
            raise StoreError(f"unsupported transfer syntax {ts}") from None
        body = memoryview(data)[offset:]
        layout = dicomio.walk(body, syntax.is_implicit_vr, syntax.is_little_endian)
        attrs = attributes.read(body, layout, syntax.is_implicit_vr, syntax.is_little_endian)
        mtime = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="milliseconds")
        targets: list[tuple[str, float]] = []
        if forward and self._forward_rules:
            calling = dicomio.source_ae(data)
            targets = self.forward_targets(attrs.values, calling, "network" if calling else "cd")
        self.index.add(self._row(attrs, path, ts, len(data), mtime, None, origin, None), targets)

    def _row(
        self,
        attrs: attributes.Attributes,
        path: Path,
        ts: str,
        size: int,
        received_at: str,
        calling_ae: str | None,
        origin: str,
        flags: str | None,
        rel: str | None = None,
    ) -> dict[str, Any]:
        """The index row of the object ``attrs`` stored at ``path`` (``rel``: that path
        relative to the data directory, if the caller has it)."""
        row = dict(attrs.values)
        row.update(
            path=rel if rel is not None else str(path.relative_to(self.data_dir)),
            transfer_syntax=ts,
            size=size,
            received_at=received_at,
            calling_ae=calling_ae,
            origin=origin,
            flags=flags,
        )
        return row

    # -- forwarding (the queue is in the index; appliance.jobs.forwarder sends it) -----

    def set_forwarding(self, rules: tuple[ForwardRule, ...]) -> None:
        """Queue what is stored from now on by these ``[[forward]]`` rules."""
        self._forward_rules = rules

    def forward_targets(self, values: dict[str, Any], calling_ae: str | None, origin: str) -> list[tuple[str, float]]:
        """The (destination, stable_after) an object with index ``values`` is queued for."""
        targets: dict[str, float] = {}
        for rule in self._forward_rules:
            if rule.matches(calling_ae, values.get("modality"), values.get("sop_class_uid") or "", origin):
                for name in rule.to:
                    targets.setdefault(name, rule.stable_after)
        return list(targets.items())

    # -- writing (see appliance.store.placing) ----------------------------------

    def path_for(self, attrs: attributes.Attributes) -> Path:
        """Return where the object described by ``attrs`` is stored."""
        return self.data_dir / _relative_path(attrs)

    def check_space(self, needed: int, min_free: int) -> None:
        """Raise StoreFullError if storing ``needed`` bytes would go below ``min_free`` free bytes."""
        free = free_bytes(self.objects)
        if free - needed < min_free:
            raise StoreFullError(
                f"the store's disk has {free // 2**20} MiB free; at least {min_free // 2**20} MiB "
                "must stay free. Free space (export and delete old studies) to resume storing"
            )

    def create_temp(self) -> tuple[Path, int]:
        """Create a new temp file in ``tmp/``; return its path and an open write descriptor."""
        if self._spares:
            with self._spares_lock:
                if self._spares:
                    return self._spares.pop()
        self._spares_closed = False  # in use (again, after a close): spares may be made
        return self._new_temp()

    def _new_temp(self) -> tuple[Path, int]:
        if not self._writer.registered:
            self._writer.become()
        tmp = self.tmp / f"{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}.part"
        try:
            return tmp, os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
        except OSError as exc:
            raise store_error(exc, "cannot create a file in the store") from exc

    def make_spare_temp(self, most: int) -> None:
        """Create an empty temp file ahead for the next :meth:`create_temp` (the SCP calls
        this after it has answered, so the next object's file is ready when it arrives), unless
        ``most`` are waiting already. A failure is left to the next create_temp to report."""
        if len(self._spares) >= most:
            return
        try:
            spare = self._new_temp()
        except StoreError:
            return
        with self._spares_lock:
            if not self._spares_closed:
                self._spares.append(spare)
                return
        os.close(spare[1])  # the store was closed meanwhile
        remove_temp(spare[0])

    def put(
        self,
        meta: bytes,
        body: bytes | memoryview,
        attrs: attributes.Attributes,
        transfer_syntax: str,
        *,
        calling_ae: str | None,
        origin: str,
        flags: str | None = None,
        policy: DuplicatePolicy = DuplicatePolicy.REJECT,
    ) -> StoredObject:
        """Store one object (``meta`` + ``body``) atomically and durably, then index it.

        Raises StoreFullError on ENOSPC (nothing is left behind) and DuplicateConflict when
        a different object with the same SOP Instance UID is stored and policy is REJECT."""
        tmp, fd = self.create_temp()
        try:
            try:
                for chunk in (meta, body):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
            except OSError as exc:
                raise store_error(exc, "cannot write to the store") from exc
            return self.commit(tmp, fd, body, attrs, transfer_syntax, len(meta) + len(body),
                               calling_ae=calling_ae, origin=origin, flags=flags, policy=policy)
        finally:
            os.close(fd)
            remove_temp(tmp)

    def commit(
        self,
        tmp: Path,
        fd: int,
        body: Body,
        attrs: attributes.Attributes,
        transfer_syntax: str,
        size: int,
        *,
        calling_ae: str | None,
        origin: str,
        flags: str | None = None,
        policy: DuplicatePolicy = DuplicatePolicy.REJECT,
        defer_index: bool = False,
    ) -> StoredObject:
        """Move the complete temp file ``tmp`` (open as ``fd``; its data set is ``body``)
        into place, make it durable, and index it (see :meth:`Placer.commit`; with
        ``defer_index`` the row is written by the result's ``settle``). The caller closes
        ``fd`` and removes ``tmp`` if it is still there afterwards."""
        rel = _relative_path(attrs)
        final = self.data_dir / rel  # path_for(attrs), joined once
        forward = self.forward_targets(attrs.values, calling_ae, origin)
        return self._placer.commit(
            tmp, fd, final, attrs["sop_instance_uid"], body, transfer_syntax,
            lambda: self._row(attrs, final, transfer_syntax, size, _now(), calling_ae, origin, flags, rel), policy,
            forward, defer_index=defer_index)

    # -- deleting (see appliance.store.deletion) and study marks (appliance.store.marks) --

    def hold_uids(self, uids: list[str]) -> contextlib.AbstractContextManager[None]:
        """Hold the SOP Instance UID locks of ``uids``: no object with one of them is stored meanwhile."""
        return self._placer.uid_locks.hold_many(uids)

    def delete_studies(self, study_uids: list[str], *, what: str = "",
                       quiet_seconds: float = deletion.DEFAULT_QUIET_SECONDS, reason: str = "asked",
                       chunk: int = deletion.CHUNK) -> DeleteReport:
        """Delete whole studies, crash-safely, ``chunk`` objects per index transaction (see
        :func:`appliance.store.deletion.delete_studies`)."""
        return deletion.delete_studies(self, study_uids, what=what, quiet_seconds=quiet_seconds, reason=reason,
                                       chunk=chunk)

    def delete_series(self, series_uids: list[str], *, quiet_seconds: float = deletion.DEFAULT_QUIET_SECONDS,
                      reason: str = "asked") -> DeleteReport:
        """Delete whole series, crash-safely (see :func:`appliance.store.deletion.delete_series`)."""
        return deletion.delete_series(self, series_uids, quiet_seconds=quiet_seconds, reason=reason)

    @property
    def marks(self) -> StudyMarks:
        """The studies' protected and delivered marks (kept apart from the rebuildable index)."""
        if self._marks is None:
            self._marks = StudyMarks(self.data_dir)
        return self._marks

    def busy(self, study_uids: list[str]) -> contextlib.AbstractContextManager[None]:
        """Mark ``study_uids`` as being exported or sent while the block runs: no deletion takes them."""
        return busy(self.data_dir, study_uids)

    def record_delivery(self, sent_uids: set[str], to: str, at: str) -> list[str]:
        """Record as delivered to ``to`` (by an export or send started ``at``) every study all
        of whose objects are in ``sent_uids``; return those studies. Never raises: a failure
        is logged, and retention then keeps the studies (the safe side)."""
        try:
            studies = {r.study_uid for uid in sent_uids if (r := self.index.instance(uid)) is not None}
            done = [s for s in sorted(studies)
                    if all(r.sop_instance_uid in sent_uids for r in self.index.study_instances(s))]
            if done:
                self.marks.delivered(done, to, at)
        except StoreError as exc:
            log.warning("could not record which studies reached %s (retention keeps them): %s", to, exc)
            return []
        return done

    def study_usage(self, study_uids: list[str] | None = None) -> list[StudyUsage]:
        """Return every study (or those given) with its size, least recently received first."""
        return self.index.study_usage(study_uids)

    def studies_of_patient(self, patient_id: str) -> list[str]:
        """Return the studies of every patient with this Patient ID."""
        return self.index.studies_of_patient(patient_id)

    # -- reading ---------------------------------------------------------------

    def locate(self, sop_instance_uid: str) -> Path | None:
        """Return the stored file of an instance, or None."""
        row = self.index.instance(sop_instance_uid)
        return None if row is None else self.data_dir / row.path

    # The index's named queries, for callers outside the store (see Index for each contract).

    def instance(self, sop_instance_uid: str) -> InstanceRow | None:
        """Return the index row of one instance, or None."""
        return self.index.instance(sop_instance_uid)

    def instances(self, series_uid: str | None = None) -> list[InstanceRow]:
        """Return every instance, or those of one series, in the order they were indexed."""
        return self.index.instances(series_uid)

    def ordered_instances(self, series_uid: str) -> list[InstanceRow]:
        """Return the instances of one series by instance number, then SOP Instance UID."""
        return self.index.ordered_instances(series_uid)

    def study_instances(self, study_uid: str) -> list[InstanceRow]:
        """Return the instances of one study by series UID, instance number, then SOP Instance UID."""
        return self.index.study_instances(study_uid)

    def counts(self) -> dict[str, int]:
        """Return the number of patients, studies, series and instances."""
        return self.index.counts()

    def level_of(self, uid: str) -> str | None:
        """Return "study" or "series" if ``uid`` is a stored study or series, else None."""
        return self.index.level_of(uid)

    def study_uids(self, received_after: str | None = None) -> list[str]:
        """Return the studies (those last received after ``received_after`` if given) by first receipt."""
        return self.index.study_uids(received_after)

    def series_in_study(self, study_uid: str, *, uid_breaks_ties: bool = True) -> list[str]:
        """Return the series of one study by series number (see :meth:`Index.series_in_study`)."""
        return self.index.series_in_study(study_uid, uid_breaks_ties=uid_breaks_ties)

    def series(self, series_uid: str) -> SeriesSummary | None:
        """Return one series with its 3D verdict, or None."""
        return self.index.series(series_uid)

    def series_listing(self) -> list[SeriesSummary]:
        """Return every series by study UID, then series number."""
        return self.index.series_listing()

    def instance_listing(self) -> list[InstanceSummary]:
        """Return every instance by series UID, then instance number."""
        return self.index.instance_listing()

    def study_listing(self) -> list[StudySummary]:
        """Return every study with its patient and counts, by last receipt."""
        return self.index.study_listing()

    def recent_studies(self, limit: int) -> list[RecentStudy]:
        """Return the ``limit`` studies last received, latest first."""
        return self.index.recent_studies(limit)

    def update_verdicts(self, series: Iterator[str] | list[str] | None = None) -> None:
        """Recompute the 3D verdict of the given series (default: every stale one). On a full
        or failing disk the verdicts stay stale (recomputed next time) and a warning is logged."""
        try:
            self._update_verdicts(series)
        except (StoreFullError, StoreDiskError) as exc:
            log.warning("3D verdicts not updated (%s); they are computed again later", exc)

    def _update_verdicts(self, series: Iterator[str] | list[str] | None) -> None:
        for series_uid in series if series is not None else self.index.stale_series():
            rows = self.index.geometry(series_uid)
            if not rows:
                continue
            slices = [
                volume.Slice(
                    r["sop_instance_uid"],
                    _vec(r["image_position_patient"]),
                    _vec(r["image_orientation_patient"]),
                    r["slice_thickness"],
                    r["spacing_between_slices"],
                    r["number_of_frames"] or 1,
                )
                for r in rows
            ]
            v = volume.verdict(slices, self.slice_tolerance_mm)
            self.index.set_verdict(series_uid, v.ok, v.reason)


def _vec(value: str | None) -> tuple[float, ...] | None:
    if not value:
        return None
    try:
        return tuple(map(float, value.split("\\")))
    except ValueError:
        return None
