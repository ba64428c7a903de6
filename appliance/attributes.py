"""Reading the Table 12 attributes (appendix A) out of an encoded data set.

The data set is decoded by pydicom up to, not including, the Pixel Data, and text is
decoded in the object's own Specific Character Set. The result is plain Python values
keyed by index column, so no pydicom object leaves this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO
from typing import Any

import numpy
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from appliance.dicomio import PIXEL_DATA, Layout

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
_NUMERIC = {
    "series_number",
    "instance_number",
    "number_of_frames",
    "rows",
    "columns",
    "samples_per_pixel",
    "bits_allocated",
    "bits_stored",
    "high_bit",
    "pixel_representation",
    "pixel_padding_value",
    "slice_thickness",
    "spacing_between_slices",
    "slice_location",
    "rescale_slope",
    "rescale_intercept",
}


class AttributeDecodeError(ValueError):
    """An attribute cannot be decoded (bad value, unknown character set...)."""


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


def _plain(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, PersonName):
        return str(value)
    if isinstance(value, (MultiValue, list, tuple)):
        return "\\".join(str(_plain(v)) for v in value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (int, float, str)):
        return value if not isinstance(value, str) else value
    return str(value)


def read(buf: bytes | memoryview, layout: Layout, implicit_vr: bool, little_endian: bool) -> Attributes:
    """Decode the Table 12 attributes of the data set in ``buf`` (already walked into ``layout``)."""
    pixel = layout.elements.get(PIXEL_DATA)
    head = bytes(buf[: pixel.offset]) if pixel else bytes(buf)
    try:
        ds: Dataset = read_dataset(BytesIO(head), implicit_vr, little_endian)
        charsets = _charset_terms(ds)
        values: dict[str, Any] = {}
        for keyword, column, _ in COLUMNS:
            if keyword not in ds:
                continue
            raw = ds[keyword].value
            v = _plain(raw)
            if column in _NUMERIC and v not in (None, ""):
                if isinstance(v, str) and "\\" in v:
                    v = v.split("\\")[0]
                v = float(v) if column in ("slice_thickness", "spacing_between_slices", "slice_location",
                                            "rescale_slope", "rescale_intercept") else int(float(v))
            if v == "" and column in _NUMERIC:
                v = None
            values[column] = v
    except (ValueError, TypeError, LookupError, OverflowError) as exc:
        raise AttributeDecodeError(f"an attribute cannot be decoded: {exc}") from exc
    values["charset"] = "\\".join(charsets) if charsets else None
    return Attributes(values, charsets)


def _charset_terms(ds: Dataset) -> tuple[str, ...]:
    if "SpecificCharacterSet" not in ds:
        return ()
    raw = ds["SpecificCharacterSet"].value
    terms = list(raw) if isinstance(raw, (MultiValue, list, tuple)) else [raw]
    terms = [str(t).strip() for t in terms]
    if all(t == "" for t in terms):
        return ()
    return tuple(terms)


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
    in another transfer syntax); pixel data is compared value by value."""
    from appliance.conformance import TransferSyntax

    sa, sb = TransferSyntax(ts_a), TransferSyntax(ts_b)
    da = read_dataset(BytesIO(bytes(a)), sa.is_implicit_vr, sa.is_little_endian)
    db = read_dataset(BytesIO(bytes(b)), sb.is_implicit_vr, sb.is_little_endian)
    return _normalised(da, sa.is_little_endian) == _normalised(db, sb.is_little_endian)
