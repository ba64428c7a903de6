"""Who writes the store, whether it stopped cleanly, and making index and files agree.

Every writing process is a :class:`Writer`: it holds a shared lock on ``.in-use`` and
removes ``.clean-shutdown``; the last writer to close cleanly puts the mark back. A start
without the mark (or with ``.reconcile-needed``, left when a cleanup failed) runs
:func:`recover`; ``appliance reindex`` runs :func:`reindex`."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from pathlib import Path
from typing import BinaryIO, Callable

from appliance.dicom import attributes, dicomio
from appliance.errors import StoreDiskError, StoreError, StoreFullError
from appliance.store.disk import fsync_dir, process_running, remedy, store_error
from appliance.store.index import Index

log = logging.getLogger(__name__)

CLEAN_MARK = ".clean-shutdown"
#: Left when index and files may disagree (a cleanup failed): no writer marks a clean
#: shutdown while it exists, and the next start reconciles and removes it.
RECONCILE_NOTE = ".reconcile-needed"

#: Indexes one stored file (its path, and the origin its row records) or raises.
IndexFile = Callable[[Path, str], None]


class Writer:
    """This process as a writer of the store under ``data_dir``: the shared lock on
    ``.in-use`` (held from :meth:`become` to :meth:`close`), the clean-shutdown mark and
    the reconcile note."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._lockfile: BinaryIO | None = None
        #: True if this writer found the store as an unclean stop left it (see :meth:`become`).
        self.unclean = False
        #: Why index and files may disagree (a cleanup failed), or None.
        self.mismatch: str | None = None
        #: Objects stored whose index row is not written yet (see Placer.commit's defer_index).
        self._unindexed = 0
        self._unindexed_lock = threading.Lock()

    def unindexed(self, change: int) -> None:
        """Count an object stored before its index row (+1), or its row written (-1)."""
        with self._unindexed_lock:
            self._unindexed += change

    @property
    def registered(self) -> bool:
        """True between :meth:`become` and :meth:`close`."""
        return self._lockfile is not None

    def become(self) -> bool:
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
        mark = self.data_dir / CLEAN_MARK
        self.unclean = alone and (not mark.exists() or (self.data_dir / RECONCILE_NOTE).exists())
        if mark.exists():
            mark.unlink(missing_ok=True)
            fsync_dir(self.data_dir)
        return alone

    def close(self, clean: bool = True) -> None:
        """Release the lock; if this was the last writer, it stopped cleanly and nothing is
        known to disagree, mark a clean shutdown so the next start skips reconciliation."""
        if self._lockfile is None:
            return
        try:
            with self._unindexed_lock:
                unindexed = self._unindexed
            if clean and unindexed:
                log.warning("not marking a clean shutdown: %d stored object(s) are not indexed yet; the next "
                            "start indexes them", unindexed)
                clean = False
            if clean and (self.mismatch is not None or (self.data_dir / RECONCILE_NOTE).exists()):
                log.warning("not marking a clean shutdown: the store's index and files may disagree (%s); "
                            "the next start checks and reconciles them",
                            self.mismatch or f"{RECONCILE_NOTE} is present")
                clean = False
            if clean:
                try:
                    fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    pass  # another writer is still running; it will mark when it stops
                else:
                    try:
                        (self.data_dir / CLEAN_MARK).touch()
                        fsync_dir(self.data_dir)
                    except OSError as exc:
                        log.warning("cannot mark a clean shutdown (%s); the next start checks the store's "
                                    "index against its files", exc.strerror)
        finally:
            self._lockfile.close()
            self._lockfile = None

    def note_mismatch(self, what: str) -> None:
        """Index and files may disagree because of ``what``: say so, and make sure the next
        start reconciles them."""
        self.mismatch = what
        log.error("%s. Until the service is restarted, which checks and repairs this, the list of stored "
                  "objects may not match the files on the disk", what)
        self.withhold_clean_mark()

    def withhold_clean_mark(self) -> None:
        """Make the next start reconcile index and files, even if another writer still running
        stops cleanly: remove the clean-shutdown mark and leave the reconcile note (both work
        on a full disk, unless it also has no inode left; this process then still withholds
        the mark at close)."""
        for step in ((self.data_dir / CLEAN_MARK).unlink, (self.data_dir / RECONCILE_NOTE).touch):
            try:
                step()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.debug("withholding the clean-shutdown mark: %s", exc)

    def reconciled(self) -> None:
        """Index and files agree again (recovery finished): forget the mismatch, drop the note."""
        self.mismatch = None
        self.drop_reconcile_note()

    def drop_reconcile_note(self) -> None:
        """Remove the reconcile note (a failure leaves it for the next start)."""
        with contextlib.suppress(OSError):
            (self.data_dir / RECONCILE_NOTE).unlink(missing_ok=True)


def clear_tmp(tmp: Path) -> None:
    """Remove the unfinished objects in ``tmp`` that no running process is writing."""
    for leftover in tmp.iterdir():
        if _writer_alive(leftover.name):
            continue  # another process (the supervisor's CD import, an older SCP) is writing it
        log.info("removing unfinished object %s left by an earlier run", leftover.name)
        leftover.unlink(missing_ok=True)


def _writer_alive(temp_name: str) -> bool:
    """True if the temp file ``temp_name`` (``<pid>-...``) belongs to another running process."""
    pid = temp_name.split("-", 1)[0]
    return pid.isdigit() and int(pid) != os.getpid() and process_running(int(pid))


def recover(index: Index, data_dir: Path, objects: Path, quarantine: Path, index_file: IndexFile) -> dict[str, int]:
    """Make index and files agree: index unindexed files under ``objects``, drop rows without
    a file, and move files that cannot be indexed (cut short by a power cut) to ``quarantine``."""
    known = index.paths()
    on_disk = set()
    indexed = dropped = quarantined = 0
    for path in objects.rglob("*.dcm"):
        rel = str(path.relative_to(data_dir))
        on_disk.add(rel)
        if rel not in known:
            try:
                index_file(path, "recovered")
                indexed += 1
            except (StoreFullError, StoreDiskError):
                raise  # the disk, not the file: keep the file where it is
            except (StoreError, dicomio.EncodingError, attributes.AttributeDecodeError, OSError) as exc:
                # Never acknowledged (its index row would exist): an object cut short by a
                # power failure. Keep it out of sight, but keep it.
                dest = quarantine / f"{path.name}.{time.time_ns()}"
                log.warning("stored file %s is incomplete or unreadable (%s); moved to %s", rel, exc, dest)
                quarantine.mkdir(exist_ok=True)
                os.replace(path, dest)
                quarantined += 1
    for rel, uid in known.items():
        if rel not in on_disk:
            log.warning("index row for %s has no file %s; dropping the row", uid, rel)
            index.remove(uid)
            dropped += 1
    if indexed or dropped or quarantined:
        log.warning("recovery after an unclean stop: %d file(s) indexed, %d row(s) dropped, "
                    "%d incomplete file(s) quarantined", indexed, dropped, quarantined)
    result = {"indexed": indexed, "dropped": dropped}
    if quarantined:
        result["quarantined"] = quarantined
    return result


def reindex(index: Index, objects: Path, writer: Writer, index_file: IndexFile) -> int:
    """Rebuild the whole index from the stored files; return how many were indexed.

    On a full or failing disk it stops with StoreFullError or StoreDiskError saying
    whether the index was left as it was or rebuilt in part (then ``writer`` withholds the
    clean-shutdown mark, so the next start of the service reconciles it, and running
    reindex again completes it)."""
    paths = sorted(objects.rglob("*.dcm"))
    try:
        index.clear()
    except (StoreFullError, StoreDiskError) as exc:
        raise type(exc)(f"{exc}; the index was left as it was. {remedy(exc)}, then run "
                        "'appliance reindex' again") from exc
    count = 0
    for path in paths:
        try:
            index_file(path, "reindex")
            count += 1
        except (StoreFullError, StoreDiskError) as exc:
            writer.withhold_clean_mark()
            raise type(exc)(f"{exc}; the index was rebuilt only in part ({count} of {len(paths)} "
                            f"objects). {remedy(exc)}, then run 'appliance reindex' again") from exc
        except (StoreError, dicomio.EncodingError, OSError) as exc:
            log.warning("stored file %s cannot be indexed: %s", path, exc)
    writer.drop_reconcile_note()
    return count
