"""The store: DICOM Part 10 files on disk, written atomically, and their SQLite index.

Layout under the data directory::

    objects/<study>/<series>/<sop instance>.dcm   the stored objects, byte-exact
    tmp/                                          objects being written (emptied at start)
    superseded/                                   objects replaced under the REPLACE policy
    quarantine/                                   incomplete files found after a power cut
    index.sqlite                                  the index (WAL)
    .in-use, .uid-locks                           writer and per-UID locks (see Store)
    .clean-shutdown, .reconcile-needed            whether the next start must reconcile

An object is written to ``tmp/``, fsynced, renamed into ``objects/`` (the directory is
fsynced too), and only then indexed; only then does the sender hear success. After a crash
the files are the truth: :meth:`Store.recover` indexes files the index lacks and drops rows
whose file is gone.

A full disk (or an I/O error, a read-only disk) at any step raises StoreFullError
(StoreDiskError) and leaves the object either stored and indexed or absent. If undoing a
step fails too, the store withholds the clean-shutdown mark, so the next start reconciles.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import shutil
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from appliance.dicom import attributes, dicomio, volume
from appliance.conformance import TransferSyntax
from appliance.config import DuplicatePolicy
from appliance.errors import StoreDiskError, StoreError, StoreFullError
from appliance.store.index import (Index, InstanceRow, InstanceSummary, RecentStudy, SeriesSummary,
                                   StudySummary)

log = logging.getLogger(__name__)

_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
_CLEAN_MARK = ".clean-shutdown"
#: Left when index and files may disagree (a cleanup failed): no writer marks a clean
#: shutdown while it exists, and the next start reconciles and removes it.
_RECONCILE_NOTE = ".reconcile-needed"


class DuplicateConflict(StoreError):
    """A different object with the same SOP Instance UID is already stored."""


@dataclass(frozen=True)
class StoredObject:
    """The outcome of :meth:`Store.put`."""

    sop_instance_uid: str
    path: Path
    #: True when identical content was already stored and nothing changed.
    already_stored: bool
    #: The path the previous, different object was moved to (REPLACE policy).
    superseded: Path | None = None


def path_component(uid: str) -> str:
    """Return a safe file-name component for ``uid``.

    A well-formed UID (digits and dots, at most 64 characters) is used as it is; anything
    else is replaced by a hash, so no UID can name a path outside the store."""
    if len(uid) <= 64 and _UID_RE.fullmatch(uid):
        return uid
    return "h" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: Buckets of the cross-process SOP Instance UID lock: two UIDs share one in 256, and only
#: wait for each other if they are stored at the very same moment.
_UID_LOCK_BUCKETS = 256
_F_OFD_SETLKW: int | None = getattr(fcntl, "F_OFD_SETLKW", None)


def _ofd_lock(fd: int, byte: int, kind: int) -> None:
    """Lock (F_WRLCK, waiting) or unlock (F_UNLCK) one byte of ``fd`` as an open file
    description lock. ``struct flock``: l_type, l_whence, l_start, l_len, l_pid (0)."""
    assert _F_OFD_SETLKW is not None
    fcntl.fcntl(fd, _F_OFD_SETLKW, struct.pack("hhqqi4x", kind, os.SEEK_SET, byte, 1, 0))


def _writer_alive(temp_name: str) -> bool:
    """True if the temp file ``temp_name`` (``<pid>-...``) belongs to another running process."""
    pid = temp_name.split("-", 1)[0]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        self._lockfile: BinaryIO | None = None
        self._unclean = False
        self._lock = threading.Lock()
        self._bucket_locks = [threading.Lock() for _ in range(_UID_LOCK_BUCKETS)]
        self._uid_lock_file: int | None = None
        #: Why index and files may disagree (a cleanup failed), or None.
        self._mismatch: str | None = None

    # -- lifecycle -------------------------------------------------------------

    def open_for_service(self) -> dict[str, int]:
        """Prepare for a service run: clear ``tmp/`` and, after an unclean stop, reconcile.

        Returns what recovery did (see :meth:`recover`)."""
        alone = self._become_writer()
        for leftover in self.tmp.iterdir():
            if _writer_alive(leftover.name):
                continue  # another process (the supervisor's CD import, an older SCP) is writing it
            log.info("removing unfinished object %s left by an earlier run", leftover.name)
            leftover.unlink(missing_ok=True)
        result = {"indexed": 0, "dropped": 0}
        if alone and self._unclean:
            try:
                result = self.recover()
            except (StoreFullError, StoreDiskError) as exc:
                # Serve anyway (objects are refused while the disk is full); retry next start.
                self._note_mismatch(f"checking the store's index against its files after an unclean stop "
                                    f"did not finish: {exc}")
            else:
                self._mismatch = None
                with contextlib.suppress(OSError):
                    (self.data_dir / _RECONCILE_NOTE).unlink(missing_ok=True)
        # else a clean stop, or another live process has the store: nothing crashed
        self.update_verdicts()
        return result

    def _become_writer(self) -> bool:
        """Register this process as a writer of the store (idempotent).

        Every writer holds a shared lock on ``.in-use`` and removes the clean-shutdown mark;
        the last writer to close cleanly puts the mark back. So the mark is only present when
        no writer crashed since it was made, even with several processes (an SCP, a CD import,
        an SCP restarted on new settings) sharing the store. Returns True if no other writer
        was alive."""
        if self._lockfile is not None:
            return False
        try:
            self._lockfile = open(self.data_dir / ".in-use", "a+b")
        except OSError as exc:
            raise store_error(exc, "cannot open the store's lock file") from exc
        try:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
            alone = True
        except BlockingIOError:
            alone = False
        fcntl.flock(self._lockfile, fcntl.LOCK_SH)
        mark = self.data_dir / _CLEAN_MARK
        self._unclean = alone and (not mark.exists() or (self.data_dir / _RECONCILE_NOTE).exists())
        if mark.exists():
            mark.unlink(missing_ok=True)
            _fsync_dir(self.data_dir)
        return alone

    def close(self, clean: bool = True) -> None:
        """Close the index; if this was the last writer and it stopped cleanly, mark a clean
        shutdown so the next start skips reconciliation."""
        self.index.close()
        with self._lock:
            if self._uid_lock_file is not None:
                os.close(self._uid_lock_file)
                self._uid_lock_file = None
        if self._lockfile is None:
            return
        try:
            if clean and (self._mismatch is not None or (self.data_dir / _RECONCILE_NOTE).exists()):
                log.warning("not marking a clean shutdown: the store's index and files may disagree (%s); "
                            "the next start checks and reconciles them",
                            self._mismatch or f"{_RECONCILE_NOTE} is present")
                clean = False
            if clean:
                try:
                    fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    pass  # another writer is still running; it will mark when it stops
                else:
                    try:
                        (self.data_dir / _CLEAN_MARK).touch()
                        _fsync_dir(self.data_dir)
                    except OSError as exc:
                        log.warning("cannot mark a clean shutdown (%s); the next start checks the store's "
                                    "index against its files", exc.strerror)
        finally:
            self._lockfile.close()
            self._lockfile = None

    def recover(self) -> dict[str, int]:
        """Make index and files agree: index unindexed files, drop rows without a file."""
        known = self.index.paths()
        on_disk = set()
        indexed = dropped = quarantined = 0
        for path in self.objects.rglob("*.dcm"):
            rel = str(path.relative_to(self.data_dir))
            on_disk.add(rel)
            if rel not in known:
                try:
                    self._index_file(path, calling_ae=None, origin="recovered")
                    indexed += 1
                except (StoreFullError, StoreDiskError):
                    raise  # the disk, not the file: keep the file where it is
                except (StoreError, dicomio.EncodingError, attributes.AttributeDecodeError, OSError) as exc:
                    # Never acknowledged (its index row would exist): an object cut short by a
                    # power failure. Keep it out of sight, but keep it.
                    dest = self.quarantine / f"{path.name}.{time.time_ns()}"
                    log.warning("stored file %s is incomplete or unreadable (%s); moved to %s", rel, exc, dest)
                    self.quarantine.mkdir(exist_ok=True)
                    os.replace(path, dest)
                    quarantined += 1
        for rel, uid in known.items():
            if rel not in on_disk:
                log.warning("index row for %s has no file %s; dropping the row", uid, rel)
                self.index.remove(uid)
                dropped += 1
        if indexed or dropped or quarantined:
            log.warning("recovery after an unclean stop: %d file(s) indexed, %d row(s) dropped, "
                        "%d incomplete file(s) quarantined", indexed, dropped, quarantined)
        result = {"indexed": indexed, "dropped": dropped}
        if quarantined:
            result["quarantined"] = quarantined
        return result

    def reindex(self) -> int:
        """Rebuild the whole index from the stored files; return how many were indexed.

        On a full or failing disk it stops with StoreFullError or StoreDiskError saying
        whether the index was left as it was or rebuilt in part (then the next start of the
        service reconciles it, and running reindex again completes it)."""
        paths = sorted(self.objects.rglob("*.dcm"))
        try:
            self.index.clear()
        except (StoreFullError, StoreDiskError) as exc:
            raise type(exc)(f"{exc}; the index was left as it was. {_remedy(exc)}, then run "
                            "'appliance reindex' again") from exc
        count = 0
        for path in paths:
            try:
                self._index_file(path, calling_ae=None, origin="reindex")
                count += 1
            except (StoreFullError, StoreDiskError) as exc:
                self._withhold_clean_mark()
                raise type(exc)(f"{exc}; the index was rebuilt only in part ({count} of {len(paths)} "
                                f"objects). {_remedy(exc)}, then run 'appliance reindex' again") from exc
            except (StoreError, dicomio.EncodingError, OSError) as exc:
                log.warning("stored file %s cannot be indexed: %s", path, exc)
        with contextlib.suppress(OSError):
            (self.data_dir / _RECONCILE_NOTE).unlink(missing_ok=True)
        self.update_verdicts()
        return count

    def _note_mismatch(self, what: str) -> None:
        """Index and files may disagree because of ``what``: say so, and make sure the next
        start reconciles them."""
        self._mismatch = what
        log.error("%s. Until the service is restarted, which checks and repairs this, the list of stored "
                  "objects may not match the files on the disk", what)
        self._withhold_clean_mark()

    def _withhold_clean_mark(self) -> None:
        """Make the next start reconcile index and files, even if another writer still running
        stops cleanly: remove the clean-shutdown mark and leave the reconcile note (both work
        on a full disk, unless it also has no inode left; this process then still withholds
        the mark at close)."""
        for step in ((self.data_dir / _CLEAN_MARK).unlink, (self.data_dir / _RECONCILE_NOTE).touch):
            try:
                step()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.debug("withholding the clean-shutdown mark: %s", exc)

    def _index_file(self, path: Path, calling_ae: str | None, origin: str) -> None:
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
        self.index.add(self._row(attrs, path, ts, len(data), mtime, calling_ae, origin, None))

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
    ) -> dict[str, Any]:
        row = dict(attrs.values)
        row.update(
            path=str(path.relative_to(self.data_dir)),
            transfer_syntax=ts,
            size=size,
            received_at=received_at,
            calling_ae=calling_ae,
            origin=origin,
            flags=flags,
        )
        return row

    # -- writing ---------------------------------------------------------------

    def path_for(self, attrs: attributes.Attributes) -> Path:
        """Return where the object described by ``attrs`` is stored."""
        return (
            self.objects
            / path_component(attrs["study_uid"] or "")
            / path_component(attrs["series_uid"] or "")
            / (path_component(attrs["sop_instance_uid"] or "") + ".dcm")
        )

    def check_space(self, needed: int, min_free: int) -> None:
        """Raise StoreFullError if storing ``needed`` bytes would go below ``min_free`` free bytes."""
        st = os.statvfs(self.objects)
        free = st.f_bavail * st.f_frsize
        if free - needed < min_free:
            raise StoreFullError(
                f"the store's disk has {free // 2**20} MiB free; at least {min_free // 2**20} MiB "
                "must stay free. Free space (export and delete old studies) to resume storing"
            )

    def create_temp(self) -> tuple[Path, int]:
        """Create a new temp file in ``tmp/``; return its path and an open write descriptor."""
        if self._lockfile is None:
            self._become_writer()
        tmp = self.tmp / f"{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}.part"
        try:
            return tmp, os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
        except OSError as exc:
            raise store_error(exc, "cannot create a file in the store") from exc

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
        body: bytes | memoryview,
        attrs: attributes.Attributes,
        transfer_syntax: str,
        size: int,
        *,
        calling_ae: str | None,
        origin: str,
        flags: str | None = None,
        policy: DuplicatePolicy = DuplicatePolicy.REJECT,
    ) -> StoredObject:
        """Move the complete temp file ``tmp`` (open as ``fd``; its data set is ``body``)
        into place, make it durable, and index it. The caller closes ``fd`` and removes
        ``tmp`` if it is still there afterwards.

        The file is renamed *before* it is fsynced: on ext4 the one journal commit that
        fsync forces then carries the data, the inode and the new name, and the directory
        fsync that follows (kept for file systems that need it) finds nothing left to do.
        That halves the journal commits per object. A power cut between the rename and the
        fsync can leave an incomplete file under its final name, but never an acknowledged
        one: success is answered only after both fsyncs, and :meth:`recover` moves files
        that do not decode and have no index row to ``quarantine/``."""
        uid = attrs["sop_instance_uid"]
        final = self.path_for(attrs)
        try:
            with self._uid_lock(uid):
                old = self.index.instance(uid)
                old_path = None if old is None else self.data_dir / old.path
                if old is not None and old_path is not None and old_path.exists():
                    if self._same_as_stored(old, body, transfer_syntax):
                        return StoredObject(uid, old_path, already_stored=True)
                    if policy is DuplicatePolicy.REJECT:
                        raise DuplicateConflict(
                            f"a different object with SOP Instance UID {uid} is already stored "
                            f"(received {old.received_at} from {old.calling_ae or 'media'}); "
                            "the stored one was kept"
                        )
                else:
                    old_path = None
                return self._place(tmp, fd, final, old_path, uid,
                                   lambda: self._row(attrs, final, transfer_syntax, size, _now(), calling_ae,
                                                     origin, flags))
        except OSError as exc:  # the UID lock
            raise store_error(exc, f"cannot store {uid}") from exc

    def _place(self, tmp: Path, fd: int, final: Path, old_path: Path | None, uid: str,
               row: Callable[[], dict[str, Any]]) -> StoredObject:
        """Supersede ``old_path`` (if any), rename ``tmp`` to ``final``, fsync, index.

        Any failure undoes the steps done (see :meth:`_undo`) and raises a StoreError."""
        moved: Path | None = None
        placed = False
        try:
            try:
                if old_path is not None:
                    dest = self._superseded_name(old_path)
                    os.replace(old_path, dest)
                    moved = dest
                    _fsync_dir(self.superseded)
                if not final.parent.is_dir():
                    final.parent.mkdir(parents=True, exist_ok=True)
                    _fsync_dir(final.parent.parent)
                    _fsync_dir(final.parent.parent.parent)
                os.replace(tmp, final)
                placed = True
                os.fsync(fd)  # ENOSPC of delayed allocation (or a thin disk) shows up here
                _fsync_dir(final.parent)
            except OSError as exc:
                raise store_error(exc, f"cannot store {uid}") from exc
            try:
                self.index.add(row())
            except StoreDiskError:
                # An I/O error at COMMIT leaves unknown whether the row was written: the
                # next start checks (a row whose file the undo removes is dropped then).
                self._withhold_clean_mark()
                raise
        except StoreError as exc:
            undone = self._undo(uid, final if placed else None, moved, old_path)
            raise _not_stored(exc, undone) from exc
        except BaseException:  # a bug, or an interrupt: still never a file without its row
            self._undo(uid, final if placed else None, moved, old_path)
            raise
        if moved is not None:
            log.warning("replaced stored object %s; the previous version is kept as %s", final.name, moved)
        return StoredObject(uid, final, already_stored=False, superseded=moved)

    def _undo(self, uid: str, final: Path | None, moved: Path | None, old_path: Path | None) -> bool:
        """Take back a failed store: remove the new file ``final``, move the superseded
        ``moved`` back to ``old_path``. Return False (and note the mismatch) if that fails."""
        problems = []
        if final is not None:
            try:
                final.unlink(missing_ok=True)
            except OSError as exc:
                problems.append(f"its file {final.relative_to(self.data_dir)} could not be removed ({exc.strerror})")
        if moved is not None and old_path is not None:
            try:
                os.replace(moved, old_path)
            except OSError as exc:
                problems.append(f"the previous version could not be moved back from "
                                f"{moved.relative_to(self.data_dir)} ({exc.strerror})")
        for folder in {p.parent for p in (final, old_path) if p is not None}:
            with contextlib.suppress(OSError):
                _fsync_dir(folder)
        if problems:
            self._note_mismatch(f"storing SOP Instance {uid} failed, and undoing it failed too: "
                                + "; ".join(problems))
            return False
        return True

    def _same_as_stored(self, old: InstanceRow, body: bytes | memoryview, transfer_syntax: str) -> bool:
        """True if ``body`` holds the same object as the stored one: the same bytes, or
        the same values in another encoding."""
        try:
            data = (self.data_dir / old.path).read_bytes()
            offset, ts = dicomio.split_part10(data)
            stored = memoryview(data)[offset:]
            if ts == transfer_syntax and stored == memoryview(body):
                return True
            return attributes.same_content(stored, ts, body, transfer_syntax)
        except (ValueError, OSError, dicomio.EncodingError) as exc:
            log.warning("cannot compare with stored %s: %s", old.sop_instance_uid, exc)
            return False

    def _superseded_name(self, path: Path) -> Path:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        return self.superseded / f"{stamp}-{path.name}"

    @contextlib.contextmanager
    def _uid_lock(self, uid: str) -> Iterator[None]:
        """Hold the lock of ``uid``'s bucket, against this process's other threads and
        against other processes writing the store (an SCP, a CD import, an SCP restarted on
        new settings): between looking an instance up and indexing it, no one else may
        store an object with the same SOP Instance UID.

        One byte of ``.uid-locks`` per bucket, locked with an open file description lock
        (Linux ``F_OFD_SETLKW``): it is released when the holder dies, and unlike a POSIX
        record lock it also separates two Store objects of one process. Threads sharing
        this Store's descriptor are kept apart by the bucket's threading lock."""
        bucket = zlib.crc32(uid.encode("utf-8", "surrogateescape")) % _UID_LOCK_BUCKETS
        with self._bucket_locks[bucket]:
            fd = self._uid_lock_fd()
            if fd is None:
                yield
                return
            _ofd_lock(fd, bucket, fcntl.F_WRLCK)
            try:
                yield
            finally:
                _ofd_lock(fd, bucket, fcntl.F_UNLCK)

    def _uid_lock_fd(self) -> int | None:
        if self._uid_lock_file is None and _F_OFD_SETLKW is not None:
            with self._lock:
                if self._uid_lock_file is None:
                    try:
                        self._uid_lock_file = os.open(self.data_dir / ".uid-locks", os.O_RDWR | os.O_CREAT, 0o640)
                    except OSError as exc:
                        raise store_error(exc, "cannot open the store's lock file") from exc
        return self._uid_lock_file

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


#: The first words of a refusal are what the sender sees (an Error Comment holds 64 characters).
_FULL = "the disk is full; nothing was stored. Free space to resume"


def store_error(exc: OSError, what: str) -> StoreError:
    """The StoreError for ``exc`` met while storing: StoreFullError for a full disk,
    StoreDiskError for an I/O error or a read-only disk."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreFullError(_FULL)
    if exc.errno == errno.EROFS:
        return StoreDiskError(f"the disk is read-only; nothing was stored. Check the disk ({what}: the system "
                              "makes the store's disk read-only after disk errors)")
    if exc.errno == errno.EIO:
        return StoreDiskError(f"the disk reports I/O errors; nothing was stored. Check the disk ({what})")
    return StoreError(f"{what}: {exc.strerror}")


def _remedy(exc: StoreError) -> str:
    return "Free space" if isinstance(exc, StoreFullError) else "Check the disk"


def _not_stored(exc: StoreError, undone: bool) -> StoreError:
    """``exc`` (from a step of storing), saying first what became of the object."""
    message = str(exc)
    if not undone:
        message = (f"storing failed and could not be undone; a restart repairs the store. {_remedy(exc)} "
                   f"({message})")
    elif "nothing was stored" in message:
        pass
    elif isinstance(exc, StoreFullError):
        message = f"{_FULL} ({message})"
    elif isinstance(exc, StoreDiskError):
        message = f"the disk failed; nothing was stored. Check the disk ({message})"
    else:
        message = f"nothing was stored: {message}"
    return type(exc)(message)


def remove_temp(tmp: Path) -> None:
    """Remove the temp file ``tmp`` if it is there; a failure is left to the next start,
    which empties ``tmp/``."""
    try:
        tmp.unlink(missing_ok=True)
    except OSError as exc:
        log.debug("cannot remove %s: %s", tmp, exc.strerror)


def _vec(value: str | None) -> tuple[float, ...] | None:
    if not value:
        return None
    try:
        return tuple(float(x) for x in value.split("\\"))
    except ValueError:
        return None


def free_bytes(path: Path) -> int:
    """Free bytes for unprivileged writers on the file system holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def disk_usage_percent(path: Path) -> float:
    u = shutil.disk_usage(path)
    return 100.0 * u.used / u.total if u.total else 0.0
