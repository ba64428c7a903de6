"""Re-encoding stored objects in Implicit VR LE: every value and every pixel survives."""

from __future__ import annotations

import copy
import struct
from io import BytesIO

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset

from appliance.dicom import dicomio, transcode
from appliance.conformance import TransferSyntax
from appliance.dicom.transcode import TranscodeError, Transcoded, to_implicit_le

from helpers import SAMPLES, Sample, ct_series, encode, samples

_CONVERTIBLE = {str(ts) for ts in TransferSyntax}
_SWAP = {"US": 2, "SS": 2, "OW": 2, "UL": 4, "SL": 4, "FL": 4, "OF": 4, "OL": 4,
         "FD": 8, "OD": 8, "OV": 8, "SV": 8, "UV": 8}


def _convertible() -> list[Sample]:
    return [s for s in samples() if s.transfer_syntax in _CONVERTIBLE]


def _value(elem, little: bool, parent: Dataset):  # type: ignore[no-untyped-def]
    """A comparable value: binary values in little-endian order, numbers and text as text."""
    value = elem.value
    if value in (None, "", b"") or (isinstance(value, list) and not value):
        return None
    if isinstance(value, bytes):
        size = _SWAP.get(elem.VR, 1)
        if size > 1 and not little and len(value) % size == 0:
            value = np.frombuffer(value, dtype=f">u{size}").astype(f"<u{size}").tobytes()
        return value
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [str(v) for v in value]
    return str(value)


def assert_same_values(orig: Dataset, new: Dataset, little: bool, path: str = "") -> None:
    """Every element of ``orig`` is in ``new`` with the same value (Pixel Data and group
    lengths excepted); VRs the implicit encoding cannot carry are taken from ``orig``."""
    orig_tags = {t for t in orig.keys() if t.element != 0 and t != 0x7FE00010}
    new_tags = {t for t in new.keys() if t.element != 0 and t != 0x7FE00010}
    assert orig_tags == new_tags, f"{path}: tags differ: {sorted(orig_tags ^ new_tags)}"
    for tag in sorted(orig_tags):
        a = orig[tag]
        raw = new.get_item(tag)  # before new[tag] converts it
        b = new[tag]
        if b.VR != a.VR and isinstance(raw, RawDataElement):
            # Implicit VR: the reader took the VR from its dictionary (UN for unknown
            # private tags, OW for "US or OW"); read the same bytes with the original VR.
            b = convert_raw_data_element(raw._replace(VR=a.VR), ds=new)
        where = f"{path}{tag}"
        if a.VR == "SQ":
            assert len(a.value) == len(b.value), where
            for i, (ia, ib) in enumerate(zip(a.value, b.value)):
                assert_same_values(ia, ib, little, f"{where}[{i}]")
        else:
            assert _value(a, little, orig) == _value(b, True, new), where


@pytest.mark.parametrize("s", _convertible(), ids=lambda s: s.name)
def test_every_sample_transcodes_with_identical_values_and_pixels(s: Sample) -> None:
    syntax = TransferSyntax(s.transfer_syntax)
    if not s.sop_instance_uid:
        # Such an object is never stored (ingest refuses it) and cannot be exported.
        with pytest.raises(TranscodeError, match="no SOP Class UID or SOP Instance UID"):
            to_implicit_le(s.path)
        return
    result = to_implicit_le(s.path)
    assert isinstance(result, Transcoded)
    assert result.source_syntax is syntax
    assert (result.sop_class_uid, result.sop_instance_uid) == (s.sop_class_uid, s.sop_instance_uid)
    orig = dcmread(s.path)
    new = dcmread(BytesIO(result.part10()))
    assert new.file_meta.TransferSyntaxUID == TransferSyntax.IMPLICIT_LE
    assert_same_values(orig, new, syntax.is_little_endian)
    if "PixelData" in orig:
        assert np.array_equal(orig.pixel_array, new.pixel_array)
        a, b = orig.pixel_array.dtype, new.pixel_array.dtype
        assert (a.kind, a.itemsize) == (b.kind, b.itemsize)
    if syntax is TransferSyntax.IMPLICIT_LE:
        assert result.body == s.path.read_bytes()[-len(result.body):]


def test_dataset_is_ready_for_sending_unchanged() -> None:
    s = next(x for x in _convertible() if x.transfer_syntax == TransferSyntax.EXPLICIT_BE)
    ds = to_implicit_le(s.path).dataset()
    assert ds.file_meta.TransferSyntaxUID == TransferSyntax.IMPLICIT_LE
    assert ds.SOPInstanceUID == s.sop_instance_uid


def _with_group_length(body: bytes, order: str) -> bytes:
    at = body.rfind(struct.pack(order + "HH", 0x7FE0, 0x0010))
    return body[:at] + struct.pack(order + "HH2sHL", 0x7FE0, 0, b"UL", 4, 12345) + body[at:]


def test_nested_big_endian_values_and_group_lengths_are_rewritten() -> None:
    ds = ct_series(1)[0]
    item = Dataset()
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    item.add_new(0x00281101, "US", [4096, 0, 16])  # Red Palette Color LUT Descriptor
    item.add_new(0x00281201, "OW", bytes(range(16)))  # Red Palette Color LUT Data
    inner = Dataset()
    inner.add_new(0x00209165, "AT", [0x00200032, 0x00181050])  # Dimension Index Pointer
    item.add_new(0x00209222, "SQ", [inner])
    ds.add_new(0x00081140, "SQ", [item])  # Referenced Image Sequence
    le = encode(ds, TransferSyntax.EXPLICIT_LE)
    # pydicom writes OW bytes as given: hand it the big-endian words of the nested LUT for
    # the BE encoding (helpers.encode does so for the Pixel Data).
    swapped = copy.deepcopy(ds)
    swapped.ReferencedImageSequence[0][0x00281201].value = np.frombuffer(bytes(range(16)), "<u2").astype(">u2").tobytes()
    be = encode(swapped, TransferSyntax.EXPLICIT_BE)
    assert be != le
    # pydicom drops group lengths when writing: add a stale Pixel Data Group Length by hand.
    le = _with_group_length(le, "<")
    be = _with_group_length(be, ">")
    out = transcode.body_to_implicit_le(be, TransferSyntax.EXPLICIT_BE)
    assert out == transcode.body_to_implicit_le(le, TransferSyntax.EXPLICIT_LE)
    back = dcmread(BytesIO(out), force=True)
    back.file_meta = Dataset()
    back.file_meta.TransferSyntaxUID = TransferSyntax.IMPLICIT_LE
    seq_item = back.ReferencedImageSequence[0]
    assert seq_item[0x00281201].value == bytes(range(16))
    assert list(seq_item[0x00209222].value[0][0x00209165].value) == [0x00200032, 0x00181050]
    assert back[0x7FE00000].value == 8 + len(ds.PixelData)
    assert np.array_equal(back.pixel_array, ds.pixel_array)


def test_unreadable_and_unsupported_objects_are_refused_in_words(tmp_path) -> None:  # type: ignore[no-untyped-def]
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    with pytest.raises(TranscodeError, match="not a DICOM Part 10 file"):
        to_implicit_le(junk)
    with pytest.raises(TranscodeError, match="cannot read"):
        to_implicit_le(tmp_path / "missing.dcm")
    rle = SAMPLES / "ts_rle__MR_small_RLE.dcm"
    with pytest.raises(TranscodeError, match="does not name"):
        to_implicit_le(rle)


_REFUSED = (TranscodeError, struct.error, ValueError)


def _explicit_le_bodies() -> list[tuple[str, bytes]]:
    """Every Explicit VR LE data set at hand: the samples' (also those ingest refuses) and
    generated ones with sequences, undefined lengths, private UN values and group lengths."""
    out = []
    for s in samples():
        data = s.path.read_bytes()
        try:
            offset, ts = dicomio.split_part10(data)
        except dicomio.EncodingError:
            continue
        if ts == TransferSyntax.EXPLICIT_LE:
            out.append((s.name, data[offset:]))
    ds = ct_series(1, rows=8, cols=8)[0]
    item = Dataset()
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    item.add_new(0x00281201, "OW", bytes(range(16)))
    inner = Dataset()
    inner.add_new(0x00209165, "AT", [0x00200032, 0x00181050])
    item.add_new(0x00209222, "SQ", [inner])
    ds.add_new(0x00081140, "SQ", [item])
    ds.add_new(0x00091010, "UN", b"\x01\x02\x03\x04")
    plain = encode(ds, TransferSyntax.EXPLICIT_LE)
    out.append(("generated", plain))
    out.append(("generated with a group length", _with_group_length(plain, "<")))
    at = plain.find(struct.pack("<HH", 0x0008, 0x0016))
    out.append(("generated with a group 0008 length",
                plain[:at] + struct.pack("<HH2sHL", 0x0008, 0, b"UL", 4, 1) + plain[at:]))
    undefined = bytearray(plain)
    seq = plain.find(struct.pack("<HH2s", 0x0008, 0x1140, b"SQ"))
    undefined[seq + 8 : seq + 12] = struct.pack("<L", 0xFFFFFFFF)
    end = seq + 12 + struct.unpack_from("<L", plain, seq + 8)[0]
    out.append(("generated, a sequence of undefined length",
                bytes(undefined[:end]) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0) + bytes(undefined[end:])))
    out.append(("truncated", plain[:-3]))
    out.append(("a lying length", plain[:-len(ds.PixelData) - 4] + struct.pack("<L", 1 << 20)
                + plain[-len(ds.PixelData):]))
    return out


@pytest.mark.parametrize("name,body", _explicit_le_bodies(), ids=lambda x: x if isinstance(x, str) else "")
def test_explicit_le_fast_path_writes_what_the_element_rewriter_writes(name: str, body: bytes) -> None:
    """to_implicit_le's path for Explicit VR LE (one join, views of the values) gives the
    bytes of the element-by-element rewriter, or refuses what it refuses."""
    try:
        expected = transcode._Rewriter(body, True).dataset()
    except _REFUSED:
        with pytest.raises(_REFUSED):
            transcode._explicit_le(memoryview(body))
        return
    assert transcode._explicit_le(memoryview(body)) == expected
    assert transcode._identity(expected) == transcode._identity_pydicom(expected)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize("s", _convertible(), ids=lambda s: s.name)
def test_identity_is_what_pydicom_reads(s: Sample) -> None:
    try:
        body = to_implicit_le(s.path).body
    except TranscodeError:
        return  # no SOP Instance UID: refused above
    assert transcode._identity(body) == transcode._identity_pydicom(body)
    for odd in (b"1.2.3\\4.5", b"1.2.3 \0", b"1.2\xe9", b""):  # two values, padding, not ASCII, empty
        value = odd + b"\0" * (len(odd) & 1)
        changed = _replace_top(body, 0x00080018, value)
        assert transcode._identity(changed) == transcode._identity_pydicom(changed), odd


def _replace_top(body: bytes, tag: int, value: bytes) -> bytes:
    """``body`` (Implicit VR LE) with the value of top-level ``tag`` replaced."""
    elements = dicomio.walk(body, True, True).elements
    elem = elements[tag]
    return body[:elem.offset] + struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value + body[elem.end:]
