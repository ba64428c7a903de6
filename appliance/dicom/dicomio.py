"""Byte-level DICOM encoding: a strict structural walk of an encoded data set, and the
Part 10 file meta header.

pydicom decodes leniently (a truncated value is read short, a lying length is believed
as far as it goes). Before anything is stored, :func:`walk` proves that every element of
a data set fits in the bytes received, that sequences and items are closed, and that
nothing trails the last element; in Explicit VR also that every VR is one of PS3.5 and
that binary numbers come in whole values. It reports where the top-level elements lie,
so that the Pixel Data length and its group length can be checked without decoding pixels.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import NamedTuple

from appliance.conformance import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

UNDEFINED_LENGTH = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
PIXEL_DATA_GROUP_LENGTH = 0x7FE00000

#: The VRs of PS3.5 Table 6.2-1, all of which pydicom 3 reads.
VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR "
    b"US UT UV".split()
)
#: Bytes per value of the VRs read as numbers (PS3.5 Table 6.2-1): a value's length is a
#: multiple of it, or a reader cannot split it into values.
_VALUE_SIZES = {b"AT": 4, b"FD": 8, b"FL": 4, b"SL": 4, b"SS": 2, b"SV": 8, b"UL": 4, b"US": 2, b"UV": 8}
#: Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_MAX_DEPTH = 32


class EncodingError(ValueError):
    """The bytes are not a well-formed data set in the stated transfer syntax."""


class Element(NamedTuple):
    """Where one top-level element lies: ``offset`` of its tag, ``value_offset`` and
    ``length`` of its value (``length`` is None for undefined length). A NamedTuple: one
    is made per element of every received object."""

    tag: int
    vr: bytes | None
    offset: int
    value_offset: int
    length: int | None
    end: int


@dataclass(frozen=True)
class Layout:
    """The top-level elements of a data set, in encoded order."""

    elements: dict[int, Element]
    size: int

    def group_size(self, group: int) -> int:
        """Encoded bytes of every element of ``group`` except its group length."""
        return sum(
            e.end - e.offset
            for tag, e in self.elements.items()
            if tag >> 16 == group and tag & 0xFFFF != 0
        )


def tag_str(tag: int) -> str:
    """``(GGGG,EEEE)``, as a tag is written in messages."""
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _bad_vr(tag: int, vr: bytes, pos: int) -> str:
    """The refusal of an Explicit VR element whose VR is not in PS3.5 Table 6.2-1.

    PS3.5 7.1.2 reads an unknown VR with the 4-byte length of UN, pydicom 3 with a 2-byte
    length: readers disagree on where the next element starts, so what was checked here is
    not what would be read back. Tag and VR come first: an Error Comment keeps 64 characters."""
    if 65 <= vr[0] <= 90 and 65 <= vr[1] <= 90:
        return (f"unknown VR '{vr.decode()}' in {tag_str(tag)} at byte {pos}: not a VR of PS3.5 "
                "Table 6.2-1, so its length cannot be read reliably")
    return f"no valid VR in {tag_str(tag)} at byte {pos} ({vr!r})"


#: Per byte order: (group, element), a 2-byte and a 4-byte number.
_STRUCTS = {order: (struct.Struct(order + "HH"), struct.Struct(order + "H"), struct.Struct(order + "L"))
            for order in "<>"}


class _Walker:
    def __init__(self, buf: bytes | bytearray | memoryview, implicit: bool, little: bool) -> None:
        self.buf = memoryview(buf)
        self.size = len(self.buf)
        self.implicit = implicit
        self.endian = "<" if little else ">"
        self._hdr, self._u16, self._u32 = _STRUCTS[self.endian]

    def need(self, pos: int, n: int, what: str, tag: int = 0) -> None:
        """Raise unless ``n`` bytes from ``pos`` are there; ``what`` may name ``{tag}``
        and ``{n}`` (formatted only on failure: this runs for every element)."""
        if pos + n > self.size:
            what = what.format(tag=tag_str(tag), n=n)
            raise EncodingError(
                f"the data set ends after {self.size} bytes, inside {what} "
                f"(needs {pos + n - self.size} more bytes); it was truncated or a length is wrong"
            )

    def header(self, pos: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
        """Return (tag, vr, length, value_offset) of the element at ``pos``."""
        self.need(pos, 8, "an element header")
        group, elem = self._hdr.unpack_from(self.buf, pos)
        tag = group << 16 | elem
        if group == 0xFFFE:
            (length,) = self._u32.unpack_from(self.buf, pos + 4)
            return tag, None, length, pos + 8
        if implicit:
            (length,) = self._u32.unpack_from(self.buf, pos + 4)
            return tag, None, length, pos + 8
        vr = bytes(self.buf[pos + 4 : pos + 6])
        if vr not in VRS:
            raise EncodingError(_bad_vr(tag, vr, pos))
        if vr in _LONG_VRS:
            self.need(pos, 12, "the header of {tag}", tag)
            (length,) = self._u32.unpack_from(self.buf, pos + 8)
            return tag, vr, length, pos + 12
        (length,) = self._u16.unpack_from(self.buf, pos + 6)
        return tag, vr, length, pos + 8

    def element(self, pos: int, implicit: bool, depth: int) -> tuple[int, bytes | None, int, int, int]:
        """Walk the element at ``pos`` (sequences included); return (tag, vr, length,
        value offset, end)."""
        tag, vr, length, vpos = self.header(pos, implicit)
        if tag >> 16 == 0xFFFE:
            raise EncodingError(f"unexpected item tag {tag_str(tag)} at byte {pos}")
        if length == UNDEFINED_LENGTH:
            if vr is None or vr == b"SQ":
                end = self.sequence(vpos, None, implicit, depth + 1)
            elif vr == b"UN":
                # PS3.5 6.2.2: an undefined-length UN holds an Implicit VR LE sequence.
                end = _Walker(self.buf, True, True).sequence(vpos, None, True, depth + 1)
            elif vr in (b"OB", b"OW") and tag == PIXEL_DATA:
                end = self.fragments(vpos)
            else:
                raise EncodingError(f"element {tag_str(tag)} ({vr.decode()}) has undefined length")
            return tag, vr, length, vpos, end
        self.need(vpos, length, "the value of {tag} ({n} bytes)", tag)
        if vr is not None and length % _VALUE_SIZES.get(vr, 1):
            raise EncodingError(f"{tag_str(tag)} {vr.decode()} value of {length} bytes is not a multiple "
                                f"of {_VALUE_SIZES[vr]}, the size of one {vr.decode()} value")
        end = vpos + length
        if vr == b"SQ" and length:
            self.sequence(vpos, end, implicit, depth + 1)
        return tag, vr, length, vpos, end

    def items_body(self, pos: int, end: int | None, implicit: bool, depth: int) -> int:
        """Walk an item's elements up to ``end``, or up to its delimiter if ``end`` is None."""
        if depth > _MAX_DEPTH:
            raise EncodingError("sequences are nested more than 32 levels deep")
        while end is None or pos < end:
            if end is None:
                self.need(pos, 8, "an item")
                if self._hdr.unpack_from(self.buf, pos) == (0xFFFE, 0xE00D):
                    return pos + 8
            _, _, _, _, nxt = self.element(pos, implicit, depth)
            if end is not None and nxt > end:
                raise EncodingError(f"an element at byte {pos} runs past the end of its item")
            pos = nxt
        return pos

    def sequence(self, pos: int, end: int | None, implicit: bool, depth: int) -> int:
        while True:
            if end is not None and pos == end:
                return pos
            tag, _, length, vpos = self.header(pos, implicit)
            if tag == SEQUENCE_DELIMITER:
                if end is not None:
                    raise EncodingError(f"sequence delimiter inside a defined-length sequence at byte {pos}")
                return vpos
            if tag != ITEM:
                raise EncodingError(f"expected a sequence item at byte {pos}, found {tag_str(tag)}")
            if length == UNDEFINED_LENGTH:
                pos = self.items_body(vpos, None, implicit, depth)
            else:
                self.need(vpos, length, "a sequence item ({n} bytes)")
                pos = self.items_body(vpos, vpos + length, implicit, depth)
            if end is not None and pos > end:
                raise EncodingError("a sequence item runs past the end of its sequence")

    def fragments(self, pos: int) -> int:
        while True:
            tag, _, length, vpos = self.header(pos, True)
            if tag == SEQUENCE_DELIMITER:
                return vpos
            if tag != ITEM or length == UNDEFINED_LENGTH:
                raise EncodingError(f"bad encapsulated pixel data fragment at byte {pos}")
            self.need(vpos, length, "a pixel data fragment ({n} bytes)")
            pos = vpos + length


#: Per byte order: unpackers of an Implicit VR header (group, element, 4-byte length), an
#: Explicit VR header (group, element, VR, 2-byte length) and a 4-byte length.
_HEADERS = {
    order: (struct.Struct(order + "HHL").unpack_from, struct.Struct(order + "HH2sH").unpack_from,
            struct.Struct(order + "L").unpack_from)
    for order in "<>"
}


def walk(buf: bytes | memoryview, implicit_vr: bool, little_endian: bool) -> Layout:
    """Check that ``buf`` is exactly one well-formed data set and return its top-level layout.

    Raises :class:`EncodingError` naming the first element that does not fit."""
    w = _Walker(buf, implicit_vr, little_endian)
    top: dict[int, Element] = {}
    pos = 0
    size, mv = w.size, w.buf
    # The common element (defined length, not a sequence, whole) is read here with one
    # unpack; anything else (a sequence, an undefined length, an item tag, a bad VR, a value
    # that does not fit) takes the walker's own path, which checks and names it as before.
    implicit_hdr, explicit_hdr, long_length = _HEADERS[w.endian]
    make = tuple.__new__  # Element(...) without its Python-level __new__, once per element
    while pos < size:
        tag = -1
        if pos + 8 <= size:
            if implicit_vr:
                group, elem, length = implicit_hdr(mv, pos)
                vr: bytes | None = None
                vpos = pos + 8
                if group != 0xFFFE and length != UNDEFINED_LENGTH and vpos + length <= size:
                    tag = group << 16 | elem
            else:
                group, elem, vr, length = explicit_hdr(mv, pos)
                vpos = pos + 8
                if vr in _LONG_VRS:
                    if pos + 12 <= size and vr != b"SQ":
                        (length,) = long_length(mv, pos + 8)
                        vpos = pos + 12
                    else:
                        length = UNDEFINED_LENGTH
                if (group != 0xFFFE and length != UNDEFINED_LENGTH and vr in VRS and vpos + length <= size
                        and not length % _VALUE_SIZES.get(vr, 1)):
                    tag = group << 16 | elem
        if tag >= 0:
            end = vpos + length
        else:
            tag, vr, length, vpos, end = w.element(pos, implicit_vr, 0)
            if length == UNDEFINED_LENGTH:
                length = None
        if tag in top:
            raise EncodingError(f"element {tag_str(tag)} appears twice")
        top[tag] = make(Element, (tag, vr, pos, vpos, length, end))
        pos = end
    return Layout(top, w.size)


def find_pixel_data(buf: bytes | bytearray | memoryview, implicit_vr: bool, little_endian: bool,
                    start: int = 0) -> tuple[int, int]:
    """Look through the top-level elements at the beginning of a data set, ``buf``, from
    the element at ``start`` for the Pixel Data element. Return (its offset, 0) once found;
    else (where the first element not wholly in ``buf`` starts, how many bytes ``buf`` must
    hold before that element can be whole: call again from there then), or (that offset, -1)
    when looking further is no use: an element that does not decode (:func:`walk` on the
    whole data set says what is wrong), or a sequence of undefined length, whose end shows
    only when it is all there (an RT Structure Set's contours: walking them again with
    every fragment would cost more than walking them once at the end)."""
    w = _Walker(buf, implicit_vr, little_endian)
    size, mv = w.size, w.buf
    implicit_hdr, explicit_hdr, long_length = _HEADERS[w.endian]
    try:
        pos = start
        while pos + 4 <= size:
            # The common element (defined length, not a sequence, a valid VR, whole or not)
            # is read with one unpack, as walk() does; anything else takes the walker's path.
            if pos + 8 <= size:
                if implicit_vr:
                    group, elem, length = implicit_hdr(mv, pos)
                    vpos = pos + 8
                    common = group != 0xFFFE and length != UNDEFINED_LENGTH
                else:
                    group, elem, vr, length = explicit_hdr(mv, pos)
                    vpos = pos + 8
                    if vr in _LONG_VRS:
                        common = vr != b"SQ" and pos + 12 <= size
                        if common:
                            (length,) = long_length(mv, pos + 8)
                            vpos = pos + 12
                    else:
                        common = vr in VRS
                    common = (common and group != 0xFFFE and length != UNDEFINED_LENGTH
                              and not length % _VALUE_SIZES.get(vr, 1))
                if group << 16 | elem == PIXEL_DATA:
                    return pos, 0
                if common:
                    if vpos + length > size:
                        return pos, vpos + length
                    pos = vpos + length
                    continue
            group, elem = w._hdr.unpack_from(mv, pos)
            if group << 16 | elem == PIXEL_DATA:
                return pos, 0
            try:
                _, _, length, vpos = w.header(pos, implicit_vr)
            except EncodingError:
                return (pos, pos + 12) if pos + 12 > w.size else (pos, -1)
            if length == UNDEFINED_LENGTH:
                return pos, -1
            if vpos + length > w.size:
                return pos, vpos + length
            try:
                *_, end = w.element(pos, implicit_vr, 0)
            except EncodingError:
                return pos, -1
            pos = end
        return pos, pos + 12
    finally:
        w.buf.release()  # a bytearray being received into can grow again


def _meta_element(elem: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    if len(value) & 1:
        value += pad
    if vr == b"OB":
        return struct.pack("<HH2sHL", 0x0002, elem, vr, 0, len(value)) + value
    if len(value) > 0xFFFF:
        raise EncodingError(f"a file meta value of {len(value)} bytes is too long")
    return struct.pack("<HH2sH", 0x0002, elem, vr, len(value)) + value


def file_meta(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax: str,
    source_ae: str | None = None,
) -> bytes:
    """Return the 128-byte preamble, ``DICM`` and a file meta group for a Part 10 file.

    Encoded here rather than by pydicom because it is on the hot path of every C-STORE:
    only the SOP Instance UID is encoded per object, the rest once per SOP class, transfer
    syntax and source (:func:`_meta_head`, :func:`_meta_tail`), in the same order."""
    head = _meta_head(sop_class_uid)
    uid = _meta_element(0x0003, b"UI", sop_instance_uid.encode("ascii", "replace"), b"\x00")
    body = head + uid + _meta_tail(transfer_syntax, source_ae)
    return b"\x00" * 128 + b"DICM" + _meta_element(0x0000, b"UL", struct.pack("<L", len(body)), b"") + body


@functools.lru_cache(maxsize=256)
def _meta_head(sop_class_uid: str) -> bytes:
    """The file meta elements before the SOP Instance UID (0002,0003)."""
    return (_meta_element(0x0001, b"OB", b"\x00\x01", b"\x00")
            + _meta_element(0x0002, b"UI", sop_class_uid.encode("ascii", "replace"), b"\x00"))


@functools.lru_cache(maxsize=256)
def _meta_tail(transfer_syntax: str, source_ae: str | None) -> bytes:
    """The file meta elements after the SOP Instance UID (0002,0003)."""
    return b"".join(
        [
            _meta_element(0x0010, b"UI", transfer_syntax.encode("ascii", "replace"), b"\x00"),
            _meta_element(0x0012, b"UI", IMPLEMENTATION_CLASS_UID.encode("ascii", "replace"), b"\x00"),
            _meta_element(0x0013, b"SH", IMPLEMENTATION_VERSION_NAME.encode("ascii"), b" "),
        ]
        + ([_meta_element(0x0016, b"AE", source_ae.encode("ascii", "replace"), b" ")] if source_ae else [])
    )


def source_ae(data: bytes | memoryview) -> str | None:
    """Return the Source Application Entity Title (0002,0016) of a Part 10 file's meta
    header (for a stored object: the calling AE title it came from), or None."""
    mv = memoryview(data)
    pos = 132
    if len(mv) < pos or bytes(mv[128:132]) != b"DICM":
        return None
    while pos + 8 <= len(mv):
        group, elem = struct.unpack_from("<HH", mv, pos)
        if group != 0x0002:
            return None
        vr = bytes(mv[pos + 4 : pos + 6])
        if vr in _LONG_VRS:
            if pos + 12 > len(mv):
                return None
            (length,) = struct.unpack_from("<L", mv, pos + 8)
            vpos = pos + 12
        else:
            (length,) = struct.unpack_from("<H", mv, pos + 6)
            vpos = pos + 8
        if length == UNDEFINED_LENGTH or vpos + length > len(mv):
            return None
        if elem == 0x0016:
            return bytes(mv[vpos : vpos + length]).strip(b"\x00 ").decode("ascii", "replace") or None
        pos = vpos + length
    return None


def split_part10(data: bytes | memoryview) -> tuple[int, str]:
    """Return (offset of the data set, transfer syntax UID) of a Part 10 file in ``data``.

    Raises :class:`EncodingError` if ``data`` has no preamble, ``DICM`` or file meta group."""
    mv = memoryview(data)
    if len(mv) < 132 or bytes(mv[128:132]) != b"DICM":
        raise EncodingError("no DICOM preamble ('DICM' at byte 128)")
    pos = 132
    ts: str | None = None
    while pos + 8 <= len(mv):
        group, elem = struct.unpack_from("<HH", mv, pos)
        if group != 0x0002:
            break
        vr = bytes(mv[pos + 4 : pos + 6])
        if vr in _LONG_VRS:
            if pos + 12 > len(mv):
                raise EncodingError("the file meta header is truncated")
            (length,) = struct.unpack_from("<L", mv, pos + 8)
            vpos = pos + 12
        else:
            (length,) = struct.unpack_from("<H", mv, pos + 6)
            vpos = pos + 8
        if length == UNDEFINED_LENGTH or vpos + length > len(mv):
            raise EncodingError("the file meta header is truncated or has a bad length")
        if elem == 0x0010:
            ts = bytes(mv[vpos : vpos + length]).rstrip(b"\x00 ").decode("ascii", "replace")
        pos = vpos + length
    if ts is None:
        raise EncodingError("the file meta header has no Transfer Syntax UID (0002,0010)")
    return pos, ts
