"""USB export (section 4.4, Tables 10 and 11): write stored studies as a DICOM file-set.

:func:`export` is the one entry point, for ``appliance export`` and for the media watcher
when a stick is inserted. What it writes:

* every selected object whose SOP class is in Table 10 or 11, as a Part 10 file in Implicit
  VR Little Endian (:func:`appliance.dicom.transcode.to_implicit_le`: no value changes), but
  for the keys its DICOMDIR records need valid (:class:`appliance.media.dicomdir.Keys`): a
  legacy date or time is converted, and an empty Patient ID, Study Date, Time or ID, Series or
  Instance Number is completed, in the copy as in its records (the stored object never changes);
* File IDs ``DICOM/STxxxxxx/SExxxxxx/IMxxxxxx``: uppercase, 8 characters, 4 levels. The
  ``x`` are derived from the study, series and instance UIDs, so the same object always gets
  the same name on a stick (a retry after a pulled stick overwrites its own half-done files);
* a DICOMDIR (general-purpose profile), built with pydicom's :class:`FileSet`. An existing
  DICOMDIR is loaded and added to; objects it already lists are not written again.

Safety, in this order: free space is checked before anything is written (nothing is written
if it is short); each copy is checked before it is written (a well-formed Implicit VR LE
data set of the object, its pixel data the store's bytes, or for big endian and compressed
objects the same decoded values); files are written without an fsync each and made durable
a window at a time (``VERIFY_WINDOW``: one syncfs of the stick, or one fsync of a FAT
image), then every file is read back from the stick and compared byte for byte with what
was written; the DICOMDIR is written last (temp, fsync, rename), only once every file was
verified, so a set whose DICOMDIR does not list a file is recognisably incomplete; then
everything is synced and a block device unmounted before the report says "safe to remove".
A failed export reports which files it wrote, and whether they were flushed before the
failure. The store is only read.

Two threads share the work (:func:`_write`, :class:`_Writer`): the caller's prepares each
file (re-encodes it, completes its keys, checks it, adds its records) and writes it, while
a thread of the writer's flushes the window before, reads it back and verifies it; the
DICOMDIR is encoded while that thread verifies the last window. Files are read and assembled in buffers that
are reused (:class:`_Buffers`): a copy's buffer goes back once it was verified.

Targets (:mod:`appliance.media.usbtarget`): a mounted folder; a USB partition's block device (the
appliance checks in sysfs that it is a removable USB disk, mounts it and unmounts it); or a
FAT image file, written in userspace with mtools (for machines whose kernel has no vfat,
such as CI).

Selection (:class:`Selection`): explicit studies/series; else the export queue
(``appliance queue``); else ``[usb] policy``: ``since-last-export`` (default) writes the
studies whose last object arrived after the start of the last successful export made under
that policy or ``--all`` (explicit and queued exports do not move that mark, so they never
hide a study from the next default export; with no such export yet, every study);
``all``; or ``queue-only`` (nothing). The queue and the export history live in
``DATA_DIR/usb.sqlite``, not in the index, which is a rebuildable cache of the files.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import errno
import fcntl
import hashlib
import logging
import os
import queue
import struct
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from io import BytesIO
from pathlib import Path
from typing import Callable, Iterator, Sequence

from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.fileset import FileSet

from appliance import audit
from appliance.config import Config, ExportPolicy
from appliance.conformance import (
    TABLE_10,
    TABLE_11,
    TransferSyntax,
    syntaxes_for,
)
from appliance.dicom import dicomio
from appliance.dicom.transcode import Transcoded, TranscodeError, to_implicit_le
from appliance.errors import ApplianceError, MediaError
from appliance.media import dicomdir
from appliance.media.usbtarget import Medium, open_medium
from appliance.reports import Item, Progress, Report
from appliance.store.index import InstanceRow
from appliance.store.queue import ExportQueue, ExportRecord
from appliance.store.store import Store

log = logging.getLogger(__name__)

#: The folder on the stick that holds our files (the DICOMDIR is at the root).
TOP = "DICOM"
_USB_TABLES = TABLE_10 + TABLE_11
_FAT_DIR_BYTES = 4096  # what one new folder costs at most, besides its cluster
_DICOMDIR_RECORD_BYTES = 1024  # an upper bound per new instance, with its parent records
_MARGIN = 64 * 1024
#: Errors that mean the medium went away or failed under us (a pulled stick).
_PULLED = {errno.EIO, errno.ENOENT, errno.ENODEV, errno.ENXIO, errno.ESTALE, errno.EROFS, errno.ENOTDIR}
#: An upper bound of what the record keys completed in a copy add to it (dicomdir.Keys).
_COMPLETED_BYTES = 512
#: Files are flushed and read back a window of this many bytes at a time: the stick reads
#: one window back while the next is prepared and written (see _write).
VERIFY_WINDOW = 16 * 2**20
#: Buffers of files read from the store and of their copies kept for the next files
#: (_Buffers): about what is being written, and flushed and read back, at one time (a window each).
BUFFERED_BYTES = 2 * VERIFY_WINDOW + 4 * 2**20
_BUFFER_STEP = 64 * 1024
#: Whether each window of files is flushed, read back and verified in a thread of its own
#: while the next are prepared and written (else in between, in the caller's thread).
WRITER_THREAD = True
_SOP_INSTANCE_UID = 0x00080018


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# -- results ------------------------------------------------------------------------------


class ExportStatus(enum.StrEnum):
    """How an export ended."""

    DONE = "done"
    NOTHING = "nothing to export"
    FAILED = "failed"


class FileOutcome(enum.StrEnum):
    """What happened to one selected object."""

    WRITTEN = "written"
    ON_STICK = "already on the stick"
    SKIPPED = "skipped"
    FAILED = "failed"


@dataclass(frozen=True, kw_only=True)
class ExportedFile(Item[FileOutcome]):
    """One selected object and what happened to it (``file_id``: its name on the stick)."""

    study_uid: str
    file_id: str = ""

    def line(self) -> str:
        return f"{self.column}  {self.sop_instance_uid}: {self.reason or self.file_id}"


@dataclass(frozen=True, kw_only=True)
class ExportReport(Report[ExportedFile], outcomes=FileOutcome, failures=(FileOutcome.FAILED,)):
    """The result of :func:`export`; ``bytes_done`` were written. Lists the objects not simply written."""

    target: str
    status: ExportStatus
    selection: str
    started_at: str
    #: Why the export failed ("" unless FAILED).
    error: str = ""
    #: True once everything was synced (and a block device unmounted).
    safe_to_remove: bool = False

    @property
    def ok(self) -> bool:
        """True when the export finished and no selected object failed."""
        return self.status is not ExportStatus.FAILED and super().ok

    @property
    def studies(self) -> int:
        return len({f.study_uid for f in self.items if f.outcome in (FileOutcome.WRITTEN, FileOutcome.ON_STICK)})

    def summary(self) -> str:
        text = (
            f"USB export to {self.target} ({self.selection}): {self.status.value}; "
            f"{self.studies} studies, {self.counts(zeros=False) or 'no files'}; wrote {self.throughput()}"
        )
        if self.error:
            text += f". {self.error}"
        if self.safe_to_remove:
            text += ". The stick is safe to remove"
        return text

    def listed(self, item: ExportedFile) -> bool:
        return item.outcome is not FileOutcome.WRITTEN


# -- selection, queue and history -----------------------------------------------------------


class SelectionMode(enum.StrEnum):
    EXPLICIT = "explicit"
    QUEUE = "queue"
    ALL = "all"
    POLICY = "policy"


@dataclass(frozen=True)
class Selection:
    """What to export. ``Selection()`` means: the queue, else the configured policy."""

    mode: SelectionMode = SelectionMode.POLICY
    studies: tuple[str, ...] = ()
    series: tuple[str, ...] = ()

    @classmethod
    def explicit(cls, studies: tuple[str, ...] = (), series: tuple[str, ...] = ()) -> Selection:
        return cls(SelectionMode.EXPLICIT, tuple(studies), tuple(series))


def _resolve(store: Store, state: ExportQueue, cfg: Config, selection: Selection,
             planned_at: str) -> tuple[str, list[InstanceRow], list[str], bool]:
    """Return (description, instances, queue UIDs consumed, moves the mark)."""
    studies: list[str] = []
    series: list[str] = list(selection.series)
    consumed: list[str] = []
    mode = selection.mode
    queue = state.entries() if mode in (SelectionMode.POLICY, SelectionMode.QUEUE) else []
    if mode is SelectionMode.POLICY and queue:
        mode = SelectionMode.QUEUE
    if mode is SelectionMode.EXPLICIT:
        studies = list(selection.studies)
        for uid in studies + series:
            if store.level_of(uid) is None:
                raise MediaError(f"no stored study or series has UID {uid}; 'appliance ls' lists them")
        what = f"{len(studies)} selected studies, {len(series)} selected series"
    elif mode is SelectionMode.QUEUE:
        studies = [q.uid for q in queue if q.level == "study"]
        series = [q.uid for q in queue if q.level == "series"]
        consumed = [q.uid for q in queue]
        what = f"the export queue ({len(queue)} entries)"
    elif mode is SelectionMode.ALL or cfg.usb.policy is ExportPolicy.ALL:
        studies = store.study_uids()
        what = "all studies"
    elif cfg.usb.policy is ExportPolicy.QUEUE_ONLY:
        return "the export queue, which is empty (policy queue-only)", [], [], False
    else:
        mark = state.mark(ExportStatus.DONE)
        studies = store.study_uids(received_after=mark or "")
        what = f"studies received since the last export ({mark})" if mark else "all studies (no export yet)"
    moves_mark = mode is SelectionMode.ALL or (mode is SelectionMode.POLICY and cfg.usb.policy is not ExportPolicy.QUEUE_ONLY)
    for study in studies:
        series += store.series_in_study(study, uid_breaks_ties=False)
    rows: list[InstanceRow] = []
    seen: set[str] = set()
    for s in dict.fromkeys(series):
        for row in store.instances(s):
            if row.sop_instance_uid not in seen and row.received_at <= planned_at:
                seen.add(row.sop_instance_uid)
                rows.append(row)
    return what, rows, consumed, moves_mark


# -- the file-set ----------------------------------------------------------------------------------


def _component(prefix: str, uid: str, salt: int) -> str:
    digest = hashlib.sha256(f"{uid}#{salt}".encode() if salt else uid.encode()).digest()
    return prefix + base64.b32encode(digest).decode()[: 8 - len(prefix)]


class _Names:
    """File IDs ``DICOM/STxxxxxx/SExxxxxx/IMxxxxxx`` from UIDs; a clash with a name another
    UID holds in the DICOMDIR (or in this export) takes the next salted name."""

    def __init__(self, fs: FileSet) -> None:
        self.owner: dict[str, str] = {}
        #: (parent, UID) -> the name claimed: the first free or own one, which stays its own.
        self._claimed: dict[tuple[str, str], str] = {}
        for inst in fs:
            fid = inst.node.file_id_path(fs.root_path) if fs.path else None
            parts = list(fid.parts) if fid is not None else []
            if len(parts) == 4 and parts[0] == TOP:
                self.owner.setdefault("/".join(parts[:2]), str(inst.StudyInstanceUID or ""))
                self.owner.setdefault("/".join(parts[:3]), str(inst.SeriesInstanceUID or ""))
                self.owner.setdefault("/".join(parts), str(inst.SOPInstanceUID))

    def _claim(self, parent: str, prefix: str, uid: str) -> str:
        claimed = self._claimed.get((parent, uid))  # a study's and a series' for each of their objects
        if claimed is not None:
            return claimed
        for salt in range(1000):
            path = f"{parent}/{_component(prefix, uid, salt)}"
            if self.owner.setdefault(path, uid) == uid:
                self._claimed[(parent, uid)] = path
                return path
        raise MediaError(f"no free File ID for {uid}")  # unreachable in practice

    def file_id(self, row: InstanceRow) -> str:
        study = self._claim(TOP, "ST", row.study_uid)
        series = self._claim(study, "SE", row.series_uid)
        return self._claim(series, "IM", row.sop_instance_uid)


def _with_values(body: bytes, layout: dicomio.Layout, values: dict[str, str],
                 prefix: bytes = b"") -> list[bytes | memoryview]:
    """The parts of ``prefix`` followed by ``body`` (an Implicit VR LE data set, laid out as ``layout``) with
    the top-level text elements ``values`` (keyword: value, ASCII) replaced or inserted in tag
    order. Every other byte is kept, but the group length of a changed group, if the object has
    one, is recomputed. The runs of elements in between are copied once, as they are."""
    new: dict[int, bytes] = {}
    for keyword, text in values.items():
        tag = tag_for_keyword(keyword)
        if tag is None:
            raise ValueError(f"no DICOM keyword {keyword}")
        value = text.encode("ascii")
        value += b" " * (len(value) & 1)
        new[tag] = struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value
    groups = {tag >> 16 for tag in new}
    view = memoryview(body)
    parts: list[bytes | memoryview] = [prefix]
    start = 0  # of the run of unchanged elements not yet in parts
    pending = sorted(new)
    for tag, elem in layout.elements.items():
        group_length = tag & 0xFFFF == 0 and tag >> 16 in groups
        if not group_length and not (pending and pending[0] <= tag):
            continue
        parts.append(view[start:elem.offset])
        while pending and pending[0] < tag:
            parts.append(new[pending.pop(0)])
        if pending and pending[0] == tag:
            parts.append(new[pending.pop(0)])
        elif group_length:
            size = layout.group_size(tag >> 16) + sum(
                len(data) - (layout.elements[t].end - layout.elements[t].offset if t in layout.elements else 0)
                for t, data in new.items() if t >> 16 == tag >> 16)
            parts.append(struct.pack("<HHLL", tag >> 16, 0, 4, size))
        else:
            parts.append(view[elem.offset:elem.end])
        start = elem.end
    parts.append(view[start:])
    parts += [new[tag] for tag in pending]
    return parts


def _decoded_pixels(part10: bytes | memoryview) -> str | None:
    """Hash of the decoded pixel values of a Part 10 file (little endian), or None."""
    ds = dcmread(BytesIO(part10))
    if "PixelData" not in ds:
        return None
    arr = ds.pixel_array
    return hashlib.sha256(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()).hexdigest()


def _pixel_value(part10: bytes | memoryview) -> memoryview | None:
    """The value of the top-level Pixel Data of an uncompressed little endian Part 10 file, or None."""
    offset, ts = dicomio.split_part10(part10)
    body = memoryview(part10)[offset:]
    elem = dicomio.walk(body, TransferSyntax(ts).is_implicit_vr, True).elements.get(dicomio.PIXEL_DATA)
    return None if elem is None else body[elem.value_offset:elem.end]


@dataclass
class _Job:
    row: InstanceRow
    file_id: str
    estimate: int
    size: int = 0
    outcome: FileOutcome = FileOutcome.WRITTEN
    reason: str = ""
    #: The copy for the stick, a view of ``buffer`` (from _Buffers) until it was verified.
    part10: bytes | memoryview = b""
    buffer: bytearray | None = None
    #: A generated object's Part 10 bytes (not in the store), or None.
    generated: bytes | None = None

    def result(self) -> ExportedFile:
        return ExportedFile(outcome=self.outcome, reason=self.reason, size=self.size,
                            sop_instance_uid=self.row.sop_instance_uid, sop_class_uid=self.row.sop_class_uid,
                            study_uid=self.row.study_uid, file_id=self.file_id)


class _Failed(Exception):
    """The medium failed mid-way (internal)."""


class _Mismatch(Exception):
    """An object's copy is not what the store holds (internal: that object fails alone)."""


def _medium_error(exc: OSError) -> str:
    if exc.errno in _PULLED:
        return (f"the stick was removed or failed ({exc.strerror or exc}); nothing in the store changed. "
                "Insert it and export again to complete the set")
    if exc.errno == errno.ENOSPC:
        return "the stick is full; nothing in the store changed. Use a larger stick"
    return f"writing to the stick failed: {exc.strerror or exc}"


def _lock(data_dir: Path) -> int:
    fd = os.open(data_dir / "usb.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise MediaError("another USB export is running; wait for it to finish") from None
    return fd


def export(
    target: Path | Medium,
    store: Store,
    cfg: Config,
    selection: Selection | None = None,
    progress: Callable[[Progress], None] | None = None,
    extra: Sequence[Transcoded] = (),
) -> ExportReport:
    """Export ``selection`` (default: the queue, else ``cfg.usb.policy``) to ``target``.

    ``extra`` are generated objects (not in the store, e.g. RT Dose and RT Plan) written into
    the same file-set after the selection's objects, through the same checks.

    ``target`` is a mounted folder, a USB block device (checked to be a removable USB disk
    in sysfs, mounted and unmounted here), a FAT image file, or an open :class:`Medium`
    (which is then closed here too). One export runs at a time. ``progress`` is called
    after each file is written, from the thread that writes the files. Raises :class:`MediaError`, with nothing written, when the target cannot
    be used, another export runs, the selection names unknown UIDs or the stick has too
    little space. A failure while writing (a pulled stick, EIO) returns a FAILED report that
    lists what was written; the store never changes, and the next export completes the set.
    On success the queue entries exported are removed and the export is recorded.
    """
    selection = selection or Selection()
    started_at = _now()
    t0 = time.monotonic()
    lock = _lock(store.data_dir)
    state = ExportQueue(store.data_dir)
    medium: Medium | None = None
    busy = contextlib.ExitStack()
    try:
        what, rows, consumed, moves_mark = _resolve(store, state, cfg, selection, started_at)
        # While they are being written, no deletion takes these studies (appliance.store.marks.busy).
        busy.enter_context(store.busy(sorted({r.study_uid for r in rows})))
        generated = {t.sop_instance_uid: t.part10() for t in extra}
        rows += [_generated_row(data, started_at) for data in generated.values()]
        if extra:
            what += f", {len(extra)} generated objects"
        medium = target if not isinstance(target, Path) else open_medium(target)
        name = medium.label
        jobs, fs = _plan(medium, store, rows, generated)
        todo = [j for j in jobs if j.outcome is FileOutcome.WRITTEN]
        if not todo:
            note = medium.close()
            medium = None
            if note:
                log.info("%s", note)
            status = ExportStatus.NOTHING if not jobs else ExportStatus.DONE
            report = ExportReport(target=name, status=status, selection=what, started_at=started_at,
                                  items=tuple(j.result() for j in jobs), seconds=time.monotonic() - t0,
                                  safe_to_remove=True)
        else:
            _check_space(medium, fs, todo)
            report = _write(medium, store, fs, jobs, todo, what, started_at, t0, progress)
            medium = None  # _write closed it
        if report.status is not ExportStatus.FAILED:
            for uid in consumed:
                state.remove(uid)
        _record_delivery(store, report, started_at)
        _audit(store, report)
        state.record(ExportRecord(
            report.started_at, _now(), report.target, report.selection, report.status.value,
            report.count(FileOutcome.WRITTEN), report.bytes_done, moves_mark and report.ok))
    finally:
        if medium is not None:
            with contextlib.suppress(ApplianceError, OSError):
                medium.close()
        busy.close()
        state.close()
        os.close(lock)
    log.log(logging.INFO if report.ok else logging.WARNING, "%s", report.summary())
    return report


def _record_delivery(store: Store, report: ExportReport, started_at: str) -> None:
    """Record the studies every object of which is now on the stick, listed in its DICOMDIR
    (retention may delete them). A failed export wrote no DICOMDIR: what it wrote is not listed."""
    listed = {FileOutcome.ON_STICK} | ({FileOutcome.WRITTEN} if report.status is not ExportStatus.FAILED else set())
    on_stick = {i.sop_instance_uid for i in report.items if i.outcome in listed}
    store.record_delivery(on_stick, f"USB stick {report.target}", started_at)


def _audit(store: Store, report: ExportReport) -> None:
    """The export in the audit trail: to which stick, the studies and their objects written, the outcome."""
    written = [(i.study_uid, i.sop_instance_uid) for i in report.items if i.outcome is FileOutcome.WRITTEN]
    audit.record(store.data_dir, audit.Event(
        "export", "R", outcome=audit.SUCCESS if report.ok else audit.SERIOUS,
        outcome_text="" if report.ok else report.summary(),
        participants=(audit.Participant("destination", address=f"USB stick {report.target}"),),
        studies=audit.studies_of(written), detail=report.summary()))


def _generated_row(part10: bytes, at: str) -> InstanceRow:
    """An index-like row for a generated object, so it is named and listed like stored ones."""
    ds = dcmread(BytesIO(part10), stop_before_pixels=True,
                 specific_tags=["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
    return InstanceRow(str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.SeriesInstanceUID),
                       str(ds.StudyInstanceUID), "", TransferSyntax.IMPLICIT_LE, len(part10), at, None, "generated")


def _plan(medium: Medium, store: Store, rows: list[InstanceRow],
          generated: dict[str, bytes] | None = None) -> tuple[list[_Job], FileSet]:
    fs = dicomdir.load(medium.root)
    on_stick = {str(i.SOPInstanceUID) for i in fs}
    names = _Names(fs)
    jobs = []
    for row in rows:
        job = _Job(row, "", 0, generated=(generated or {}).get(row.sop_instance_uid) if not row.path else None)
        if not syntaxes_for(_USB_TABLES, row.sop_class_uid):
            job.outcome, job.reason = FileOutcome.SKIPPED, "this SOP class is not written to USB (Tables 10, 11)"
        elif row.sop_instance_uid in on_stick:
            job.outcome, job.reason = FileOutcome.ON_STICK, "listed in the stick's DICOMDIR"
        else:
            job.file_id = names.file_id(row)
            try:
                compressed = TransferSyntax(row.transfer_syntax).is_compressed
            except ValueError:
                compressed = True
            # Implicit VR is never longer than explicit; our file meta is at most ~256 bytes longer.
            job.estimate = row.size + 256 + _COMPLETED_BYTES
            if compressed:
                try:
                    job.estimate = len(to_implicit_le(store.data_dir / row.path).part10()) + _COMPLETED_BYTES
                except TranscodeError as exc:
                    job.outcome, job.reason = FileOutcome.FAILED, str(exc)
        jobs.append(job)
    return jobs, fs


def _check_space(medium: Medium, fs: FileSet, todo: list[_Job]) -> None:
    space = medium.space()
    c = space.cluster
    dirs = {str(Path(j.file_id).parent.parent) for j in todo} | {str(Path(j.file_id).parent) for j in todo} | {TOP}
    new_dirs = [d for d in dirs if not (medium.root / d).exists()]
    dicomdir = medium.root / "DICOMDIR"
    old = dicomdir.stat().st_size if dicomdir.exists() else 0
    need = sum(-(-j.estimate // c) * c for j in todo)
    need += len(new_dirs) * max(c, _FAT_DIR_BYTES)
    need += -(-(old + _DICOMDIR_RECORD_BYTES * len(todo)) // c) * c + _MARGIN
    if need > space.free:
        raise MediaError(
            f"the stick {medium.label} has {space.free / 1e6:.1f} MB free; this export needs "
            f"{need / 1e6:.1f} MB ({len(todo)} files). Nothing was written; use a larger stick or "
            "export fewer studies"
        )


def _write(medium: Medium, store: Store, fs: FileSet, jobs: list[_Job], todo: list[_Job], what: str,
           started_at: str, t0: float, progress: Callable[[Progress], None] | None) -> ExportReport:
    """Write every file, flush and read back each window of them, write the DICOMDIR, then
    close ``medium``; medium failures end in a FAILED report that says what was written.

    This thread prepares each file (_prepare: re-encode, complete its keys, check it against
    the store, add its records) and writes it (_Writer.put) while the _Writer's thread makes
    the window before durable and reads it back; the DICOMDIR is encoded while the last window is read back,
    and written only once the writer verified every file."""
    total = sum(j.estimate for j in todo)
    error = ""
    keys = dicomdir.Keys(fs)
    records = dicomdir.Records(fs)
    buffers = _Buffers(BUFFERED_BYTES)
    writer = _Writer(medium, total, t0, len(todo), progress, threaded=WRITER_THREAD, buffers=buffers, upcoming=todo)
    try:
        for job in todo:
            if writer.failed:
                break
            _prepare(job, store, records, keys, buffers)
            writer.put(job)
        writer.finish()
        # Encoded while the writer flushes and verifies the last window; written only if it verified all.
        prepared = any(job.outcome is FileOutcome.WRITTEN for job in todo)
        encoded = dicomdir.encode(fs) if prepared and not writer.failed else b""
        writer.join()
        if encoded and writer.written and not writer.failed:
            medium.check()
            medium.replace("DICOMDIR", encoded)
            if not _same(next(iter(medium.read_back(["DICOMDIR"]))), encoded):
                raise _Failed("the DICOMDIR read back from the stick differs from what was written")
    except OSError as exc:
        error = _medium_error(exc)
    except _Failed as exc:
        error = f"{exc}; the stick may be faulty. Nothing in the store changed"
    finally:
        writer.stop()
    error = error or writer.error
    written, flushed = writer.written, writer.flushed
    if error and flushed < len(written):
        with contextlib.suppress(OSError):  # what was written before the failure, if the stick still takes it
            medium.flush()
            flushed = len(written)
    try:
        note = medium.close()
        if note:
            log.info("%s", note)
    except (OSError, ApplianceError) as exc:
        error = error or f"the files were written, but the stick could not be released: {exc}"
    if error:
        done = {id(j) for j in written}
        for job in todo:
            if id(job) not in done and job.outcome is FileOutcome.WRITTEN:
                job.outcome, job.reason = FileOutcome.FAILED, "not written"
        for n, job in enumerate(written):
            job.reason = ("written, but not listed in the DICOMDIR yet" if n < flushed else
                          "written, but the stick failed before it was flushed (it may be incomplete); "
                          "not listed in the DICOMDIR")
    for job in todo:
        job.part10, job.buffer = b"", None
    status = ExportStatus.FAILED if error else ExportStatus.DONE
    return ExportReport(target=medium.label, status=status, selection=what, started_at=started_at,
                        items=tuple(j.result() for j in jobs), bytes_done=writer.done_bytes,
                        seconds=time.monotonic() - t0, error=error, safe_to_remove=not error)


class _Writer:
    """The medium's side of an export, in order: writes each file it is handed
    (Medium.write), makes each window of ``VERIFY_WINDOW`` bytes durable with one
    Medium.flush, has the stick read that window back (Medium.read_back) and compares each
    file read back, byte for byte, with what was written, while the next is written.

    Files are written in the caller's thread as they are handed over: a write is a few
    system calls, and a thread of its own would wait to take the GIL back after each
    (measured: 0.16 s of wall time for 0.045 s of CPU per 200 CT slices, under load). With
    ``threaded`` (``WRITER_THREAD``) a thread of its own flushes each window, which waits on
    the stick, not on Python, and reads it back and verifies it while the caller prepares
    and writes the next; else the caller does that too, at the end of each window.

    The first failure stops it: ``error`` says it in words, and nothing handed over after it
    is written. ``written[:flushed]`` are durable on the stick. ``progress`` is called after
    each file (from the caller's thread). :meth:`put` waits at the end of a window while the
    thread still flushes the one before, so that the caller never runs far ahead."""

    def __init__(self, medium: Medium, total: int, t0: float, files: int,
                 progress: Callable[[Progress], None] | None, threaded: bool = True,
                 buffers: _Buffers | None = None, upcoming: Sequence[_Job] = ()) -> None:
        self._medium = medium
        #: The files to be written, in order (their estimates), and how many of them were
        #: reserved on the medium (Medium.reserve): up to two windows ahead, at the end of
        #: each window, while nothing is being flushed.
        self._upcoming = [(j.file_id, j.estimate) for j in upcoming if j.outcome is FileOutcome.WRITTEN]
        self._reserved = 0
        self._reserved_bytes = 0
        self._handed_bytes = 0
        self._buffers = buffers
        self._total, self._t0, self._files, self._progress = total, t0, files, progress
        #: Windows written and handed to the thread: (files, how many were written by then).
        self._tasks: queue.SimpleQueue[tuple[list[_Job], int] | None] = queue.SimpleQueue()
        self._room = threading.Condition()
        self._queued = 0  # windows handed to the thread and not yet verified
        self._stopping = False
        self._seen = 0
        self._window: list[_Job] = []
        self._window_bytes = 0
        self.written: list[_Job] = []
        self.flushed = 0
        self.done_bytes = 0
        self.error = ""
        self._crash: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._guarded(self._reserve)
        if threaded:
            self._thread = threading.Thread(target=self._run, name="usb-export-verifier", daemon=True)
            self._thread.start()

    @property
    def failed(self) -> bool:
        return bool(self.error) or self._crash is not None

    def put(self, job: _Job) -> None:
        """Hand over a job: a prepared file (its bytes in ``job.part10``) is written, a failed
        one only counted in the progress."""
        self._guarded(self._handle, job)

    def finish(self) -> None:
        """No more jobs: flush and verify what is left, then end."""
        if self._thread is None:
            self._guarded(self._finish)
        else:
            self._hand_over()
            self._tasks.put(None)

    def join(self) -> None:
        """Wait until the writer ended; raise what it could not handle (e.g. from ``progress``)."""
        if self._thread is not None:
            self._thread.join()
        if self._crash is not None:
            raise self._crash

    def stop(self) -> None:
        """End now (the preparing thread failed): nothing more is flushed; wait for what is being flushed."""
        self._stopping = True
        if self._thread is not None:
            self._tasks.put(None)
            self._thread.join()

    def _run(self) -> None:
        def loop() -> None:
            while (task := self._tasks.get()) is not None and not self._stopping:
                self._flush_window(*task)
                with self._room:
                    self._queued -= 1
                    self._room.notify()
            if not self._stopping:
                self._finish()

        try:
            self._guarded(loop)
        finally:
            with self._room:  # a caller waiting for room goes on (and then stops)
                self._stopping = True
                self._room.notify_all()

    def _guarded(self, step: Callable[..., None], *args: _Job) -> None:
        """Run a step unless the writer failed; a failure ends it (``error``, or ``_crash``)."""
        if self.failed:
            return
        try:
            step(*args)
        except OSError as exc:
            self.error = _medium_error(exc)
        except _Failed as exc:
            self.error = f"{exc}; the stick may be faulty. Nothing in the store changed"
        except BaseException as exc:  # noqa: BLE001 - e.g. from progress: raised again in the preparing thread
            self._crash = exc

    def _reserve(self) -> None:
        """Reserve the next files on the medium, up to two windows ahead of those handed over."""
        first = self._reserved
        while self._reserved < len(self._upcoming) and self._reserved_bytes < self._handed_bytes + 2 * VERIFY_WINDOW:
            self._reserved_bytes += self._upcoming[self._reserved][1]
            self._reserved += 1
        if self._reserved > first:
            self._medium.reserve([file_id for file_id, _ in self._upcoming[first:self._reserved]])

    def _handle(self, job: _Job) -> None:
        self._seen += 1
        self._handed_bytes += job.estimate
        if job.outcome is FileOutcome.WRITTEN:
            self._medium.write(job.file_id, job.part10)
            job.size = len(job.part10)
            self.written.append(job)
            self._window.append(job)
            self._window_bytes += job.size
            self.done_bytes += job.size
        if self._progress is not None:
            self._progress(Progress(self._seen, self._files, self.done_bytes, time.monotonic() - self._t0,
                                    bytes_total=self._total))
        if self._window_bytes >= VERIFY_WINDOW:
            if self._thread is None:
                self._flush_window(self._window, len(self.written))
                self._window, self._window_bytes = [], 0
                self._reserve()
            else:
                self._hand_over()

    def _hand_over(self) -> None:
        """Hand the window written to the thread, once it is done with the one before."""
        if not self._window:
            return
        with self._room:
            self._room.wait_for(lambda: not self._queued or self._stopping)
            self._queued += 1
        self._reserve()  # while nothing is being flushed
        self._tasks.put((self._window, len(self.written)))
        self._window, self._window_bytes = [], 0

    def _flush_window(self, window: list[_Job], written: int) -> None:
        """Make ``window`` (and the ``written`` files up to it) durable, read it back and
        verify it: its buffers go back before the next window is written to its end."""
        medium = self._medium
        medium.check()
        medium.flush()
        self.flushed = max(self.flushed, written)
        _verify(window, medium.read_back([j.file_id for j in window]), self._buffers)

    def _finish(self) -> None:
        if self._window:  # the caller's own (not threaded)
            self._flush_window(self._window, len(self.written))
            self._window = []


def _same(data: bytes | memoryview, written: bytes | bytearray, size: int | None = None) -> bool:
    """True if ``data`` (read back) is ``written`` (or its first ``size`` bytes), byte for byte
    (startswith: a memcmp, also for a memoryview, which == would compare item by item)."""
    return len(data) == (len(written) if size is None else size) and written.startswith(data)


def _verify(jobs: list[_Job], read_back: Iterator[bytes | memoryview], buffers: _Buffers | None = None) -> None:
    """Compare each file read back from the stick with what was written, then let it go
    (its buffer back to ``buffers``)."""
    for job, data in zip(jobs, read_back, strict=True):
        written = job.buffer if job.buffer is not None else bytes(job.part10)
        if not _same(data, written, len(job.part10)):
            raise _Failed(f"{job.file_id} ({job.row.sop_instance_uid}) read back from the stick differs "
                          "from what was written")
        job.part10 = b""
        if job.buffer is not None and buffers is not None:
            buffers.give(job.buffer)
        job.buffer = None


class _Buffers:
    """Buffers handed out and back, so that a file does not take new memory: pages new to
    the process cost more than copying into them (the kernel zeroes each on its first
    touch). The preparing thread reads a stored object into one and gives it back at once,
    and assembles the copy for the stick in another, which the writer gives back once that
    copy was read back from the stick and verified. At most ``limit`` bytes are kept free."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    def take(self, size: int) -> bytearray:
        """A buffer of at least ``size`` bytes (a free one if one is large enough; a new one
        is rounded up to ``_BUFFER_STEP``, so that the next file, a few bytes longer, fits)."""
        with self._lock:
            for i, buffer in enumerate(self._free):
                if len(buffer) >= size:
                    return self._free.pop(i)
        return bytearray(-(-size // _BUFFER_STEP) * _BUFFER_STEP)

    def give(self, buffer: bytearray) -> None:
        """``buffer`` is no longer used (and no view of it)."""
        with self._lock:
            if sum(map(len, self._free)) + len(buffer) <= self._limit:
                self._free.append(buffer)

    def assemble(self, parts: Sequence[bytes | memoryview]) -> tuple[bytearray, memoryview]:
        """``parts`` copied one after another into a buffer, and a view of exactly them."""
        size = sum(map(len, parts))
        buffer = self.take(size)
        view = memoryview(buffer)
        pos = 0
        for part in parts:
            end = pos + len(part)
            view[pos:end] = part
            pos = end
        return buffer, view[:size]


def _read(path: Path, size: int, buffer: bytearray) -> memoryview:
    """The content of the file at ``path``, of ``size`` bytes as the index says (it may not):
    read into ``buffer`` (at least ``size`` + 1 bytes) in as few system calls as can be, each
    of which lets the writer thread run; a view of ``buffer``, unless the file is longer."""
    fd = os.open(path, os.O_RDONLY)
    try:
        view = memoryview(buffer)[:size + 1]  # one byte more: a longer file shows
        done = os.readv(fd, [view])
        if done == size:  # all of it: asked for one byte more, got what the index says
            return view[:done]
        while done < len(view) and (n := os.readv(fd, [view[done:]])):  # shorter or longer: to the end
            done += n
        if done <= size:
            return view[:done]
        parts = [bytes(view)]  # longer than the index says: to the end
        while chunk := os.read(fd, 2**20):
            parts.append(chunk)
        return memoryview(b"".join(parts))
    finally:
        os.close(fd)


def _prepare(job: _Job, store: Store, records: dicomdir.Records, keys: dicomdir.Keys,
             buffers: _Buffers | None = None) -> bool:
    """Re-encode one stored object, complete its record keys in the copy (dicomdir.Keys),
    check the copy against the store and add its records; False if it cannot be exported.
    The copy is assembled in a buffer of ``buffers`` (``job.buffer``)."""
    buffers = buffers or _Buffers(0)
    read_into: bytearray | None = None
    try:
        stored: bytes | memoryview
        if job.generated is not None:
            stored = job.generated
        else:
            read_into = buffers.take(job.row.size + 1)
            stored = _read(store.data_dir / job.row.path, job.row.size, read_into)
        t = to_implicit_le(stored)
        layout = dicomio.walk(t.body, True, True)
        header = dicomdir.header(t.body, layout.elements, t.sop_class_uid, t.sop_instance_uid)
        values = keys.complete(header, job.row.received_at)
        meta = dicomio.file_meta(t.sop_class_uid, t.sop_instance_uid, TransferSyntax.IMPLICIT_LE)
        if values:
            buffer, part10 = buffers.assemble(_with_values(t.body, layout, values, meta))
            layout = dicomio.walk(part10[len(meta):], True, True)
            log.debug("%s: %s set in the copy for its DICOMDIR records", job.row.sop_instance_uid, ", ".join(values))
        else:
            buffer, part10 = buffers.assemble((meta, t.body))
        _check_copy(buffer, part10, layout, stored, t.source_syntax, job)
        record = dicomdir.record_source(header, values)
        records.add(record, job.file_id)
        keys.listed(record)
        job.part10, job.buffer = part10, buffer
        return True
    except (OSError, TranscodeError) as exc:
        job.outcome, job.reason = FileOutcome.FAILED, f"cannot read it from the store: {exc}"
    except _Mismatch as exc:
        job.outcome, job.reason = FileOutcome.FAILED, f"its copy does not match the store: {exc}"
    except Exception as exc:  # noqa: BLE001 - a damaged stored object fails alone
        job.outcome, job.reason = FileOutcome.FAILED, f"cannot be written as a DICOM file-set member: {exc}"
    finally:
        if read_into is not None:
            buffers.give(read_into)
    return False


def _check_copy(whole: bytes | bytearray, part10: bytes | memoryview, layout: dicomio.Layout,
                stored: bytes | memoryview, source: TransferSyntax, job: _Job) -> None:
    """Raise _Mismatch unless ``part10`` (its data set laid out as ``layout``; the start of
    ``whole``, which may go on) is an Implicit
    VR LE file of the object whose pixel data are the store's: the same bytes, or for an
    object stored big endian or compressed the same decoded values. (What is read back from
    the stick is then compared with these bytes.)"""
    offset, ts = dicomio.split_part10(part10)
    uid = layout.elements.get(_SOP_INSTANCE_UID)
    if ts != TransferSyntax.IMPLICIT_LE or uid is None or (whole[offset + uid.value_offset:offset + uid.end]
                                                           .rstrip(b"\0 ").decode("ascii", "replace")
                                                           != job.row.sop_instance_uid):
        raise _Mismatch("it is not the object, in Implicit VR Little Endian")
    if source is TransferSyntax.EXPLICIT_BE or source.is_compressed:
        same = _decoded_pixels(part10) == _decoded_pixels(stored)
    else:  # compared in place (bytes.startswith: a memcmp), not copied out first
        pixels = layout.elements.get(dicomio.PIXEL_DATA)
        stored_pixels = _pixel_value(stored)
        same = (pixels is None and stored_pixels is None) or (
            pixels is not None and stored_pixels is not None
            and pixels.end - pixels.value_offset == len(stored_pixels)
            and whole.startswith(stored_pixels, offset + pixels.value_offset))
    if not same:
        raise _Mismatch("its pixel data differ")
