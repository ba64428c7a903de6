"""Hostile values in a data set (issue 14): whatever arrives is answered with a status and a
comment, never a traceback, and the store's index and files still agree afterwards."""

import random
import struct

import pytest
from pydicom.datadict import tag_for_keyword

from appliance.dicom import dicomio
from appliance.dicom.attributes import COLUMNS
from appliance.conformance import Status, TransferSyntax
from appliance.store.ingest import Outcome, Source
from helpers import ct_series, encode, sample

NET = Source("SCANNER")
MEDIA = Source(None, "cd")


def offer(ingest, body, ds, ts=TransferSyntax.EXPLICIT_LE, source=NET):
    return ingest.accept(body, ts, sop_class_uid=ds.SOPClassUID, sop_instance_uid=None, source=source)


def set_value(body, ts, e, value):
    """``body`` (in ``ts``) with the value of its top-level element ``e`` replaced by the raw
    bytes ``value``, and a length that tells the truth."""
    syntax = TransferSyntax(ts)
    end = "<" if syntax.is_little_endian else ">"
    header = bytearray(body[e.offset : e.value_offset])
    if syntax.is_implicit_vr or e.vr in dicomio._LONG_VRS:
        struct.pack_into(end + "L", header, len(header) - 4, len(value))
    else:
        value = value[:0xFFFF]
        struct.pack_into(end + "H", header, 6, len(value))
    return body[: e.offset] + bytes(header) + value + body[e.end :]


def with_raw(keyword, value, ts=TransferSyntax.EXPLICIT_LE, ds=None):
    """``ds`` (default: a generated CT image) encoded in ``ts``, with ``keyword`` holding the
    raw bytes ``value``; and the data set."""
    ds = ct_series(1)[0] if ds is None else ds
    if keyword not in ds:
        setattr(ds, keyword, 1)
    body = encode(ds, ts)
    syntax = TransferSyntax(ts)
    e = dicomio.walk(body, syntax.is_implicit_vr, syntax.is_little_endian).elements[ds.data_element(keyword).tag]
    return set_value(body, ts, e, value), ds


def recode_vr(body, tag, vr):
    """``body`` (Explicit VR LE) with the VR of the 2-byte-length element ``tag`` changed to ``vr``."""
    e = dicomio.walk(body, False, True).elements[tag]
    return body[: e.offset + 4] + vr + body[e.offset + 6 :]


def store_agrees_with_files(store):
    files = {str(p.relative_to(store.data_dir)) for p in store.objects.rglob("*.dcm")}
    return files == set(store.index.paths()) and list(store.tmp.iterdir()) == []


@pytest.mark.parametrize("keyword", ["InstanceNumber", "SeriesNumber", "NumberOfFrames"])
@pytest.mark.parametrize("value", [b"99999999999999999999999", b"-1e300 "])
def test_an_integer_string_the_index_cannot_hold_is_refused(ingest, keyword, value):
    body, ds = with_raw(keyword, value)
    out = offer(ingest, body, ds)
    tag = f"({ds.data_element(keyword).tag.group:04X},{ds.data_element(keyword).tag.element:04X})"
    assert out.status == Status.CANNOT_UNDERSTAND and tag in out.comment and "out of range" in out.comment
    assert store_agrees_with_files(ingest.store) and ingest.store.index.counts()["instances"] == 0


@pytest.mark.parametrize("tag, vr, expected", [(0x00080005, b"PN", "CS"), (0x00280010, b"IS", "US"),
                                               (0x00080018, b"SS", "UI")], ids=["charset", "rows", "uid"])
def test_an_indexed_element_in_another_vr_is_refused(ingest, tag, vr, expected):
    # pydicom would read the value in the VR it is encoded in, not as the index does (and a
    # Specific Character Set that is a PN breaks pydicom's reading of the whole data set).
    ds = ct_series(1)[0]
    out = offer(ingest, recode_vr(encode(ds), tag, vr), ds)
    assert out.status == Status.CANNOT_UNDERSTAND, out.comment
    assert f"({tag >> 16:04X},{tag & 0xFFFF:04X})" in out.comment
    assert f"encoded as {vr.decode()}; its VR is {expected}" in out.comment
    assert ingest.store.index.counts()["instances"] == 0


def test_a_uid_too_long_for_a_file_meta_header_is_refused(ingest):
    ds = ct_series(1)[0]
    ds.SOPInstanceUID = "1." * 35000 + "1"  # fits Implicit VR's 4-byte length, not the meta header's 2
    out = offer(ingest, encode(ds, TransferSyntax.IMPLICIT_LE), ds, TransferSyntax.IMPLICIT_LE, MEDIA)
    assert out.status == Status.CANNOT_UNDERSTAND and "(0008,0018)" in out.comment
    assert "70001 characters" in out.comment
    assert store_agrees_with_files(ingest.store) and ingest.store.index.counts()["instances"] == 0


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("keyword, value, explicit_status", [
    ("ExposureTime", b"1e999 ", Status.REFUSED_DUPLICATE),  # an IS pydicom makes no int of
    ("SmallestImagePixelValue", b"\x01\x02\x03", Status.CANNOT_UNDERSTAND),  # 1.5 SS values
    ("ReferencedImageSequence", b"\x01\x02\x03\x04", Status.CANNOT_UNDERSTAND),  # no items
], ids=["is", "ss", "sq"])
def test_a_value_pydicom_cannot_read_leaves_the_duplicate_check_standing(ingest, keyword, value, explicit_status):
    # Implicit VR has no VR to check a value against, and the element is not indexed: the
    # object is stored. The same object in Explicit VR then has to be compared value by
    # value, and pydicom cannot read that value (in Explicit VR, walk refuses some outright).
    ds = ct_series(1)[0]
    if keyword == "ReferencedImageSequence":
        ds.ReferencedImageSequence = []
    body, ds = with_raw(keyword, value, TransferSyntax.IMPLICIT_LE, ds)
    first = offer(ingest, body, ds, TransferSyntax.IMPLICIT_LE)
    assert first.ok, first.comment
    stored = first.path.read_bytes()
    body, _ = with_raw(keyword, value, TransferSyntax.EXPLICIT_LE, ds)
    out = offer(ingest, body, ds)
    assert out.status == explicit_status, out.comment
    assert first.path.read_bytes() == stored and store_agrees_with_files(ingest.store)


def _part10(ds, body, ts):
    return dicomio.file_meta(ds.SOPClassUID, ds.SOPInstanceUID, ts) + body


def test_reindex_passes_over_stored_files_that_no_longer_decode(store, caplog):
    # Files an earlier version stored (or wrote half) that today's checks refuse: reindex
    # logs each and goes on, instead of stopping at the first.
    good = ct_series(2)
    folder = store.objects / "1.2" / "3.4"
    folder.mkdir(parents=True)
    bad = {
        "unknown_vr": _part10(good[0], recode_vr(encode(good[0]), 0x00080060, b"TS"), TransferSyntax.EXPLICIT_LE),
        "huge_is": _part10(good[0], with_raw("InstanceNumber", b"1e300")[0], TransferSyntax.EXPLICIT_LE),
        "charset_pn": _part10(good[0], recode_vr(encode(good[0]), 0x00080005, b"PN"), TransferSyntax.EXPLICIT_LE),
    }
    for name, data in bad.items():
        (folder / f"{name}.dcm").write_bytes(data)
    for ds in good:
        (folder / f"{ds.SOPInstanceUID}.dcm").write_bytes(_part10(ds, encode(ds), TransferSyntax.EXPLICIT_LE))
    assert store.reindex() == len(good)
    assert {r.sop_instance_uid for r in store.instances()} == {ds.SOPInstanceUID for ds in good}
    for name in bad:
        assert f"{name}.dcm cannot be indexed" in caplog.text


# -- the fuzz -------------------------------------------------------------------------

SEED = 14
MUTATIONS = 2000
#: Values a hostile or broken sender puts into attributes.
HOSTILE = [
    b"\xff" * 8, b"1.2.\x80\x81", b"1.2.3\n", b"\x00\x00", b"1.2\x003", b"9" * 70, b"1." * 40, b"", b" ",
    b"\\", b"\\\\\\", b"1e999", b"-1e999", b"nan", b"inf", b"99999999999999999999999", b"9.3e18",
    b"-9223372036854775809", b"2147483648", b"\xc3\x28", b"\x1b$B", b"=\x1b$B", b"ISO 2022 IR 87",
    b"ISO_IR 192", b"ISO_IR 999", b"\\ISO 2022 IR 87", b"ISO 2022 IR 87\\ISO 2022 IR 149", b"GB18030",
    b"ISO_IR 100\\ISO_IR 144", b"\x1b%G", b"\x1b(J\x1b$)C", b"A" * 65, b"\xe9\xe8", b"0x10", b"1,5", b"+-1",
    b"1.5", b"..", b"/", b"\xff\xfe", b"^^^^^^", b"a=b=c=d", b"1" * 300, b"1\\2\\x", b"\t\r\n", b"1e-400",
]
#: VRs an element is re-labelled with: known ones, and ones no edition of DICOM has.
RELABEL = [b"AE", b"CS", b"DS", b"IS", b"LO", b"PN", b"SH", b"UI", b"US", b"SS", b"UL", b"SL", b"FL", b"FD",
           b"AT", b"TS", b"LK", b"QQ"]
INDEXED = {tag_for_keyword(keyword) for keyword, _, _ in COLUMNS}


class Mutator:
    """Byte-level mutations of one encoded data set, each keeping a note of what it did."""

    def __init__(self, rng, ts):
        self.rng = rng
        self.ts = ts
        syntax = TransferSyntax(ts)
        self.implicit = syntax.is_implicit_vr
        self.end = "<" if syntax.is_little_endian else ">"

    def long_length(self, e):
        return self.implicit or e.vr in dicomio._LONG_VRS

    def set_value(self, body, e, value):
        return set_value(body, self.ts, e, value)

    def mutate(self, body, notes):
        rng = self.rng
        elements = list(dicomio.walk(body, self.implicit, self.end == "<").elements.values())
        if not elements:
            return body
        e = rng.choice(elements)
        kind = rng.randrange(11)
        notes.append(f"{kind}@({e.tag >> 16:04X},{e.tag & 0xFFFF:04X})")
        if kind == 0:
            return self.set_value(body, e, rng.choice(HOSTILE))
        if kind == 1:
            size = rng.choice([0, 1, 2, 3, 4, 7, 8, 64, 65])
            return self.set_value(body, e, bytes(rng.randrange(256) for _ in range(size)))
        if kind == 2:  # one byte anywhere
            b = bytearray(body)
            b[rng.randrange(len(b))] = rng.randrange(256)
            return bytes(b)
        if kind == 3:  # a lying length
            b = bytearray(body)
            n = e.length or 0
            if self.long_length(e):
                choice = rng.choice([0, 1, 0xFFFFFFFF, n + 1, max(n - 1, 0), 0x7FFFFFFF])
                struct.pack_into(self.end + "L", b, e.value_offset - 4, choice)
            else:
                struct.pack_into(self.end + "H", b, e.offset + 6, rng.choice([0, 1, 0xFFFF, n + 1, max(n - 1, 0)]))
            return bytes(b)
        if kind == 4:  # a value cut short, odd lengths included
            return self.set_value(body, e, body[e.value_offset : e.end][: rng.randrange(e.length)]) if e.length else body
        if kind == 5:  # another VR, or one that does not exist
            if self.implicit or e.vr is None or self.long_length(e):
                return body
            return body[: e.offset + 4] + rng.choice(RELABEL) + body[e.offset + 6 :]
        if kind == 6:  # truncated, or trailing bytes
            if rng.random() < 0.5:
                return body[: rng.randrange(len(body))]
            return body + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 12)))
        indexed = [x for x in elements if x.tag in INDEXED and x.length is not None]
        if not indexed:
            return body
        e = rng.choice(indexed)
        value = rng.choice(HOSTILE)
        notes[-1] = f"{kind}@({e.tag >> 16:04X},{e.tag & 0xFFFF:04X})={value[:20]!r}"
        if rng.random() < 0.5:
            value = body[e.value_offset : e.end] + value
        return self.set_value(body, e, value)

    def mutations(self, body, notes):
        for _ in range(self.rng.choice([1, 1, 2, 3])):
            try:
                body = self.mutate(body, notes)
            except dicomio.EncodingError:  # no longer walks: nothing left to aim at
                break
        return body


def _seeds():
    """(SOP class, transfer syntax, data set) to mutate: generated CT in the three syntaxes,
    and real objects with sequences, private tags and other character sets."""
    out = []
    for ds, ts in zip(ct_series(3), (TransferSyntax.EXPLICIT_LE, TransferSyntax.IMPLICIT_LE,
                                     TransferSyntax.EXPLICIT_BE)):
        out.append((ds.SOPClassUID, ts, encode(ds, ts)))
    for role in ("rtstruct_ile", "mr_be", "ct_ele", "pt_ile", "rtstruct_cs_ISO_IR_192"):
        s = sample(role)
        data = s.path.read_bytes()
        offset, ts = dicomio.split_part10(data)
        out.append((s.sop_class_uid, ts, data[offset:]))
    return out


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fuzzed_data_sets_are_answered_and_leave_index_and_files_agreeing(ingest):
    rng = random.Random(SEED)
    seeds = _seeds()
    for sop_class, ts, body in seeds:  # stored first, so mutations meet the duplicate check
        out = ingest.accept(body, ts, sop_class_uid=sop_class, sop_instance_uid=None, source=NET)
        assert out.ok, out.comment
    statuses = set()
    for i in range(MUTATIONS):
        sop_class, ts, body = rng.choice(seeds)
        mutator = Mutator(rng, ts)
        notes: list[str] = []
        body = mutator.mutations(body, notes)
        for _ in range(2 if rng.random() < 0.3 else 1):  # sometimes again, mutated further
            try:
                out = ingest.accept(body, ts, sop_class_uid=sop_class, sop_instance_uid=None, source=NET)
            except Exception as exc:
                pytest.fail(f"mutation {i} ({', '.join(notes)}) of a {ts} data set raised {exc!r}")
            assert isinstance(out, Outcome) and isinstance(out.status, Status) and out.comment, (i, notes)
            statuses.add(out.status)
            body = mutator.mutations(body, notes)
    assert {Status.SUCCESS, Status.CANNOT_UNDERSTAND, Status.REFUSED_DUPLICATE} <= statuses
    store = ingest.store
    assert store_agrees_with_files(store)
    # Whatever was stored can be read back: the index rebuilds from the files alone.
    count = store.index.counts()["instances"]
    assert store.reindex() == count
