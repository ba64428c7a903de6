"""Reading the Table 12 attributes (appendix A) out of an encoded data set.

Table 12 attributes are all top-level elements, so they are decoded straight from the
layout :func:`appliance.dicom.dicomio.walk` found (this is on the hot path of every C-STORE),
with text decoded in the object's own Specific Character Set by pydicom's codecs. The
result is plain Python values keyed by index column, so no pydicom object leaves this
module.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import numpy
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_keyword, dictionary_VR
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from appliance.dicom.dicomio import EncodingError, Layout, tag_str

#: (keyword, index column, level). Level is where the value lives in the index.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("PatientID", "patient_id", "patient"),
    ("PatientName", "patient_name", "patient"),
    ("StudyInstanceUID", "study_uid", "study"),
    ("StudyDate", "study_date", "study"),
    ("StudyTime", "study_time", "study"),
    ("SeriesInstanceUID", "series_uid", "series"),
    ("Modality", "modality", "series"),
    ("SeriesNumber", "series_number", "series"),
    ("FrameOfReferenceUID", "frame_of_reference_uid", "series"),
    ("Manufacturer", "manufacturer", "series"),
    ("SeriesType", "series_type", "series"),
    ("SOPInstanceUID", "sop_instance_uid", "instance"),
    ("SOPClassUID", "sop_class_uid", "instance"),
    ("SpecificCharacterSet", "charset", "instance"),
    ("InstanceNumber", "instance_number", "instance"),
    ("NumberOfFrames", "number_of_frames", "instance"),
    ("Rows", "rows", "instance"),
    ("Columns", "columns", "instance"),
    ("SamplesPerPixel", "samples_per_pixel", "instance"),
    ("BitsAllocated", "bits_allocated", "instance"),
    ("BitsStored", "bits_stored", "instance"),
    ("HighBit", "high_bit", "instance"),
    ("PixelRepresentation", "pixel_representation", "instance"),
    ("PhotometricInterpretation", "photometric_interpretation", "instance"),
    ("ImagePositionPatient", "image_position_patient", "instance"),
    ("ImageOrientationPatient", "image_orientation_patient", "instance"),
    ("PixelSpacing", "pixel_spacing", "instance"),
    ("PixelAspectRatio", "pixel_aspect_ratio", "instance"),
    ("SliceThickness", "slice_thickness", "instance"),
    ("SpacingBetweenSlices", "spacing_between_slices", "instance"),
    ("SliceLocation", "slice_location", "instance"),
    ("PatientOrientation", "patient_orientation", "instance"),
    ("RescaleSlope", "rescale_slope", "instance"),
    ("RescaleIntercept", "rescale_intercept", "instance"),
    ("PixelPaddingValue", "pixel_padding_value", "instance"),
    ("WindowCenter", "window_center", "instance"),
    ("WindowWidth", "window_width", "instance"),
)


class AttributeDecodeError(EncodingError):
    """An attribute cannot be decoded (bad value, unknown character set...): an encoding
    error of the data set, so whoever reads a stored file (reindex, recover) handles it as one."""


@dataclass(frozen=True)
class Attributes:
    """Table 12 values of one object, by index column; multi-values joined with ``\\``."""

    values: dict[str, Any]
    #: The Specific Character Set terms, empty for the default repertoire.
    charsets: tuple[str, ...]

    def __getitem__(self, column: str) -> Any:
        return self.values.get(column)

    def number(self, column: str) -> float | None:
        v = self.values.get(column)
        return None if v is None else float(v)

    def vector(self, column: str) -> tuple[float, ...] | None:
        v = self.values.get(column)
        if v is None or v == "":
            return None
        try:
            return tuple(float(x) for x in str(v).split("\\"))
        except ValueError:
            return None


#: Column -> (tag, value kind). Kinds: "text" (ASCII), "person"/"string" (in the object's
#: character set), "int"/"float" (IS/DS, first value), "us" (binary US), "multi" (ASCII,
#: backslash-separated values kept as a string).
_TAGS: dict[str, tuple[int, str]] = {
    "patient_id": (0x00100020, "string"),
    "patient_name": (0x00100010, "person"),
    "study_uid": (0x0020000D, "text"),
    "study_date": (0x00080020, "text"),
    "study_time": (0x00080030, "text"),
    "series_uid": (0x0020000E, "text"),
    "modality": (0x00080060, "text"),
    "series_number": (0x00200011, "int"),
    "frame_of_reference_uid": (0x00200052, "text"),
    "manufacturer": (0x00080070, "string"),
    "series_type": (0x00541000, "multi"),
    "sop_instance_uid": (0x00080018, "text"),
    "sop_class_uid": (0x00080016, "text"),
    "instance_number": (0x00200013, "int"),
    "number_of_frames": (0x00280008, "int"),
    "rows": (0x00280010, "us"),
    "columns": (0x00280011, "us"),
    "samples_per_pixel": (0x00280002, "us"),
    "bits_allocated": (0x00280100, "us"),
    "bits_stored": (0x00280101, "us"),
    "high_bit": (0x00280102, "us"),
    "pixel_representation": (0x00280103, "us"),
    "photometric_interpretation": (0x00280004, "text"),
    "image_position_patient": (0x00200032, "multi"),
    "image_orientation_patient": (0x00200037, "multi"),
    "pixel_spacing": (0x00280030, "multi"),
    "pixel_aspect_ratio": (0x00280034, "multi"),
    "slice_thickness": (0x00180050, "float"),
    "spacing_between_slices": (0x00180088, "float"),
    "slice_location": (0x00201041, "float"),
    "patient_orientation": (0x00200020, "multi"),
    "rescale_slope": (0x00281053, "float"),
    "rescale_intercept": (0x00281052, "float"),
    "pixel_padding_value": (0x00280120, "us"),
    "window_center": (0x00281050, "multi"),
    "window_width": (0x00281051, "multi"),
}
_SPECIFIC_CHARACTER_SET = 0x00080005


def _allowed_vrs(tag: int) -> frozenset[bytes]:
    # "US or SS" is one of two; UN is what a sender that lacks the tag in its dictionary writes.
    return frozenset(v.encode() for v in dictionary_VR(tag).split(" or ")) | {b"UN"}


#: The VRs each element read here may have in Explicit VR: its VR in PS3.6. A value in
#: another VR would be read by pydicom in that VR, not as decoded here (and pydicom cannot
#: take a Specific Character Set that is not text).
_VRS = {tag: _allowed_vrs(tag) for tag, _ in [*_TAGS.values(), (_SPECIFIC_CHARACTER_SET, "")]}
#: What read() decodes, in order: (column, tag, kind, the VRs allowed in Explicit VR).
_READ = tuple((column, tag, kind, _VRS[tag]) for column, (tag, kind) in _TAGS.items())
#: Every tag :func:`read` looks at.
READ_TAGS = frozenset([_SPECIFIC_CHARACTER_SET, *(tag for tag, _ in _TAGS.values())])
#: The longest UID a Part 10 file meta header holds (a 2-byte length, padded to even). A
#: UID has at most 64 characters (PS3.5 9.1); longer ones are stored (their file names are
#: hashed), up to this.
_UID_MAX = 0xFFFE
#: IS values the index can hold (SQLite INTEGER). Wider than PS3.5's -2^31..2^31-1, so that
#: every object stored so far stays indexable; beyond it, storing the row would fail.
_INT_RANGE = range(-(2**63), 2**63)


#: Python codecs (as pydicom names them) that decode ASCII bytes as ASCII: a value in one of
#: them without ESC (and, for a person name, without '=') reads the same without pydicom.
_ASCII_SUPERSETS = frozenset({"iso8859", "latin_1", "iso8859_2", "iso_ir_144", "UTF8"})


@functools.lru_cache(maxsize=64)
def _encodings(charsets: tuple[str, ...]) -> tuple[tuple[str, ...], bool]:
    """pydicom's encodings for the Specific Character Set terms ``charsets``, and whether
    ASCII values in them may be read as plain ASCII (one encoding, an ASCII superset).
    Cached: a store receives a handful of character sets, once per object."""
    encodings = tuple(convert_encodings(list(charsets) or ["ISO_IR 6"]))
    return encodings, len(encodings) == 1 and encodings[0] in _ASCII_SUPERSETS


def _ascii(raw: bytes) -> str:
    return raw.decode("ascii", "replace").strip(" \x00")


def _multi(raw: bytes) -> str:
    return "\\".join(v.strip(" \x00") for v in raw.decode("ascii", "replace").split("\\"))


def read(buf: bytes | memoryview, layout: Layout, implicit_vr: bool, little_endian: bool) -> Attributes:
    """Decode the Table 12 attributes of the data set in ``buf`` (already walked into ``layout``)."""
    elements = layout.elements

    def raw(tag: int) -> bytes | None:
        e = elements.get(tag)
        if e is None or e.length is None:
            return None
        if e.vr is not None and e.vr not in _VRS[tag]:
            allowed = " or ".join(sorted(v.decode() for v in _VRS[tag] - {b"UN"}))
            raise ValueError(f"encoded as {e.vr.decode('ascii', 'replace')}; its VR is {allowed} (PS3.6)")
        return bytes(buf[e.value_offset : e.value_offset + e.length])

    values: dict[str, Any] = {}
    tag = _SPECIFIC_CHARACTER_SET
    try:
        cs_raw = raw(tag)
        charsets: tuple[str, ...] = ()
        if cs_raw is not None:
            terms = tuple(t.strip(" \x00") for t in cs_raw.decode("ascii", "replace").split("\\"))
            charsets = () if all(t == "" for t in terms) else terms
        encodings, plain = _encodings(charsets)
        for column, tag, kind, allowed in _READ:
            e = elements.get(tag)  # raw(tag), inlined: this runs for every column of every object
            if e is None or e.length is None:
                continue
            if e.vr is not None and e.vr not in allowed:
                raw(tag)  # raises, naming the VRs allowed
            value = bytes(buf[e.value_offset : e.value_offset + e.length])
            if kind == "text":
                values[column] = _ascii(value)
                if len(values[column]) > _UID_MAX and b"UI" in _VRS[tag]:
                    raise ValueError(f"a UID of {len(values[column])} characters cannot be stored; "
                                     "a UID has at most 64")
            elif kind == "multi":
                values[column] = _multi(value)
            elif kind == "person":
                name = value.rstrip(b" \x00")
                if plain and name.isascii() and b"\x1b" not in name and b"=" not in name:
                    values[column] = name.decode("ascii")  # what PersonName gives, without its objects
                else:
                    values[column] = str(PersonName(name, list(encodings)).decode())
            elif kind == "string":
                if plain and value.isascii() and b"\x1b" not in value:
                    values[column] = value.decode("ascii").strip(" \x00")
                else:
                    values[column] = decode_bytes(value, list(encodings), set()).strip(" \x00")
            elif kind == "us":
                if len(value) < 2:
                    values[column] = None
                    continue
                values[column] = struct.unpack_from("<H" if little_endian else ">H", value)[0]
            else:
                first = _ascii(value).split("\\")[0].strip()
                if first == "":
                    values[column] = None
                elif kind == "int":
                    number = int(float(first))
                    if number not in _INT_RANGE:
                        raise ValueError(f"IS value {first!r} is out of range")
                    values[column] = number
                else:
                    values[column] = float(first)
    except (ValueError, TypeError, LookupError, OverflowError) as exc:
        raise AttributeDecodeError(f"{tag_str(tag)} {dictionary_keyword(tag)}: {exc}") from exc
    if values.get("pixel_representation") == 1 and values.get("pixel_padding_value") is not None:
        v = values["pixel_padding_value"]
        values["pixel_padding_value"] = v - 0x10000 if v >= 0x8000 else v  # SS, not US
    values["charset"] = "\\".join(charsets) if charsets else None
    return Attributes(values, charsets)


_WORD_SIZES = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def _normalised(ds: Dataset, little_endian: bool) -> list[tuple[int, Any]]:
    out: list[tuple[int, Any]] = []
    for elem in ds:
        value = elem.value
        if elem.VR == "SQ":
            value = [_normalised(item, little_endian) for item in value]
        elif isinstance(value, bytes):
            size = _WORD_SIZES.get(elem.VR, 1)
            if size > 1 and not little_endian and len(value) % size == 0:
                value = numpy.frombuffer(value, dtype=f">u{size}").astype(f"<u{size}").tobytes()
        elif isinstance(value, (MultiValue, list)):
            value = [str(v) for v in value]
        else:
            value = str(value)
        out.append((elem.tag, value))
    return out


def same_content(a: bytes | memoryview, ts_a: str, b: bytes | memoryview, ts_b: str) -> bool:
    """True when two encoded data sets hold the same values (e.g. one object re-encoded
    in another transfer syntax); pixel data is compared value by value.

    Raises :class:`AttributeDecodeError` when pydicom cannot read a value of either."""
    from appliance.conformance import TransferSyntax

    sa, sb = TransferSyntax(ts_a), TransferSyntax(ts_b)
    try:
        da = read_dataset(BytesIO(bytes(a)), sa.is_implicit_vr, sa.is_little_endian)
        db = read_dataset(BytesIO(bytes(b)), sb.is_implicit_vr, sb.is_little_endian)
        return _normalised(da, sa.is_little_endian) == _normalised(db, sb.is_little_endian)
    except Exception as exc:
        # Every value is read here, not only the few that read() checks, and pydicom reads
        # hostile values with whatever its converters raise: a wrong-length binary value in
        # Implicit VR, an IS of 'inf', a private sequence that is not one...
        raise AttributeDecodeError(f"pydicom cannot read a value: {type(exc).__name__}: {exc}") from exc
