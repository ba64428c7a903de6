"""CD import (section 4.4, Table 9): store every DICOM Part 10 object found on a disc.

The source is an ISO 9660 image file, an optical drive (``/dev/sr0``) or an already mounted
folder. Images and drives are read in userspace with pycdlib: no mount, no iso9660 kernel
driver and nothing written. Every file is read (Rock Ridge names first, then Joliet, then
ISO 9660); a file is a DICOM object if it has ``DICM`` at byte 128. The DICOMDIR is ignored.

Objects that Table 9 lists go through :class:`appliance.store.ingest.Ingest`, the same door and
validation as a network C-STORE. JPEG Lossless objects are decoded with pydicom and pylibjpeg
and stored as Explicit VR Little Endian, with the same pixel values. Everything else is
skipped with its reason. One bad file (a read error, a corrupt data set) is reported, and the
import goes on with the others. pycdlib objects stay inside :class:`IsoDisc`.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import fcntl
import io
import logging
import os
import re
import stat
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import IO, BinaryIO, Protocol, cast

import pycdlib
import pydicom
from pycdlib.pycdlibexception import PyCdlibException
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID, MediaStorageDirectoryStorage

from appliance import audit
from appliance.conformance import (
    TABLE_9,
    TRANSFER_SYNTAX_NAMES,
    TransferSyntax,
    syntaxes_for,
)
from appliance.dicom import dicomio
from appliance.errors import MediaError
from appliance.reports import Item, Progress, Report, sop_class_label
from appliance.store.ingest import Ingest, Outcome, Source

log = logging.getLogger(__name__)

#: Objects larger than this are not read into memory (a CD holds 700 MB).
DEFAULT_MAX_OBJECT_MB = 1024
#: ioctl request that opens the tray of a Linux CD-ROM drive (linux/cdrom.h).
_CDROMEJECT = 0x5309
_PREAMBLE = 132
_CHUNK = 1 << 20
_VERSION_SUFFIX = re.compile(r";[0-9]*$")


class DiscKind(enum.StrEnum):
    """How a :class:`Disc` is reached: an ISO image file, an optical drive or a folder.

    (Not :class:`appliance.adapters.devices.MediumKind`, which tells a CD from a USB stick.)"""

    IMAGE = "ISO image"
    DRIVE = "optical drive"
    FOLDER = "folder"


class ImportOutcome(enum.StrEnum):
    """The one outcome each file on a disc gets."""

    IMPORTED = "imported"
    ALREADY_STORED = "already stored"
    REFUSED = "refused"
    SKIPPED = "skipped"
    UNREADABLE = "unreadable"


@dataclass(frozen=True)
class DiscFile:
    """One entry on a medium: ``path`` as people see it, ``key`` as the medium names it.

    ``skip`` says why the entry is not read (a symbolic link, a device node), ``error`` why
    it cannot be (an unreadable folder)."""

    path: str
    size: int
    key: str
    skip: str | None = None
    error: str | None = None


@dataclass(frozen=True, kw_only=True)
class FileResult(Item[ImportOutcome]):
    """What happened to one file (``path`` as people see it on the disc)."""

    path: str
    transfer_syntax: str = ""

    def line(self) -> str:
        what = f" {_class_name(self.sop_class_uid)}" if self.sop_class_uid else ""
        return f"{self.column}  {self.path}{what}: {self.reason}"


@dataclass(frozen=True, kw_only=True)
class ImportReport(Report[FileResult], outcomes=ImportOutcome,
                   failures=(ImportOutcome.REFUSED, ImportOutcome.UNREADABLE)):
    """The per-disc report: one :class:`FileResult` per file, in disc order; ``bytes_done`` were read."""

    source: str
    kind: DiscKind
    label: str
    started_at: str
    #: What happened to the tray ("" when nothing was to be done).
    eject: str = ""

    @property
    def partial(self) -> bool:
        """True when some objects were stored (or already were) and others failed."""
        good = self.count(ImportOutcome.IMPORTED) + self.count(ImportOutcome.ALREADY_STORED)
        return not self.ok and good > 0

    def summary(self) -> str:
        text = (f"{self.kind.value} '{self.label}' ({self.source}): {len(self.items)} files: {self.counts()}; "
                f"read {self.throughput()}")
        if not self.count(ImportOutcome.IMPORTED):
            text += "; nothing new was stored"
        return text

    def notes(self) -> Iterator[str]:
        if self.eject:
            yield self.eject


# -- media -----------------------------------------------------------------------------


class Disc(Protocol):
    """A readable medium: its files, and a way to read one."""

    kind: DiscKind
    label: str

    def files(self) -> list[DiscFile]: ...

    def open(self, f: DiscFile) -> IO[bytes]: ...

    def close(self) -> None: ...


class IsoDisc:
    """An ISO 9660 file system read with pycdlib from an image file, a drive or any file object."""

    def __init__(self, fp: IO[bytes], name: str, kind: DiscKind, *, owns_fp: bool = True) -> None:
        """Parse the volume in ``fp``; raise MediaError if it is not ISO 9660 or cannot be read."""
        self.kind = kind
        self._fp = fp
        self._owns_fp = owns_fp
        self._iso = pycdlib.PyCdlib()
        try:
            self._iso.open_fp(cast(BinaryIO, fp))
        except PyCdlibException as exc:
            self._close_fp()
            raise MediaError(
                f"{name} does not hold an ISO 9660 file system ({exc}); only ISO 9660 CDs can be imported"
            ) from None
        except OSError as exc:
            self._close_fp()
            raise MediaError(f"cannot read the file system of {name}: {_read_error(exc)}") from None
        # Rock Ridge keeps POSIX names and symbolic links; Joliet keeps long names.
        if self._iso.has_rock_ridge():
            self._namespace = "rr_path"
        elif self._iso.has_joliet():
            self._namespace = "joliet_path"
        else:
            self._namespace = "iso_path"
        label = self._iso.pvd.volume_identifier.decode("ascii", "replace").strip(" \x00")
        self.label = label or name
        # pycdlib silently shortens files that run past the end of a cut-short image or disc;
        # compare the readable size with the size the volume descriptor declares.
        self._block = self._iso.logical_block_size
        declared = self._iso.pvd.space_size * self._block
        try:
            readable = fp.seek(0, os.SEEK_END)
        except OSError:
            readable = declared
        self._readable = readable if readable < declared else None

    @classmethod
    def open_path(cls, path: Path, kind: DiscKind) -> IsoDisc:
        """Open an image file or a drive read-only."""
        try:
            fp = open(path, "rb")  # noqa: SIM115 - closed by close()
        except OSError as exc:
            raise MediaError(_open_error(path, exc)) from None
        return cls(fp, str(path), kind)

    def files(self) -> list[DiscFile]:
        out: list[DiscFile] = []
        for dirpath, _dirs, names in self._iso.walk(**{self._namespace: "/"}):
            for name in sorted(names):
                key = dirpath.rstrip("/") + "/" + name
                rec = self._iso.get_record(**{self._namespace: key})
                shown = self._display(key)
                if rec.is_symlink():
                    out.append(DiscFile(shown, 0, key, skip="symbolic link; not followed"))
                elif self._readable is not None and (
                    rec.extent_location() * self._block + rec.get_data_length() >= self._readable
                ):
                    out.append(DiscFile(shown, rec.get_data_length(), key, error=(
                        f"the file runs past the last readable byte of the disc ({self._readable}); "
                        "the image or disc is cut short or damaged")))
                else:
                    out.append(DiscFile(shown, rec.get_data_length(), key))
        return out

    def _display(self, key: str) -> str:
        if self._namespace != "iso_path":
            return key
        # ISO 9660 names carry a version (";1") and a dot when they have no extension.
        return "/".join(_VERSION_SUFFIX.sub("", part).rstrip(".") if part else part for part in key.split("/"))

    def open(self, f: DiscFile) -> IO[bytes]:
        return cast(IO[bytes], self._iso.open_file_from_iso(**{self._namespace: f.key}))

    def _close_fp(self) -> None:
        if self._owns_fp:
            self._fp.close()

    def close(self) -> None:
        try:
            self._iso.close()
        except PyCdlibException:
            pass
        self._close_fp()


class FolderDisc:
    """A disc the system has already mounted (or any folder); symbolic links are not followed."""

    kind = DiscKind.FOLDER

    def __init__(self, root: Path) -> None:
        self.root = root
        self.label = str(root)

    def files(self) -> list[DiscFile]:
        out: list[DiscFile] = []
        seen: set[tuple[int, int]] = set()
        stack = [self.root]
        while stack:
            folder = stack.pop()
            rel = folder.relative_to(self.root).as_posix()
            shown = "/" if rel == "." else "/" + rel
            try:
                st = folder.stat()
                if (st.st_dev, st.st_ino) in seen:
                    out.append(DiscFile(shown, 0, str(folder), skip="folder already read (a loop)"))
                    continue
                seen.add((st.st_dev, st.st_ino))
                with os.scandir(folder) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                out.append(DiscFile(shown, 0, str(folder), error=f"the folder cannot be read: {_read_error(exc)}"))
                continue
            subfolders = []
            for e in entries:
                path = "/" + Path(e.path).relative_to(self.root).as_posix()
                try:
                    if e.is_symlink():
                        out.append(DiscFile(path, 0, e.path, skip="symbolic link; not followed"))
                    elif e.is_dir(follow_symlinks=False):
                        subfolders.append(Path(e.path))
                    elif e.is_file(follow_symlinks=False):
                        out.append(DiscFile(path, e.stat(follow_symlinks=False).st_size, e.path))
                    else:
                        out.append(DiscFile(path, 0, e.path, skip="not a regular file (device, pipe or socket)"))
                except OSError as exc:
                    out.append(DiscFile(path, 0, e.path, error=f"cannot be read: {_read_error(exc)}"))
            stack.extend(reversed(subfolders))
        return out

    def open(self, f: DiscFile) -> IO[bytes]:
        return open(f.key, "rb")

    def close(self) -> None:
        pass


def open_disc(source: Path) -> Disc:
    """Open ``source`` (an ISO image, an optical drive or a folder) for reading; raise MediaError."""
    try:
        mode = source.stat().st_mode
    except OSError as exc:
        raise MediaError(_open_error(source, exc)) from None
    if stat.S_ISDIR(mode):
        return FolderDisc(source)
    if stat.S_ISBLK(mode):
        return IsoDisc.open_path(source, DiscKind.DRIVE)
    if stat.S_ISREG(mode):
        return IsoDisc.open_path(source, DiscKind.IMAGE)
    raise MediaError(f"{source} is neither an ISO image file, an optical drive nor a folder")


def eject(device: Path) -> None:
    """Open the tray of the optical drive ``device``; raise MediaError if it cannot."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_NONBLOCK)
        try:
            fcntl.ioctl(fd, _CDROMEJECT)
        finally:
            os.close(fd)
    except OSError as exc:
        raise MediaError(f"cannot eject the disc in {device}: {exc.strerror}") from None


# -- import ------------------------------------------------------------------------------


class _Done(Exception):
    """A file's outcome is known before it reaches ingest (internal)."""

    def __init__(self, result: ImportOutcome, reason: str) -> None:
        super().__init__(reason)
        self.result = result
        self.reason = reason


class _Importer:
    def __init__(self, disc: Disc, ingest: Ingest, max_object_bytes: int) -> None:
        self.disc = disc
        self.ingest = ingest
        self.max_object_bytes = max_object_bytes
        self.source = Source(calling_ae=None, origin=f"cd:{disc.label}")
        self.bytes_read = 0

    def one(self, f: DiscFile) -> FileResult:
        meta: dict[str, str | None] = {}
        try:
            return self._one(f, meta)
        except _Done as done:
            return FileResult(path=f.path, size=f.size, outcome=done.result, reason=done.reason,
                              sop_class_uid=meta.get("class") or "", sop_instance_uid=meta.get("instance") or "",
                              transfer_syntax=meta.get("ts") or "")

    def _one(self, f: DiscFile, meta: dict[str, str | None]) -> FileResult:
        if f.error:
            raise _Done(ImportOutcome.UNREADABLE, f.error)
        if f.skip:
            raise _Done(ImportOutcome.SKIPPED, f.skip)
        if _is_dicomdir(f.path):
            raise _Done(ImportOutcome.SKIPPED, "DICOMDIR (the disc's index): ignored; every file is read instead")
        if f.size == 0:
            raise _Done(ImportOutcome.SKIPPED, "empty file")
        if f.size < _PREAMBLE:
            raise _Done(ImportOutcome.SKIPPED, "not a DICOM file: too short for a DICOM preamble")
        data = self._read(f)
        try:
            offset, ts = dicomio.split_part10(data)
        except dicomio.EncodingError as exc:
            raise _Done(ImportOutcome.REFUSED, f"the DICOM file meta header is damaged: {exc}") from None
        meta["ts"] = ts
        sop_class, meta["instance"] = _classify(data, offset)
        meta["class"] = sop_class
        if sop_class == MediaStorageDirectoryStorage:
            raise _Done(ImportOutcome.SKIPPED, "a DICOMDIR (the disc's index): ignored")
        allowed = syntaxes_for(TABLE_9, sop_class)
        if not allowed:
            raise _Done(ImportOutcome.SKIPPED, "this SOP class is not read from CD (not in Table 9)")
        if ts not in allowed:
            raise _Done(ImportOutcome.SKIPPED, f"transfer syntax {_ts_name(ts)} is not read from CD for this class "
                        "(not in Table 9)")
        body: bytes | memoryview = memoryview(data)[offset:]
        note = ""
        if TransferSyntax(ts).is_compressed:
            try:
                body, ts = _decompress(data), TransferSyntax.EXPLICIT_LE
            except Exception as exc:  # noqa: BLE001 - any decoder failure is this file's problem
                raise _Done(ImportOutcome.REFUSED, f"the JPEG Lossless pixel data does not decode: {exc}") from None
            note = f" (decoded from {_ts_name(meta['ts'] or '')}, stored as {_ts_name(ts)})"
        outcome = self.ingest.accept(body, ts, sop_class_uid=sop_class, sop_instance_uid=None, source=self.source)
        return self._result(f, outcome, sop_class, meta, note)

    @staticmethod
    def _result(f: DiscFile, outcome: Outcome, sop_class: str, meta: dict[str, str | None], note: str) -> FileResult:
        if not outcome.ok:
            result = ImportOutcome.REFUSED
        elif outcome.already_stored:
            result = ImportOutcome.ALREADY_STORED
        else:
            result = ImportOutcome.IMPORTED
        return FileResult(path=f.path, size=f.size, outcome=result, reason=outcome.comment + note,
                          sop_class_uid=sop_class,
                          sop_instance_uid=outcome.sop_instance_uid or meta.get("instance") or "",
                          transfer_syntax=meta.get("ts") or "")

    def _read(self, f: DiscFile) -> bytes:
        try:
            with self.disc.open(f) as fp:
                head = self._read_exactly(fp, _PREAMBLE, f, 0)
                if head[128:132] != b"DICM":
                    raise _Done(ImportOutcome.SKIPPED, "not a DICOM Part 10 file (no 'DICM' at byte 128)")
                if f.size > self.max_object_bytes:
                    raise _Done(ImportOutcome.REFUSED, f"the object is {f.size / 2**20:.0f} MB; objects above "
                                f"{self.max_object_bytes / 2**20:.0f} MB are not imported")
                return head + self._read_exactly(fp, f.size - _PREAMBLE, f, _PREAMBLE)
        except OSError as exc:
            raise _Done(ImportOutcome.UNREADABLE, f"read error: {_read_error(exc)}") from None
        except PyCdlibException as exc:
            raise _Done(ImportOutcome.UNREADABLE, f"the disc's directory entry is damaged: {exc}") from None

    def _read_exactly(self, fp: IO[bytes], n: int, f: DiscFile, start: int) -> bytes:
        parts = []
        left = n
        while left:
            chunk = fp.read(min(left, _CHUNK))
            if not chunk:
                raise _Done(ImportOutcome.UNREADABLE, f"the file ends after {start + n - left} of its {f.size} bytes; "
                            "the disc may be damaged")
            self.bytes_read += len(chunk)
            parts.append(chunk)
            left -= len(chunk)
        return b"".join(parts)


def import_disc(
    disc: Disc,
    ingest: Ingest,
    *,
    source: str | None = None,
    progress: Callable[[Progress], None] | None = None,
    max_object_bytes: int = DEFAULT_MAX_OBJECT_MB * 2**20,
) -> ImportReport:
    """Offer every DICOM object on ``disc`` to ``ingest``; return the report (files are stored)."""
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.monotonic()
    try:
        files = disc.files()
    except (OSError, PyCdlibException) as exc:
        raise MediaError(f"cannot list the files on {source or disc.label}: {exc}") from None
    log.info("importing %d files from %s '%s'", len(files), disc.kind.value, disc.label)
    worker = _Importer(disc, ingest, max_object_bytes)
    results = []
    for i, f in enumerate(files, 1):
        try:
            r = worker.one(f)
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the import
            log.exception("unexpected error importing %s", f.path)
            r = FileResult(path=f.path, size=f.size, outcome=ImportOutcome.REFUSED,
                           reason=f"unexpected error ({exc!r}); see the journal")
        if r.outcome in (ImportOutcome.SKIPPED, ImportOutcome.UNREADABLE):
            log.log(logging.WARNING if r.outcome is ImportOutcome.UNREADABLE else logging.INFO,
                    "%s %s: %s", r.outcome.value, f.path, r.reason)
        results.append(r)
        if progress is not None:
            progress(Progress(i, len(files), worker.bytes_read, time.monotonic() - t0, item=r))
    return ImportReport(source=source or disc.label, kind=disc.kind, label=disc.label, started_at=started_at,
                        items=tuple(results), bytes_done=worker.bytes_read, seconds=time.monotonic() - t0)


def run_import(
    source: Path,
    ingest: Ingest,
    *,
    eject_after: bool = True,
    progress: Callable[[Progress], None] | None = None,
    max_object_bytes: int = DEFAULT_MAX_OBJECT_MB * 2**20,
) -> ImportReport:
    """Import ``source`` (ISO image, optical drive or folder), then eject a drive's disc if asked.

    Logs the summary; raises MediaError when the medium cannot be opened at all."""
    disc = open_disc(source)
    try:
        report = import_disc(disc, ingest, source=str(source), progress=progress,
                             max_object_bytes=max_object_bytes)
    finally:
        disc.close()
    if disc.kind is DiscKind.DRIVE and eject_after:
        try:
            eject(source)
            note = f"ejected the disc in {source}"
        except MediaError as exc:
            log.warning("%s", exc)
            note = str(exc)
        report = dataclasses.replace(report, eject=note)
    log.log(logging.INFO if report.ok else logging.WARNING, "import done: %s", report.summary())
    _audit(ingest, report)
    return report


def _audit(ingest: Ingest, report: ImportReport) -> None:
    """The import in the audit trail: from which disc, which studies with how many new objects each."""
    imported = [i.sop_instance_uid for i in report.items if i.outcome is ImportOutcome.IMPORTED and i.sop_instance_uid]
    pairs = [(r.study_uid, r.sop_instance_uid) for uid in imported if (r := ingest.store.instance(uid)) is not None]
    failed = report.count(ImportOutcome.REFUSED) + report.count(ImportOutcome.UNREADABLE)
    audit.record(ingest.store.data_dir, audit.Event(
        "import", "C", outcome=audit.SUCCESS if report.ok else audit.MINOR if pairs else audit.SERIOUS,
        outcome_text="" if report.ok else f"{failed} file(s) refused or unreadable",
        participants=(audit.Participant("source", address=f"{report.kind.value} '{report.label}' ({report.source})",
                                        requestor=True),),
        studies=audit.studies_of(pairs), detail=report.summary()))


def keep_report(report: ImportReport, folder: Path) -> Path:
    """Write ``report`` as text under ``folder`` (temp file, fsync, rename); return its path."""
    stamp = report.started_at.replace(":", "").replace("-", "").replace("+0000", "Z")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", report.label).strip("_.")[:40] or "disc"
    path = folder / f"{stamp}-{name}.txt"
    tmp = folder / f".{path.name}.part"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as out:
            out.write(report.render() + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise MediaError(f"the import finished, but its report cannot be kept in {folder}: {exc.strerror}") from None
    return path


# -- helpers -------------------------------------------------------------------------------


def _classify(data: bytes, offset: int) -> tuple[str, str | None]:
    """Return (SOP class, SOP instance) from the file meta header, or the data set if absent."""
    try:
        meta = pydicom.dcmread(io.BytesIO(data[:offset])).file_meta
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for damaged headers
        raise _Done(ImportOutcome.REFUSED, f"the DICOM file meta header is damaged: {exc}") from None
    sop_class = str(meta.get("MediaStorageSOPClassUID", "") or "")
    instance = str(meta.get("MediaStorageSOPInstanceUID", "") or "") or None
    if not sop_class:
        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=["SOPClassUID"])
            sop_class = str(ds.get("SOPClassUID", "") or "")
        except Exception:  # noqa: BLE001
            sop_class = ""
    if not sop_class:
        raise _Done(ImportOutcome.REFUSED, "neither the file meta header nor the data set names a SOP class")
    return sop_class, instance


def _decompress(data: bytes) -> bytes:
    """Decode a JPEG Lossless object with pylibjpeg; return its data set as Explicit VR LE bytes."""
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.decompress(as_rgb=False, generate_instance_uid=False, decoding_plugin="pylibjpeg")
    out = DicomBytesIO()
    out.is_little_endian = True
    out.is_implicit_VR = False
    write_dataset(out, ds)
    return out.getvalue()


def _is_dicomdir(path: str) -> bool:
    return _VERSION_SUFFIX.sub("", path.rsplit("/", 1)[-1]).rstrip(".").upper() == "DICOMDIR"


def _class_name(uid: str) -> str:
    """Our label for the SOP class, else pydicom's name for it, else ``SOP class <uid>``."""
    name = UID(uid).name
    return sop_class_label(uid, name if name != uid else f"SOP class {uid}")


def _ts_name(uid: str) -> str:
    return TRANSFER_SYNTAX_NAMES.get(uid) or UID(uid).name


def _read_error(exc: OSError) -> str:
    if exc.errno == errno.EIO:
        return "input/output error (an unreadable sector: the disc is scratched or damaged)"
    return exc.strerror or str(exc)


def _open_error(path: Path, exc: OSError) -> str:
    if exc.errno == errno.ENOMEDIUM:
        return f"there is no disc in {path}"
    if exc.errno == errno.ENOENT:
        return f"{path} does not exist; give an ISO image file, an optical drive such as /dev/sr0, or a folder"
    if exc.errno == errno.EACCES:
        return f"permission denied reading {path}; run as root or as a member of the 'cdrom' group"
    return f"cannot read {path}: {_read_error(exc)}"
