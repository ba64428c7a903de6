"""The one door into the store.

Whatever way an object arrives (a network C-STORE, a CD), it passes the same validation
(appendix A, Table 12 and notes 1-2; section 7) and the same atomic write and index. Each
refusal carries a DIMSE status and a comment a person understands, and is logged with the
SOP Instance UID and where the object came from.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from appliance.dicom import attributes, dicomio
from appliance.config import StoreConfig
from appliance.conformance import (
    ACCEPTED_MODALITIES,
    DEFAULT_CHARACTER_SET,
    DEFAULT_MAX_ASSOCIATIONS,
    DYNAMIC_PET_SERIES_TYPE,
    IMAGE_OBJECTS,
    UNCOMPRESSED,
    SOPClass,
    Status,
    TransferSyntax,
    allowed_character_sets,
)
from appliance.errors import StoreDiskError, StoreError, StoreFullError
from appliance.store.disk import remove_temp, store_error
from appliance.store.store import DuplicateConflict, Store, StoredObject

log = logging.getLogger(__name__)

#: How far into a network data set its Pixel Data is looked for while it arrives (see
#: IncomingObject._look_ahead): an image's other attributes take a few kB.
HEAD_LIMIT = 1 << 20
#: How many empty temp files the SCP keeps made ahead (see Store.make_spare_temp): one for
#: each association it serves at most.
SPARE_TEMPS = DEFAULT_MAX_ASSOCIATIONS


@dataclass(frozen=True)
class Source:
    """Where an object came from: the calling AE title, or a medium."""

    calling_ae: str | None
    origin: str = "network"

    def __str__(self) -> str:
        return f"calling AE '{self.calling_ae}'" if self.calling_ae else self.origin


@dataclass(frozen=True)
class Outcome:
    """The result of offering one object to the store."""

    status: Status
    comment: str
    sop_instance_uid: str | None = None
    series_uid: str | None = None
    path: Path | None = None
    #: True when identical content was already stored and nothing changed.
    already_stored: bool = False

    @property
    def ok(self) -> bool:
        return self.status.is_success


class Refused(Exception):
    """Validation refused an object (internal to this module)."""

    def __init__(self, status: Status, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


class Ingest:
    """Validates and stores objects into ``store`` under the ``[store]`` rules."""

    def __init__(self, store: Store, rules: StoreConfig,
                 make_room: Callable[[int], bool] | None = None) -> None:
        self.store = store
        self.rules = rules
        #: Called before an object is refused for space (retention): True if it freed some.
        self.make_room = make_room

    def space_status(self, expected_bytes: int = 0) -> Outcome | None:
        """Return an Out of Resources outcome if the store is below its free-space watermark
        (after retention, if it is on, had its chance to make room)."""
        min_free = self.rules.min_free_mb * 2**20
        try:
            self.store.check_space(expected_bytes, min_free)
        except StoreFullError as exc:
            if self.make_room is not None and self.make_room(expected_bytes):
                try:
                    self.store.check_space(expected_bytes, min_free)
                except StoreFullError as again:
                    return Outcome(Status.OUT_OF_RESOURCES, str(again))
                return None
            return Outcome(Status.OUT_OF_RESOURCES, str(exc))
        return None

    def accept(
        self,
        body: bytes | memoryview,
        transfer_syntax: str,
        *,
        sop_class_uid: str,
        sop_instance_uid: str | None,
        source: Source,
    ) -> Outcome:
        """Validate the encoded data set ``body`` and store it; never raises for bad input.

        ``sop_class_uid`` is what the transport says (the presentation context, or a file's
        meta header); ``sop_instance_uid`` is the command's Affected SOP Instance UID (None
        for media)."""

        def write(attrs: attributes.Attributes, flags: str | None) -> StoredObject:
            meta = dicomio.file_meta(sop_class_uid, attrs["sop_instance_uid"], transfer_syntax,
                                     source.calling_ae)
            return self.store.put(meta, body, attrs, transfer_syntax, calling_ae=source.calling_ae,
                                  origin=source.origin, flags=flags, policy=self.rules.duplicate_policy)

        full = self.space_status(len(body))
        if full is not None:
            return self._refused(Refused(full.status, full.comment), sop_instance_uid, source)
        return self._accept(body, transfer_syntax, sop_class_uid, sop_instance_uid, source, write)

    def open_stream(
        self, transfer_syntax: str, sop_class_uid: str, sop_instance_uid: str, calling_ae: str
    ) -> "IncomingObject":
        """Start receiving a network C-STORE data set straight into a temp file.

        The free-space watermark is checked now, before any of the data set is stored: below
        it, the data set is read and dropped and the answer is Out of Resources."""
        return IncomingObject(self, transfer_syntax, sop_class_uid, sop_instance_uid, Source(calling_ae))

    def _accept(
        self,
        body: bytes | memoryview,
        transfer_syntax: str,
        sop_class_uid: str,
        sop_instance_uid: str | None,
        source: Source,
        write: Callable[[attributes.Attributes, str | None], StoredObject],
        decode: Callable[[bytes | memoryview, str], tuple[dicomio.Layout, attributes.Attributes]] | None = None,
    ) -> Outcome:
        uid = sop_instance_uid
        try:
            layout, attrs = (decode or self._decode)(body, transfer_syntax)
            uid = attrs["sop_instance_uid"] or uid
            flags = self._validate(body, layout, attrs, transfer_syntax, sop_class_uid, sop_instance_uid)
            try:
                stored = write(attrs, flags)
            except DuplicateConflict as exc:
                raise Refused(Status.REFUSED_DUPLICATE, str(exc)) from None
            except StoreFullError as exc:
                raise Refused(Status.OUT_OF_RESOURCES, str(exc)) from None
        except Refused as r:
            return self._refused(r, uid, source)
        except StoreDiskError as exc:
            # Not the object's fault: Out of Resources tells the sender to try again later.
            log.error("could not store SOP Instance %s from %s: %s", uid, source, exc)
            return Outcome(Status.OUT_OF_RESOURCES, str(exc), uid)
        except StoreError as exc:
            log.error("could not store SOP Instance %s from %s: %s", uid, source, exc)
            return Outcome(Status.PROCESSING_FAILURE, str(exc), uid)
        if stored.already_stored:
            comment = "identical object already stored; nothing changed"
            log.info("SOP Instance %s from %s: %s", uid, source, comment)
        else:
            comment = "stored"
            if stored.superseded:
                comment = f"stored; the previous, different version was kept as {stored.superseded.name}"
            if flags:
                comment += f" (flagged: {flags})"
            # DEBUG: a line per object at INFO costs the SCP CPU on every C-STORE and floods the
            # journal; the association's end says how many were stored (refusals stay WARNING).
            log.debug("stored SOP Instance %s from %s", uid, source)
        return Outcome(Status.SUCCESS, comment, uid, attrs["series_uid"], stored.path, stored.already_stored)

    @staticmethod
    def _refused(r: Refused, uid: str | None, source: Source) -> Outcome:
        log.warning("refused SOP Instance %s from %s: %s", uid or "(unknown)", source, r.comment)
        return Outcome(r.status, r.comment, uid)

    # -- validation ------------------------------------------------------------

    @staticmethod
    def _decode(body: bytes | memoryview, ts: str) -> tuple[dicomio.Layout, attributes.Attributes]:
        if ts not in UNCOMPRESSED:
            raise Refused(Status.CANNOT_UNDERSTAND, f"transfer syntax {ts} is not accepted here")
        syntax = TransferSyntax(ts)
        try:
            layout = dicomio.walk(body, syntax.is_implicit_vr, syntax.is_little_endian)
            return layout, attributes.read(body, layout, syntax.is_implicit_vr, syntax.is_little_endian)
        except (dicomio.EncodingError, attributes.AttributeDecodeError) as exc:
            raise Refused(Status.CANNOT_UNDERSTAND, f"the data set does not decode: {exc}") from None

    def _validate(
        self,
        body: bytes | memoryview,
        layout: dicomio.Layout,
        attrs: attributes.Attributes,
        ts: str,
        sop_class_uid: str,
        command_uid: str | None,
    ) -> str | None:
        """Apply appendix A and section 7; return the flags to record (or None)."""
        syntax = TransferSyntax(ts)

        ds_class = attrs["sop_class_uid"]
        if ds_class != sop_class_uid:
            raise Refused(
                Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                f"the data set's SOP Class UID {ds_class or '(missing)'} does not match "
                f"the negotiated SOP class {sop_class_uid}",
            )
        ds_uid = attrs["sop_instance_uid"]
        if not ds_uid:
            raise Refused(Status.CANNOT_UNDERSTAND, "the data set has no SOP Instance UID (0008,0018)")
        if command_uid is not None and ds_uid != command_uid:
            raise Refused(
                Status.REFUSED_UID_MISMATCH,
                f"the data set's SOP Instance UID {ds_uid} does not match the request's {command_uid}",
            )
        for column, tag in (("study_uid", "Study Instance UID (0020,000D)"),
                            ("series_uid", "Series Instance UID (0020,000E)")):
            if not attrs[column]:
                raise Refused(Status.CANNOT_UNDERSTAND, f"the data set has no {tag}")

        modality = (attrs["modality"] or "").strip()
        if modality not in ACCEPTED_MODALITIES:
            raise Refused(
                Status.REFUSED_MODALITY,
                f"modality '{modality or '(missing)'}' is not accepted; accepted are "
                f"{', '.join(sorted(ACCEPTED_MODALITIES))}",
            )
        series_type = str(attrs["series_type"] or "").split("\\")[0].strip().upper()
        if series_type == DYNAMIC_PET_SERIES_TYPE:
            raise Refused(Status.REFUSED_DYNAMIC_PET, "dynamic PET series (Series Type DYNAMIC) are not accepted")
        frames = attrs["number_of_frames"] or 1
        if sop_class_uid == SOPClass.XA_IMAGE and frames > 1:
            raise Refused(
                Status.REFUSED_MULTIFRAME_XA,
                f"multi-frame X-ray angiography ({frames} frames) is not accepted; only single frames",
            )
        flags = self._check_charset(attrs, sop_class_uid)
        if sop_class_uid in IMAGE_OBJECTS:
            self._check_pixels(body, layout, attrs, syntax)
        return flags

    def _check_charset(self, attrs: attributes.Attributes, sop_class_uid: str) -> str | None:
        terms = [t for t in attrs.charsets if t]
        allowed = allowed_character_sets(sop_class_uid)
        kind = "RT objects" if allowed is not allowed_character_sets(SOPClass.CT_IMAGE) else "images"
        problem = None
        if len(attrs.charsets) > 1 or any(t.startswith("ISO 2022") for t in terms):
            joined = "\\".join(attrs.charsets)
            problem = (f"character set '{joined}' uses ISO 2022 code extensions, "
                       "which are not supported")
        elif terms and terms[0] != DEFAULT_CHARACTER_SET and terms[0] not in allowed:
            problem = (f"character set '{terms[0]}' is not supported for {kind}; supported are the default "
                       f"and {', '.join(sorted(allowed))}")
        if problem is None:
            return None
        if self.rules.charset_strict:
            raise Refused(Status.REFUSED_CHARACTER_SET, problem)
        return "charset: " + problem

    @staticmethod
    def _check_pixels(
        body: bytes | memoryview, layout: dicomio.Layout, attrs: attributes.Attributes, syntax: TransferSyntax
    ) -> None:
        pixel = layout.elements.get(dicomio.PIXEL_DATA)
        if pixel is None:
            raise Refused(Status.REFUSED_PIXEL_DATA, "the image has no Pixel Data (7FE0,0010)")
        if pixel.length is None:
            raise Refused(Status.REFUSED_PIXEL_DATA, "Pixel Data is encapsulated, but the transfer syntax is not")
        dims = [attrs[c] for c in ("rows", "columns", "samples_per_pixel", "bits_allocated")]
        if any(d is None for d in dims):
            raise Refused(
                Status.REFUSED_PIXEL_DATA,
                "Rows, Columns, Samples per Pixel and Bits Allocated are needed to read the Pixel Data",
            )
        rows, cols, spp, bits = (int(d) for d in dims)
        frames = int(attrs["number_of_frames"] or 1)
        expected = (rows * cols * spp * frames * bits + 7) // 8
        if pixel.length not in (expected, expected + (expected & 1)):
            raise Refused(
                Status.REFUSED_PIXEL_DATA,
                f"Pixel Data holds {pixel.length} bytes, but {rows} rows x {cols} columns x {spp} samples x "
                f"{bits} bits x {frames} frame(s) need {expected}",
            )
        group_length = layout.elements.get(dicomio.PIXEL_DATA_GROUP_LENGTH)
        if group_length is not None:
            if group_length.length != 4:
                raise Refused(Status.REFUSED_PIXEL_DATA, "Pixel Data Group Length (7FE0,0000) is not 4 bytes long")
            fmt = "<L" if syntax.is_little_endian else ">L"
            (claimed,) = struct.unpack_from(fmt, body, group_length.value_offset)
            actual = layout.group_size(0x7FE0)
            if claimed != actual:
                raise Refused(
                    Status.REFUSED_PIXEL_DATA,
                    f"Pixel Data Group Length (7FE0,0000) says {claimed} bytes, but the group holds {actual}",
                )


class IncomingObject:
    """A network data set being received into a temp file of the store (see
    :meth:`Ingest.open_stream`). ``write`` never raises: a write error is remembered and
    answered by :meth:`finish`."""

    def __init__(self, ingest: Ingest, ts: str, sop_class_uid: str, sop_instance_uid: str,
                 source: Source) -> None:
        self.ingest = ingest
        self.ts = ts
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid
        self.source = source
        self.size = 0
        self._fd = -1
        self._tmp: Path | None = None
        self._error: StoreError | None = None
        #: Writes the index row of the object stored (see :meth:`settle`).
        self._settle: Callable[[], None] | None = None
        #: The data set's first bytes, up to its Pixel Data, while they arrive (see :meth:`write`).
        self._head: bytearray | None = bytearray() if ts in UNCOMPRESSED else None
        self._scanned = 0
        self._need = 0
        #: Where Pixel Data starts, and the layout and attributes of what comes before it.
        self._early: tuple[int, dicomio.Layout, attributes.Attributes] | None = None
        self._refusal = ingest.space_status()
        if self._refusal is None:
            try:
                self._tmp, self._fd = ingest.store.create_temp()
                meta = dicomio.file_meta(sop_class_uid, sop_instance_uid, ts, source.calling_ae)
                self._meta_len = len(meta)
                self._write(memoryview(meta))
            except StoreError as exc:
                self._error = exc
            except dicomio.EncodingError as exc:
                self._error = StoreError(str(exc))

    def _write(self, data: memoryview) -> None:
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except OSError as exc:
            self._error = store_error(exc, "cannot write to the store")
            self._close()

    def write(self, data: memoryview) -> None:
        """Append a fragment of the data set."""
        self.size += len(data)
        if self._fd >= 0:
            try:
                written = os.write(self._fd, data)  # nearly always all of it, in one call
            except OSError as exc:
                self._error = store_error(exc, "cannot write to the store")
                self._close()
                return
            if written < len(data):
                self._write(data[written:])
        if self._head is not None:
            self._look_ahead(data)

    def _look_ahead(self, data: memoryview) -> None:
        """Decode what comes before the Pixel Data as soon as it has arrived, while the pixels
        still arrive, so that after the last byte only the Pixel Data and what follows it are
        left to check (see :meth:`_decode_rest`). Anything unexpected (no Pixel Data in the
        first HEAD_LIMIT bytes, an element that does not decode) leaves the whole data set
        to be decoded after the last byte, as before."""
        head = self._head
        assert head is not None
        head += data
        if len(head) < self._need:
            return  # the element being received is not whole yet
        syntax = TransferSyntax(self.ts)
        self._scanned, self._need = dicomio.find_pixel_data(head, syntax.is_implicit_vr, syntax.is_little_endian,
                                                            self._scanned)
        if self._need:
            if self._need < 0 or self._need > HEAD_LIMIT:
                self._head = None  # decoded whole after the last byte
            return
        self._head = None
        prefix = bytes(head[:self._scanned])
        try:
            layout = dicomio.walk(prefix, syntax.is_implicit_vr, syntax.is_little_endian)
            attrs = attributes.read(prefix, layout, syntax.is_implicit_vr, syntax.is_little_endian)
        except (dicomio.EncodingError, ValueError):
            return  # said after the last byte, by the whole data set's decode
        self._early = (self._scanned, layout, attrs)

    def _decode_rest(self, body: bytes | memoryview, ts: str) -> tuple[dicomio.Layout, attributes.Attributes]:
        """The whole data set's layout and attributes, from what :meth:`_look_ahead` decoded
        and a walk of the rest (the Pixel Data and what follows); exactly what decoding the
        whole data set gives, which is what happens instead whenever the rest does not walk
        (so that an error names its place as before) or holds an attribute read."""
        assert self._early is not None
        start, head, attrs = self._early
        syntax = TransferSyntax(ts)
        try:
            rest = dicomio.walk(body[start:], syntax.is_implicit_vr, syntax.is_little_endian)
        except dicomio.EncodingError:
            return self.ingest._decode(body, ts)
        elements = dict(head.elements)
        for tag, e in rest.elements.items():
            if tag in elements:
                return self.ingest._decode(body, ts)  # "appears twice", said as before
            elements[tag] = e._replace(offset=e.offset + start, value_offset=e.value_offset + start,
                                       end=e.end + start)
        layout = dicomio.Layout(elements, len(body))
        if not attributes.READ_TAGS.isdisjoint(rest.elements):
            return self.ingest._decode(body, ts)
        return layout, attrs

    def finish(self) -> Outcome:
        """The data set is complete: validate it and make it durable, or refuse it. A stored
        object is durable when this returns; its index row is written by :meth:`settle`,
        which the caller must call (once it has answered the sender)."""
        try:
            if self._refusal is not None:
                return self.ingest._refused(Refused(self._refusal.status, self._refusal.comment),
                                            self.sop_instance_uid, self.source)
            if self._error is not None:
                return self._write_failure(self._error)
            return self._validate_and_commit()
        except BaseException:
            self.settle()
            raise
        finally:
            if self._settle is None:
                self.discard()
            # else settle() closes the stored file, after the answer

    def settle(self) -> None:
        """After the answer: write the stored object's index row and let its UID go; close
        the file, and make the next object's temp file ready. Idempotent; never raises for
        the disk (a row that cannot be written is left for the next start, which indexes it)."""
        settle, self._settle = self._settle, None
        if settle is not None:
            try:
                settle()
            finally:
                self._tmp = None  # renamed into the store
                self._close()
            self.ingest.store.make_spare_temp(SPARE_TEMPS)

    def _write_failure(self, err: StoreError) -> Outcome:
        if isinstance(err, StoreFullError):
            return self.ingest._refused(Refused(Status.OUT_OF_RESOURCES, str(err)), self.sop_instance_uid,
                                        self.source)
        log.error("could not store SOP Instance %s from %s: %s", self.sop_instance_uid, self.source, err)
        status = Status.OUT_OF_RESOURCES if isinstance(err, StoreDiskError) else Status.PROCESSING_FAILURE
        return Outcome(status, str(err), self.sop_instance_uid)

    def _validate_and_commit(self) -> Outcome:
        assert self._tmp is not None
        tmp = self._tmp
        total = self._meta_len + self.size
        try:
            mapped = mmap.mmap(self._fd, total, prot=mmap.PROT_READ)
        except OSError as exc:
            return self._write_failure(store_error(exc, "cannot read back the received object"))
        with mapped:
            view = memoryview(mapped)
            body = view[self._meta_len:]
            try:

                def write(attrs: attributes.Attributes, flags: str | None) -> StoredObject:
                    # Decoded and checked: unmap the file before its fsync, which takes longer
                    # (0.03-0.04 ms) while pages of it are mapped. A stored object with the same
                    # UID is compared with the data set read again.
                    body.release()
                    view.release()
                    try:
                        mapped.close()
                    except BufferError:  # a view of it still held somewhere: it stays mapped
                        pass
                    stored = self.ingest.store.commit(
                        tmp, self._fd, self._read_back, attrs, self.ts, total, calling_ae=self.source.calling_ae,
                        origin=self.source.origin, flags=flags, policy=self.ingest.rules.duplicate_policy,
                        defer_index=True)
                    self._settle = stored.settle
                    return stored

                return self.ingest._accept(body, self.ts, self.sop_class_uid, self.sop_instance_uid,
                                           self.source, write, self._decode_rest if self._early else None)
            finally:
                body.release()
                view.release()

    def _read_back(self) -> bytes:
        """The data set received, read again from its temp file."""
        size = self.size
        data = os.pread(self._fd, size, self._meta_len)
        if len(data) != size:
            raise OSError(f"read {len(data)} of the {size} bytes received")
        return data

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def discard(self) -> None:
        """Drop whatever was received and not stored (idempotent)."""
        self._close()
        if self._tmp is not None:
            remove_temp(self._tmp)
            self._tmp = None

