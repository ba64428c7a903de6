"""Re-encoding stored objects in Implicit VR Little Endian for export.

The client AE (Tables 6 and 7) and the USB writer (Tables 10 and 11) offer Implicit VR
Little Endian only, while the store keeps objects byte-exact in whatever syntax they
arrived in: Implicit LE, Explicit LE, Explicit BE (network) or JPEG Lossless (CD).

:func:`to_implicit_le` converts one stored Part 10 file without changing a pixel value
or an attribute value:

* Implicit LE is passed through byte for byte.
* Explicit LE and BE are rewritten element by element at the byte level: headers lose
  their VR, defined lengths of sequences and items are recomputed, and for BE the values
  of binary VRs (US, SS, UL, SL, FL, FD, SV, UV, AT, OW, OF, OL, OD, OV) are byte swapped,
  inside sequences too. Text values keep their exact bytes (no decoding and re-encoding
  of character sets). Group lengths, where present, are recomputed for the new encoding.
  An Explicit LE data set's top-level values are copied once, in one join (:func:`_explicit_le`).
* JPEG Lossless (Process 14, and SV1) is decompressed by pydicom (pylibjpeg), keeping
  the SOP Instance UID and the stored colour space, and the result is rewritten as above.
  pydicom may adjust Image Pixel attributes to match the decompressed pixels (e.g. Planar
  Configuration; logged), and drops retired group lengths.

What cannot be swapped because its VR is unknown: a BE value stored with VR UN. Such
values are copied unchanged (PS3.5 says UN values are opaque bytes).
"""

from __future__ import annotations

import logging
import re
import struct
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from appliance.dicom import dicomio
from appliance.conformance import TransferSyntax
from appliance.errors import ApplianceError

log = logging.getLogger(__name__)

#: Byte size of one value of each VR whose values are byte swapped between endiannesses.
_SWAP_SIZES: dict[bytes, int] = {
    b"US": 2, b"SS": 2, b"AT": 2, b"OW": 2,
    b"UL": 4, b"SL": 4, b"FL": 4, b"OF": 4, b"OL": 4,
    b"FD": 8, b"SV": 8, b"UV": 8, b"OD": 8, b"OV": 8,
}  # fmt: skip
#: Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_BITS_ALLOCATED = 0x00280100
_SOP_CLASS_UID = 0x00080016
_SOP_INSTANCE_UID = 0x00080018
_IMPLICIT_HEADER = struct.Struct("<HHL")
_EXPLICIT_LE_HEADER = struct.Struct("<HH2sH")
_U32 = struct.Struct("<L")
#: A UI value pydicom reads as one UID: printable ASCII without a backslash, and at most one
#: NUL of padding (anything else goes through pydicom).
_PLAIN_UID = re.compile(rb"[\x20-\x5b\x5d-\x7e]*\x00?")


class TranscodeError(ApplianceError):
    """A stored object cannot be re-encoded in Implicit VR Little Endian."""


@dataclass(frozen=True)
class Transcoded:
    """One object re-encoded in Implicit VR Little Endian."""

    sop_class_uid: str
    sop_instance_uid: str
    #: The syntax the object was stored in.
    source_syntax: TransferSyntax
    #: The data set (no file meta), Implicit VR Little Endian.
    body: bytes

    def part10(self) -> bytes:
        """Return a complete Part 10 file: preamble, file meta (Implicit VR LE), data set."""
        meta = dicomio.file_meta(self.sop_class_uid, self.sop_instance_uid, TransferSyntax.IMPLICIT_LE)
        return meta + self.body

    def dataset(self) -> Dataset:
        """Return the object as a pydicom Dataset whose file meta says Implicit VR LE.

        Its elements are left raw, so pydicom writes them back unchanged in that syntax."""
        return dcmread(BytesIO(self.part10()))


def to_implicit_le(source: Path | bytes | memoryview) -> Transcoded:
    """Re-encode the Part 10 object in ``source`` (a file, or its bytes) in Implicit VR LE.

    ``source`` may be a view of a buffer the caller reuses: nothing returned refers to it.

    Raises :class:`TranscodeError` when the file cannot be read, is not Part 10, uses a
    transfer syntax other than the statement's, or does not decode."""
    where = str(source) if isinstance(source, Path) else "the object"
    try:
        data = source.read_bytes() if isinstance(source, Path) else source
    except OSError as exc:
        raise TranscodeError(f"cannot read {where}: {exc.strerror}") from exc
    try:
        offset, ts = dicomio.split_part10(data)
    except dicomio.EncodingError as exc:
        raise TranscodeError(f"{where} is not a DICOM Part 10 file: {exc}") from None
    try:
        syntax = TransferSyntax(ts)
    except ValueError:
        raise TranscodeError(
            f"{where} is stored in transfer syntax {ts}, which the conformance statement does not "
            "name; only Implicit/Explicit VR Little Endian, Explicit VR Big Endian and JPEG Lossless "
            "can be re-encoded"
        ) from None
    body: bytes | memoryview
    try:
        if syntax.is_compressed:
            body, little = _decompress(bytes(data)), True
        else:
            body, little = memoryview(data)[offset:], syntax.is_little_endian
        if syntax is TransferSyntax.IMPLICIT_LE:
            out = bytes(body)
        elif little:
            out = _explicit_le(memoryview(body))
        else:
            out = _Rewriter(body, little).dataset()
        sop_class, sop_instance = _identity(out)
    except TranscodeError as exc:
        raise TranscodeError(f"{where}: {exc}") from None
    except (dicomio.EncodingError, InvalidDicomError, struct.error, ValueError, TypeError,
            AttributeError, NotImplementedError, RuntimeError) as exc:
        raise TranscodeError(f"{where} cannot be re-encoded in Implicit VR Little Endian: {exc}") from exc
    if not sop_class or not sop_instance:
        raise TranscodeError(f"{where} has no SOP Class UID or SOP Instance UID")
    return Transcoded(sop_class, sop_instance, syntax, out)


def _identity(body: bytes) -> tuple[str, str]:
    """Return (SOP Class UID, SOP Instance UID) of an Implicit VR LE data set as pydicom
    reads them (:func:`_identity_pydicom`): from the bytes of the first top-level elements
    where each holds one plain ASCII value, else through pydicom."""
    found = {_SOP_CLASS_UID: "", _SOP_INSTANCE_UID: ""}
    pos, size = 0, len(body)
    while pos + 8 <= size:
        group, elem, length = _IMPLICIT_HEADER.unpack_from(body, pos)
        tag = group << 16 | elem
        if tag > _SOP_INSTANCE_UID:
            break
        if length == dicomio.UNDEFINED_LENGTH or pos + 8 + length > size:
            return _identity_pydicom(body)
        if tag in found:
            value = body[pos + 8 : pos + 8 + length]
            if not _PLAIN_UID.fullmatch(value):
                return _identity_pydicom(body)
            found[tag] = value.decode("ascii").rstrip("\0 ")
        pos += 8 + length
    return found[_SOP_CLASS_UID], found[_SOP_INSTANCE_UID]


def _identity_pydicom(body: bytes) -> tuple[str, str]:
    """Return (SOP Class UID, SOP Instance UID) of an Implicit VR LE data set, read by pydicom."""
    head = read_dataset(BytesIO(body), True, True, stop_when=lambda tag, vr, length: tag > _SOP_INSTANCE_UID)
    return str(head.get("SOPClassUID", "")), str(head.get("SOPInstanceUID", ""))


def _explicit_le(buf: memoryview) -> bytes:
    """Rewrite an Explicit VR Little Endian data set as Implicit VR Little Endian: what
    :class:`_Rewriter` makes of it, byte for byte, but each top-level value is copied once
    (one join of the new headers and views of the values, Pixel Data included), without a
    Python object per element but its header. Sequences and values of undefined length
    go through :class:`_Rewriter`."""
    parts: list[bytes | memoryview] = []
    sizes: dict[int, int] = {}  # group -> encoded bytes of its elements but its group length
    group_lengths: list[tuple[int, int]] = []  # (index in parts of its value, group)
    rewriter: _Rewriter | None = None
    unpack, pack, u32 = _EXPLICIT_LE_HEADER.unpack_from, _IMPLICIT_HEADER.pack, _U32.unpack_from
    pos, size = 0, len(buf)
    while pos < size:
        group, elem, vr, length = unpack(buf, pos)
        if vr in _LONG_VRS:
            # A sequence (its items are rewritten) or a value of undefined length: _Rewriter.
            (length,) = (dicomio.UNDEFINED_LENGTH,) if vr == b"SQ" else u32(buf, pos + 8)
            vpos = pos + 12
        else:
            vpos = pos + 8
        if length == dicomio.UNDEFINED_LENGTH:
            rewriter = rewriter or _Rewriter(buf, True)
            _, encoded, pos = rewriter.element(pos, True)
            parts.append(encoded)
            encoded_size = len(encoded)
        else:
            end = vpos + length
            if end > size:
                raise TranscodeError(f"element ({group:04X},{elem:04X}) runs past the end of the data set")
            parts.append(pack(group, elem, length))
            if elem == 0 and length == 4:  # a group length: recomputed below, as _fix_group_lengths does
                group_lengths.append((len(parts), group))
            parts.append(buf[vpos:end])
            encoded_size = 8 + length
            pos = end
        if elem:
            sizes[group] = sizes.get(group, 0) + encoded_size
    if pos != size:
        raise TranscodeError(f"an element runs past the end of its item or data set at byte {pos}")
    for index, group in group_lengths:
        parts[index] = _U32.pack(sizes.get(group, 0))
    return b"".join(parts)


def body_to_implicit_le(body: bytes | memoryview, transfer_syntax: str) -> bytes:
    """Re-encode an uncompressed data set ``body`` (no file meta) in Implicit VR LE."""
    syntax = TransferSyntax(transfer_syntax)
    if syntax.is_compressed:
        raise TranscodeError("a compressed data set needs its file meta; use to_implicit_le()")
    if syntax is TransferSyntax.IMPLICIT_LE:
        return bytes(body)
    if syntax.is_little_endian:
        return _explicit_le(memoryview(body))
    return _Rewriter(body, False).dataset()


def _decompress(part10: bytes) -> bytes:
    """Decompress a JPEG Lossless Part 10 object; return its data set in Explicit VR LE."""
    ds = dcmread(BytesIO(part10))
    before = {kw: ds.get(kw) for kw in ("PhotometricInterpretation", "PlanarConfiguration", "BitsStored")}
    # as_rgb=False: keep the stored colour space; the UID must not change either.
    ds.decompress(as_rgb=False, generate_instance_uid=False)
    for kw, old in before.items():
        if ds.get(kw) != old:
            log.info("decompressing %s set %s from %s to %s to match the decompressed pixels",
                     ds.SOPInstanceUID, kw, old, ds.get(kw))
    buf = DicomBytesIO()
    buf.is_implicit_VR = False
    buf.is_little_endian = True
    clean = Dataset()
    clean.update(ds)
    write_dataset(buf, clean)
    return buf.getvalue()


def _skip_implicit_sequence(buf: memoryview, pos: int) -> int:
    """Return the end of an undefined-length Implicit VR LE sequence whose items start at ``pos``."""
    while True:
        group, elem, length = _IMPLICIT_HEADER.unpack_from(buf, pos)
        pos += 8
        if (group, elem) == (0xFFFE, 0xE0DD):
            return pos
        if (group, elem) != (0xFFFE, 0xE000):
            raise TranscodeError(f"expected a sequence item at byte {pos - 8}")
        if length != dicomio.UNDEFINED_LENGTH:
            pos += length
            continue
        while True:  # undefined-length item: elements up to the item delimiter
            group, elem, length = _IMPLICIT_HEADER.unpack_from(buf, pos)
            pos += 8
            if (group, elem) == (0xFFFE, 0xE00D):
                break
            pos = _skip_implicit_sequence(buf, pos) if length == dicomio.UNDEFINED_LENGTH else pos + length


class _Rewriter:
    """Rewrites one Explicit VR data set (either endianness) as Implicit VR Little Endian."""

    def __init__(self, buf: bytes | memoryview, little: bool) -> None:
        self.buf = memoryview(buf)
        self.little = little
        order = "<" if little else ">"
        self.tag = struct.Struct(order + "HH")
        self.u16 = struct.Struct(order + "H")
        self.u32 = struct.Struct(order + "L")
        self.bits_allocated = 0

    def dataset(self) -> bytes:
        encoded, _ = self.elements(0, len(self.buf), top=True)
        return b"".join(encoded)

    def elements(self, pos: int, end: int | None, top: bool = False) -> tuple[list[bytes], int]:
        """Rewrite elements up to ``end`` (or up to and including an item delimiter if None)."""
        out: list[tuple[int, bytes]] = []
        while end is None or pos < end:
            group, elem = self.tag.unpack_from(self.buf, pos)
            if end is None and (group, elem) == (0xFFFE, 0xE00D):
                pos += 8
                break
            tag, encoded, pos = self.element(pos, top)
            out.append((tag, encoded))
        if end is not None and pos != end:
            raise TranscodeError(f"an element runs past the end of its item or data set at byte {pos}")
        return _fix_group_lengths(out), pos

    def element(self, pos: int, top: bool) -> tuple[int, bytes, int]:
        group, elem = self.tag.unpack_from(self.buf, pos)
        tag = group << 16 | elem
        vr = bytes(self.buf[pos + 4 : pos + 6])
        if vr in _LONG_VRS:
            (length,) = self.u32.unpack_from(self.buf, pos + 8)
            vpos = pos + 12
        else:
            (length,) = self.u16.unpack_from(self.buf, pos + 6)
            vpos = pos + 8
        if vr == b"SQ":
            items, end = self.sequence(vpos, length)
            if length == dicomio.UNDEFINED_LENGTH:
                return tag, _header(tag, length) + items + _header(0xFFFEE0DD, 0), end
            return tag, _header(tag, len(items)) + items, end
        if length == dicomio.UNDEFINED_LENGTH:
            if vr != b"UN":
                raise TranscodeError(
                    f"element ({group:04X},{elem:04X}) has undefined length (encapsulated pixel data "
                    "must be decompressed first)"
                )
            # PS3.5 6.2.2: its content is an Implicit VR LE sequence already.
            end = _skip_implicit_sequence(self.buf, vpos)
            return tag, _header(tag, length) + bytes(self.buf[vpos:end]), end
        end = vpos + length
        if end > len(self.buf):
            raise TranscodeError(f"element ({group:04X},{elem:04X}) runs past the end of the data set")
        value = bytes(self.buf[vpos:end])
        if top and tag == _BITS_ALLOCATED and vr == b"US" and length == 2:
            (self.bits_allocated,) = self.u16.unpack(value)
        if not self.little:
            value = self.swap(tag, vr, value)
        return tag, _header(tag, length) + value, end

    def swap(self, tag: int, vr: bytes, value: bytes) -> bytes:
        size = _SWAP_SIZES.get(vr, 1)
        if tag == dicomio.PIXEL_DATA and vr == b"OW" and self.bits_allocated in (32, 64):
            # Pixel cells wider than a word are swapped whole (as DCMTK and pydicom read them).
            size = self.bits_allocated // 8
        if size == 1 or not value:
            return value
        if len(value) % size:
            raise TranscodeError(
                f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) {vr.decode()} holds {len(value)} bytes, "
                f"not a multiple of {size}"
            )
        return numpy.frombuffer(value, dtype=f">u{size}").astype(f"<u{size}").tobytes()

    def sequence(self, pos: int, length: int) -> tuple[bytes, int]:
        """Rewrite the items of a sequence; return them (without delimiter) and the end."""
        end = None if length == dicomio.UNDEFINED_LENGTH else pos + length
        out = bytearray()
        while end is None or pos < end:
            group, elem = self.tag.unpack_from(self.buf, pos)
            (item_length,) = self.u32.unpack_from(self.buf, pos + 4)
            pos += 8
            if (group, elem) == (0xFFFE, 0xE0DD) and end is None:
                return bytes(out), pos
            if (group, elem) != (0xFFFE, 0xE000):
                raise TranscodeError(f"expected a sequence item at byte {pos - 8}, found ({group:04X},{elem:04X})")
            if item_length == dicomio.UNDEFINED_LENGTH:
                encoded, pos = self.elements(pos, None)
                out += _header(dicomio.ITEM, item_length) + b"".join(encoded) + _header(dicomio.ITEM_DELIMITER, 0)
            else:
                encoded, pos = self.elements(pos, pos + item_length)
                body = b"".join(encoded)
                out += _header(dicomio.ITEM, len(body)) + body
        if pos != end:
            raise TranscodeError(f"a sequence item runs past the end of its sequence at byte {pos}")
        return bytes(out), pos


def _header(tag: int, length: int) -> bytes:
    return _IMPLICIT_HEADER.pack(tag >> 16, tag & 0xFFFF, length)


def _fix_group_lengths(elements: list[tuple[int, bytes]]) -> list[bytes]:
    """Recompute group length elements (gggg,0000) for the new encoding."""
    sizes: dict[int, int] = {}
    for tag, encoded in elements:
        if tag & 0xFFFF:
            sizes[tag >> 16] = sizes.get(tag >> 16, 0) + len(encoded)
    out = []
    for tag, encoded in elements:
        if tag & 0xFFFF == 0 and len(encoded) == 12:
            encoded = _header(tag, 4) + struct.pack("<L", sizes.get(tag >> 16, 0))
        out.append(encoded)
    return out
