"""Placing a complete temp file in the store: one SOP Instance UID at a time, atomically.

:class:`Placer` looks the UID up under its lock (:class:`UidLocks`), keeps or supersedes an
object already stored, renames the file into ``objects/``, fsyncs, and indexes it; a step
that fails is undone (:meth:`Placer._undo`), and if undoing fails too the store's
:class:`~appliance.store.lifecycle.Writer` withholds the clean-shutdown mark."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import struct
import threading
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from appliance.config import DuplicatePolicy
from appliance.dicom import attributes, dicomio
from appliance.errors import StoreDiskError, StoreError, StoreFullError
from appliance.store.disk import FULL, fsync_dir, remedy, store_error
from appliance.store.index import Index
from appliance.store.lifecycle import Writer

log = logging.getLogger(__name__)


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
    #: With ``defer_index``: writes the index row and lets the UID go (call it exactly once).
    settle: Callable[[], None] | None = None


#: Buckets of the cross-process SOP Instance UID lock: two UIDs share one in 256, and only
#: wait for each other if they are stored at the very same moment.
_UID_LOCK_BUCKETS = 256
_F_OFD_SETLKW: int | None = getattr(fcntl, "F_OFD_SETLKW", None)


def _ofd_lock(fd: int, byte: int, kind: int) -> None:
    """Lock (F_WRLCK, waiting) or unlock (F_UNLCK) one byte of ``fd`` as an open file
    description lock. ``struct flock``: l_type, l_whence, l_start, l_len, l_pid (0)."""
    assert _F_OFD_SETLKW is not None
    fcntl.fcntl(fd, _F_OFD_SETLKW, struct.pack("hhqqi4x", kind, os.SEEK_SET, byte, 1, 0))


#: A data set being stored: its bytes, or (when they are no longer held in memory) what
#: reads them again, called only if it has to be compared with a stored object.
Body = bytes | memoryview | Callable[[], bytes | memoryview]


class UidLocks:
    """The SOP Instance UID locks of the store under ``data_dir``; owns the descriptor of
    ``.uid-locks`` (opened on first use) until :meth:`close`."""

    def __init__(self, data_dir: Path) -> None:
        self._path = data_dir / ".uid-locks"
        self._lock = threading.Lock()
        self._bucket_locks = [threading.Lock() for _ in range(_UID_LOCK_BUCKETS)]
        self._fd: int | None = None

    @contextlib.contextmanager
    def hold(self, uid: str) -> Iterator[None]:
        """Hold the lock of ``uid``'s bucket, against this process's other threads and
        against other processes writing the store (an SCP, a CD import, an SCP restarted on
        new settings): between looking an instance up and indexing it, no one else may
        store an object with the same SOP Instance UID.

        One byte of ``.uid-locks`` per bucket, locked with an open file description lock
        (Linux ``F_OFD_SETLKW``): it is released when the holder dies, and unlike a POSIX
        record lock it also separates two UidLocks (two Store objects) of one process.
        Threads sharing this descriptor are kept apart by the bucket's threading lock."""
        bucket = zlib.crc32(uid.encode("utf-8", "surrogateescape")) % _UID_LOCK_BUCKETS
        with self._bucket_locks[bucket]:
            fd = self._descriptor()
            if fd is None:
                yield
                return
            _ofd_lock(fd, bucket, fcntl.F_WRLCK)
            try:
                yield
            finally:
                if self._fd == fd:  # else close() came first, and released every lock
                    _ofd_lock(fd, bucket, fcntl.F_UNLCK)

    @contextlib.contextmanager
    def hold_many(self, uids: list[str]) -> Iterator[None]:
        """Hold the locks of every bucket of ``uids`` at once, taken in bucket order (a
        holder of one bucket never waits for a lower one, so this cannot deadlock with it)."""
        buckets: dict[int, str] = {}
        for uid in uids:
            buckets.setdefault(zlib.crc32(uid.encode("utf-8", "surrogateescape")) % _UID_LOCK_BUCKETS, uid)
        with contextlib.ExitStack() as stack:
            for bucket in sorted(buckets):
                stack.enter_context(self.hold(buckets[bucket]))
            yield

    def _descriptor(self) -> int | None:
        if self._fd is None and _F_OFD_SETLKW is not None:
            with self._lock:
                if self._fd is None:
                    try:
                        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o640)
                    except OSError as exc:
                        raise store_error(exc, "cannot open the store's lock file") from exc
        return self._fd

    def close(self) -> None:
        """Close the descriptor (releasing any lock still held through it)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class Placer:
    """Moves complete temp files into the store under ``data_dir`` and indexes them in
    ``index``; ``writer`` hears of index and files that may disagree. Owns the UID locks."""

    def __init__(self, data_dir: Path, superseded: Path, index: Index, writer: Writer, *,
                 folder_fsync: bool = True) -> None:
        self.data_dir = data_dir
        self.superseded = superseded
        self.index = index
        self.writer = writer
        self.uid_locks = UidLocks(data_dir)
        #: False where a file's fsync also commits its rename (journaled ext4).
        self.folder_fsync = folder_fsync
        #: Rows of answered objects the index could not take yet (see :meth:`write_row`).
        self.late_rows: list[_LateRow] = []
        self._late_lock = threading.Lock()

    def close(self) -> None:
        """Write the rows still owed (see :meth:`index_late`), close the UID locks' descriptor."""
        if self.late_rows:
            self.index_late()
        self.uid_locks.close()

    def write_row(self, late: _LateRow) -> bool:
        """Write the index row of an object already answered (its UID lock held); on a full
        or failing disk keep it owed (:attr:`late_rows`) and say so. True if written."""
        try:
            self.index.add(late.row(), late.forward)
        except StoreError as exc:
            # Answered and durable: it cannot be taken back. Owed until written (the next
            # stored object retries, and so does close); a crash leaves it to the next start.
            with self._late_lock:
                self.late_rows.append(late)
            log.error("SOP Instance %s is stored and was acknowledged, but the index could not record it yet "
                      "(%s); it is listed once the index can be written (retried with each object stored, and "
                      "at the next start)", late.uid, exc)
            return False
        self.writer.unindexed(-1)
        return True

    def index_late(self) -> None:
        """Write the rows owed since the index could not be written (see :meth:`write_row`).
        A row is dropped if its UID has been indexed meanwhile (a newer object replaced it)."""
        with self._late_lock:
            late, self.late_rows = self.late_rows, []
        for row in late:
            with self.uid_locks.hold(row.uid):
                try:
                    indexed = self.index.instance(row.uid) is not None
                except StoreError:
                    indexed = False
                if indexed:
                    self.writer.unindexed(-1)
                elif self.write_row(row):
                    log.info("SOP Instance %s is now in the index", row.uid)

    def commit(self, tmp: Path, fd: int, final: Path, uid: str, body: Body, transfer_syntax: str,
               row: Callable[[], dict[str, Any]], policy: DuplicatePolicy,
               forward: Sequence[tuple[str, float]] = (), *, defer_index: bool = False) -> StoredObject:
        """Place the complete temp file ``tmp`` (open as ``fd``; its data set is ``body``)
        at ``final`` and index it with ``row()``, unless the same object is already stored;
        raise DuplicateConflict for a different one under the REJECT policy, else supersede it.
        ``body`` is read only to compare with an object already stored under the same UID.

        The file is renamed *before* it is fsynced: on ext4 the one journal commit that
        fsync forces then carries the data, the inode and the new name. Where the file
        system needs it (see :func:`~appliance.store.disk.file_fsync_commits_rename`) the
        folder is fsynced too. A power cut between the rename and the fsync can leave an
        incomplete file under its final name, but never an acknowledged one: success is
        answered only after the fsync, and recovery moves files that do not decode and have
        no index row to ``quarantine/``.

        With ``defer_index`` the object is durable when this returns, but its index row is
        written by the returned object's :meth:`StoredObject.settle` (the SCP calls it once
        it has answered): until then the UID's lock stays held, so no other object with this
        UID is looked up before the row exists, and the writer withholds the clean-shutdown
        mark, so a crash in between leaves the file for the next start to index."""
        held = contextlib.ExitStack()
        try:
            held.enter_context(self.uid_locks.hold(uid))
            old = self.index.instance(uid)
            old_path = None if old is None else self.data_dir / old.path
            if old_path is None and final.exists():
                old_path = final  # stored, but its row is not written yet (the next start indexes it)
            if old_path is not None and old_path.exists():
                if self._same_as_stored(old_path, uid, body, transfer_syntax):
                    return StoredObject(uid, old_path, already_stored=True)
                if policy is DuplicatePolicy.REJECT:
                    when = f"received {old.received_at} from {old.calling_ae or 'media'}" if old else "not yet indexed"
                    raise DuplicateConflict(
                        f"a different object with SOP Instance UID {uid} is already stored ({when}); "
                        "the stored one was kept"
                    )
            else:
                old_path = None
            placed = self._place(tmp, fd, final, old_path, uid)
            if not defer_index:
                self._index(placed, uid, row, forward, old_path)
                return placed
            self.writer.unindexed(+1)
            return dataclasses.replace(placed, settle=_Settle(self, held.pop_all(), uid, row, forward))
        except OSError as exc:  # the UID lock
            raise store_error(exc, f"cannot store {uid}") from exc
        finally:
            held.close()

    def _place(self, tmp: Path, fd: int, final: Path, old_path: Path | None, uid: str) -> StoredObject:
        """Supersede ``old_path`` (if any), rename ``tmp`` to ``final``, fsync.

        Any failure undoes the steps done (see :meth:`_undo`) and raises a StoreError."""
        moved: Path | None = None
        placed = False
        try:
            try:
                if old_path is not None:
                    dest = self._superseded_name(old_path)
                    os.replace(old_path, dest)
                    moved = dest
                    fsync_dir(self.superseded)
                for attempt in range(3):
                    if not final.parent.is_dir():
                        final.parent.mkdir(parents=True, exist_ok=True)
                        fsync_dir(final.parent.parent)
                        fsync_dir(final.parent.parent.parent)
                    try:
                        os.replace(tmp, final)
                        break
                    except FileNotFoundError:
                        # A deletion removed the (empty) series folder just now: make it again.
                        if attempt == 2 or not tmp.exists():
                            raise
                placed = True
                os.fsync(fd)  # ENOSPC of delayed allocation (or a thin disk) shows up here
                if self.folder_fsync:
                    fsync_dir(final.parent)
            except OSError as exc:
                raise store_error(exc, f"cannot store {uid}") from exc
        except StoreError as exc:
            undone = self._undo(uid, final if placed else None, moved, old_path)
            raise _not_stored(exc, undone) from exc
        except BaseException:  # a bug, or an interrupt: still never a file without its row
            self._undo(uid, final if placed else None, moved, old_path)
            raise
        if moved is not None:
            log.warning("replaced stored object %s; the previous version is kept as %s", final.name, moved)
        return StoredObject(uid, final, already_stored=False, superseded=moved)

    def _index(self, placed: StoredObject, uid: str, row: Callable[[], dict[str, Any]],
               forward: Sequence[tuple[str, float]], old_path: Path | None) -> None:
        """Index the object just placed; a failure takes the placing back (see :meth:`_undo`)."""
        try:
            try:
                self.index.add(row(), forward)
            except StoreDiskError:
                # An I/O error at COMMIT leaves unknown whether the row was written: the
                # next start checks (a row whose file the undo removes is dropped then).
                self.writer.withhold_clean_mark()
                raise
        except StoreError as exc:
            undone = self._undo(uid, placed.path, placed.superseded, old_path)
            raise _not_stored(exc, undone) from exc
        except BaseException:
            self._undo(uid, placed.path, placed.superseded, old_path)
            raise

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
                fsync_dir(folder)
        if problems:
            self.writer.note_mismatch(f"storing SOP Instance {uid} failed, and undoing it failed too: "
                                      + "; ".join(problems))
            return False
        return True

    @staticmethod
    def _same_as_stored(path: Path, uid: str, body: Body, transfer_syntax: str) -> bool:
        """True if ``body`` holds the same object as the one stored at ``path``: the same
        bytes, or the same values in another encoding."""
        try:
            if callable(body):
                body = body()
            data = path.read_bytes()
            offset, ts = dicomio.split_part10(data)
            stored = memoryview(data)[offset:]
            if ts == transfer_syntax and stored == memoryview(body):
                return True
            return attributes.same_content(stored, ts, body, transfer_syntax)
        except (ValueError, OSError, dicomio.EncodingError) as exc:
            log.warning("cannot compare with stored %s: %s", uid, exc)
            return False

    def _superseded_name(self, path: Path) -> Path:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        return self.superseded / f"{stamp}-{path.name}"


class _Settle:
    """The second half of a deferred commit (see :meth:`Placer.commit`): index the object,
    then release its UID lock. Runs once; later calls do nothing."""

    def __init__(self, placer: Placer, held: contextlib.ExitStack, uid: str, row: Callable[[], dict[str, Any]],
                 forward: Sequence[tuple[str, float]]) -> None:
        self._placer = placer
        self._held: contextlib.ExitStack | None = held
        self._late = _LateRow(uid, row, forward)

    def __call__(self) -> None:
        held, self._held = self._held, None
        if held is None:
            return
        placer = self._placer
        try:
            written = placer.write_row(self._late)
        finally:
            held.close()
        if written and placer.late_rows:
            placer.index_late()


@dataclass(frozen=True)
class _LateRow:
    """The index row of an object stored and answered, not written yet."""

    uid: str
    row: Callable[[], dict[str, Any]]
    forward: Sequence[tuple[str, float]]


def _not_stored(exc: StoreError, undone: bool) -> StoreError:
    """``exc`` (from a step of storing), saying first what became of the object."""
    message = str(exc)
    if not undone:
        message = (f"storing failed and could not be undone; a restart repairs the store. {remedy(exc)} "
                   f"({message})")
    elif "nothing was stored" in message:
        pass
    elif isinstance(exc, StoreFullError):
        message = f"{FULL} ({message})"
    elif isinstance(exc, StoreDiskError):
        message = f"the disk failed; nothing was stored. Check the disk ({message})"
    else:
        message = f"nothing was stored: {message}"
    return type(exc)(message)
