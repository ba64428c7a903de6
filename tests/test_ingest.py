"""Validation and storage through the one door (appendix A, section 7, the store's rules)."""

import copy

import pydicom
import pytest

from appliance.dicom import dicomio
from appliance.config import DuplicatePolicy, StoreConfig
from appliance.conformance import SOPClass, Status, TransferSyntax
from appliance.store.ingest import Ingest, Source
from helpers import ct_series, encode, sample, samples

NET = Source("SCANNER")


def offer(ingest, s, **kw):
    data = s.path.read_bytes()
    off, ts = dicomio.split_part10(data)
    return ingest.accept(data[off:], ts, sop_class_uid=kw.get("sop_class_uid", s.sop_class_uid),
                         sop_instance_uid=kw.get("sop_instance_uid", s.sop_instance_uid), source=NET)


STORABLE = [s for s in samples() if s.expected != "context-rejected"]


@pytest.mark.parametrize("s", STORABLE, ids=lambda s: s.name)
def test_manifest_outcome(ingest, s):
    if s.name.startswith("ct_ele_large__693_UNCI"):
        pytest.skip("its raw group length lies; covered by test_lying_pixel_group_length")
    out = offer(ingest, s)
    want = s.expected.removeprefix("strict:") == "store-success"
    assert out.ok is want, out.comment
    located = ingest.store.locate(s.sop_instance_uid)
    assert (located is not None) is want
    if not want:
        assert out.status != Status.SUCCESS and out.comment


@pytest.mark.parametrize("role", ["img_cs_ISO_IR_144", "img_iso2022_ir87", "rtstruct_cs_iso2022_IR87"])
def test_relaxed_charsets_are_stored_and_flagged(store, role):
    ingest = Ingest(store, StoreConfig(min_free_mb=0, charset_strict=False))
    out = offer(ingest, sample(role))
    assert out.ok and "flagged" in out.comment
    row = next(store.index.query("SELECT flags FROM instances"))
    assert row["flags"].startswith("charset:")


def test_stored_file_is_byte_exact_part10(ingest):
    s = sample("ct_be")
    data = s.path.read_bytes()
    off, ts = dicomio.split_part10(data)
    out = offer(ingest, s)
    stored = out.path.read_bytes()
    soff, sts = dicomio.split_part10(stored)
    assert stored[soff:] == data[off:] and sts == ts == TransferSyntax.EXPLICIT_BE
    a, b = pydicom.dcmread(s.path), pydicom.dcmread(out.path)
    assert (a.pixel_array == b.pixel_array).all() and a.PatientName == b.PatientName


def test_text_is_indexed_in_the_objects_character_set(ingest):
    s = sample("rtstruct_cs_ISO_IR_144")
    offer(ingest, s)
    name = next(ingest.store.index.query("SELECT patient_name FROM patients"))[0]
    assert name == str(pydicom.dcmread(s.path).PatientName) and any(ord(ch) > 0x400 for ch in name)


def test_uid_mismatches(ingest):
    s = sample("ct_ele")
    out = offer(ingest, s, sop_class_uid=SOPClass.MR_IMAGE)
    assert out.status == Status.DATASET_DOES_NOT_MATCH_SOP_CLASS and "does not match" in out.comment
    out = offer(ingest, s, sop_instance_uid="1.2.3.4")
    assert out.status == Status.REFUSED_UID_MISMATCH
    assert ingest.store.index.counts()["instances"] == 0


def test_lying_pixel_group_length(ingest):
    s = sample("ct_ele_large")  # real file: (7FE0,0000) says 105406, the group holds 524300
    out = offer(ingest, s)
    assert out.status == Status.REFUSED_PIXEL_DATA and "Group Length" in out.comment


@pytest.mark.parametrize("delta", [-2, 2, 100])
def test_pixel_data_of_the_wrong_size_is_refused(ingest, delta):
    ds = ct_series(1)[0]
    ds.PixelData = ds.PixelData[:delta] if delta < 0 else ds.PixelData + b"\0" * delta
    out = ingest.accept(encode(ds), TransferSyntax.EXPLICIT_LE, sop_class_uid=ds.SOPClassUID,
                        sop_instance_uid=ds.SOPInstanceUID, source=NET)
    assert out.status == Status.REFUSED_PIXEL_DATA and "need 512" in out.comment


def test_truncated_and_lying_data_sets_store_nothing(ingest):
    ds = ct_series(1)[0]
    body = encode(ds)
    for bad in (body[:-10], body[:200], body + b"\x00" * 3):
        out = ingest.accept(bad, TransferSyntax.EXPLICIT_LE, sop_class_uid=ds.SOPClassUID,
                            sop_instance_uid=ds.SOPInstanceUID, source=NET)
        assert out.status == Status.CANNOT_UNDERSTAND and "does not decode" in out.comment
    assert ingest.store.index.counts()["instances"] == 0
    assert list(ingest.store.objects.rglob("*")) == [] and list(ingest.store.tmp.iterdir()) == []


def test_missing_modality_and_pixel_data(ingest):
    ds = ct_series(1)[0]
    del ds.Modality
    out = ingest.accept(encode(ds), TransferSyntax.EXPLICIT_LE, sop_class_uid=ds.SOPClassUID,
                        sop_instance_uid=None, source=NET)
    assert out.status == Status.REFUSED_MODALITY and "(missing)" in out.comment
    ds = ct_series(1)[0]
    del ds.PixelData
    out = ingest.accept(encode(ds), TransferSyntax.EXPLICIT_LE, sop_class_uid=ds.SOPClassUID,
                        sop_instance_uid=None, source=NET)
    assert out.status == Status.REFUSED_PIXEL_DATA


def test_identical_resend_changes_nothing(ingest):
    s = sample("ct_ele")
    first = offer(ingest, s)
    mtime = first.path.stat().st_mtime_ns
    again = offer(ingest, s)
    assert again.ok and "already stored" in again.comment and first.path.stat().st_mtime_ns == mtime


def test_reencoding_of_a_stored_object_counts_as_identical(ingest):
    assert offer(ingest, sample("ct_ele")).ok
    for role in ("ct_ile", "ct_be"):
        out = offer(ingest, sample(role))
        assert out.ok and "already stored" in out.comment
    row = ingest.store.index.instance(sample("ct_ele").sop_instance_uid)
    assert row.transfer_syntax == TransferSyntax.EXPLICIT_LE


def _changed(ds):
    ds = copy.deepcopy(ds)
    ds.PatientName = "Changed^Name"
    return ds


def test_different_content_is_refused_by_default(ingest):
    ds = ct_series(1)[0]
    ok = ingest.accept(encode(ds), TransferSyntax.EXPLICIT_LE, sop_class_uid=ds.SOPClassUID,
                       sop_instance_uid=None, source=NET)
    out = ingest.accept(encode(_changed(ds)), TransferSyntax.EXPLICIT_LE, sop_class_uid=ds.SOPClassUID,
                        sop_instance_uid=None, source=NET)
    assert out.status == Status.REFUSED_DUPLICATE and "already stored" in out.comment
    assert pydicom.dcmread(ok.path).PatientName == ds.PatientName


def _stream(ingest, body, ts, ds, fragment=16384):
    """Offer ``body`` as the SCP does, fragment by fragment, and settle it."""
    incoming = ingest.open_stream(ts, ds.SOPClassUID, ds.SOPInstanceUID, "SCANNER")
    view = memoryview(body)
    for i in range(0, len(view), fragment):
        incoming.write(view[i:i + fragment])
    out = incoming.finish()
    incoming.settle()
    return out


def test_a_network_duplicate_is_compared_with_the_data_set_read_again(ingest):
    """The SCP unmaps a received object before its fsync, so a stored object with the same
    UID is compared with the data set read back from its temp file: identical bytes or the
    same values in another transfer syntax change nothing, different values are refused,
    and the temp file goes in every case."""
    ds = ct_series(1, rows=32, cols=32)[0]
    first = _stream(ingest, encode(ds, TransferSyntax.EXPLICIT_LE), TransferSyntax.EXPLICIT_LE, ds)
    assert first.ok and first.comment == "stored"
    mtime = first.path.stat().st_mtime_ns
    for ts in (TransferSyntax.EXPLICIT_LE, TransferSyntax.IMPLICIT_LE):
        again = _stream(ingest, encode(ds, ts), ts, ds)
        assert again.ok and "already stored" in again.comment, (ts, again.comment)
    changed = _stream(ingest, encode(_changed(ds), TransferSyntax.EXPLICIT_LE), TransferSyntax.EXPLICIT_LE, ds)
    assert changed.status == Status.REFUSED_DUPLICATE and "already stored" in changed.comment
    assert first.path.stat().st_mtime_ns == mtime and pydicom.dcmread(first.path).PatientName == ds.PatientName
    assert list(ingest.store.tmp.iterdir()) == []
    assert ingest.store.index.counts()["instances"] == 1


def test_replace_policy_keeps_the_previous_version(store):
    ingest = Ingest(store, StoreConfig(min_free_mb=0, duplicate_policy=DuplicatePolicy.REPLACE))
    ds = ct_series(1)[0]
    ingest.accept(encode(ds), TransferSyntax.EXPLICIT_LE, sop_class_uid=ds.SOPClassUID,
                  sop_instance_uid=None, source=NET)
    out = ingest.accept(encode(_changed(ds)), TransferSyntax.EXPLICIT_LE, sop_class_uid=ds.SOPClassUID,
                        sop_instance_uid=None, source=NET)
    assert out.ok and "previous, different version" in out.comment
    assert pydicom.dcmread(out.path).PatientName == "Changed^Name"
    [old] = list(store.superseded.iterdir())
    assert pydicom.dcmread(old).PatientName == ds.PatientName


@pytest.mark.parametrize("uid", ["../../../../etc/passwd", "/abs/x", "1.2.3/../../x", "..", "1." * 40])
def test_hostile_uids_stay_inside_the_store(ingest, tmp_path, uid):
    ds = ct_series(1)[0]
    ds.SOPInstanceUID = uid
    ds.SeriesInstanceUID = uid
    ds.StudyInstanceUID = uid
    out = ingest.accept(encode(ds), TransferSyntax.EXPLICIT_LE, sop_class_uid=ds.SOPClassUID,
                        sop_instance_uid=uid, source=NET)
    assert out.ok, out.comment
    assert out.path.resolve().is_relative_to(ingest.store.objects.resolve())
    assert ingest.store.locate(uid) == out.path


def test_below_watermark_is_out_of_resources(store):
    ingest = Ingest(store, StoreConfig(min_free_mb=2**40))
    out = offer(ingest, sample("ct_ele"))
    assert out.status == Status.OUT_OF_RESOURCES and "MiB free" in out.comment


def test_series_verdict_is_recorded(ingest):
    for ds in ct_series(6):
        ingest.accept(encode(ds), TransferSyntax.EXPLICIT_LE, sop_class_uid=ds.SOPClassUID,
                      sop_instance_uid=None, source=NET)
    bad = ct_series(4, spacing=2.0, thickness=5.0)
    for ds in bad:
        ingest.accept(encode(ds), TransferSyntax.EXPLICIT_LE, sop_class_uid=ds.SOPClassUID,
                      sop_instance_uid=None, source=NET)
    ingest.store.update_verdicts()
    rows = {r["series_uid"]: r for r in ingest.store.index.query("SELECT * FROM series")}
    good = rows[next(iter(rows))]
    assert good["volume_ok"] == 1 and "6 slices" in good["volume_reason"]
    assert rows[bad[0].SeriesInstanceUID]["volume_ok"] == 0
    assert "Slice Thickness 5.0" in rows[bad[0].SeriesInstanceUID]["volume_reason"]


def test_every_index_column_is_decoded():
    from appliance.dicom import attributes

    columns = {c for _, c, _ in attributes.COLUMNS} - {"charset"}
    assert columns == set(attributes._TAGS)


@pytest.mark.parametrize("s", [s for s in samples() if s.transfer_syntax in set(TransferSyntax)
                               and not s.transfer_syntax.startswith("1.2.840.10008.1.2.4")],
                         ids=lambda s: s.name)
def test_fast_attribute_decoding_agrees_with_pydicom(s):
    from appliance.dicom import attributes

    data = s.path.read_bytes()
    off, ts = dicomio.split_part10(data)
    syntax = TransferSyntax(ts)
    body = data[off:]
    got = attributes.read(body, dicomio.walk(body, syntax.is_implicit_vr, syntax.is_little_endian),
                          syntax.is_implicit_vr, syntax.is_little_endian)
    ds = pydicom.dcmread(s.path, stop_before_pixels=True)
    for keyword, column, _ in attributes.COLUMNS:
        if keyword not in ds or column == "charset" or ds[keyword].VM == 0:
            continue
        value = ds[keyword].value
        if column in ("patient_name", "patient_id", "manufacturer", "modality", "sop_instance_uid",
                      "study_uid", "series_uid"):
            assert got[column] == str(value), column
        elif column in ("rows", "columns", "bits_allocated", "samples_per_pixel", "number_of_frames",
                        "instance_number"):
            assert got[column] == int(value), column
        elif column in ("slice_thickness", "rescale_slope", "rescale_intercept"):
            assert got[column] == pytest.approx(float(value)), column
        elif column == "image_position_patient":
            assert [float(v) for v in got[column].split("\\")] == pytest.approx([float(v) for v in value])


def _with_private(ds, vr, value):
    """``ds`` encoded in Explicit VR LE with the private element (0009,1001) written by hand as ``vr``."""
    import struct

    from pydicom.dataset import Dataset

    low, high = Dataset(), Dataset()
    for elem in ds:
        (low if elem.tag < 0x00090000 else high).add(elem)
    raw = struct.pack("<HH2sH", 0x0009, 0x1001, vr, len(value)) + value
    return encode(low) + raw + encode(high)


@pytest.mark.parametrize("vr", [b"TS", b"LK"])
def test_an_unknown_vr_is_refused_every_time_it_is_sent(ingest, vr):
    ds = ct_series(1)[0]
    body = _with_private(ds, vr, b"ABCD")
    for again in (body, body, _with_private(_changed(ds), vr, b"WXYZ")):  # the same, then other content
        out = ingest.accept(again, TransferSyntax.EXPLICIT_LE, sop_class_uid=ds.SOPClassUID,
                            sop_instance_uid=ds.SOPInstanceUID, source=NET)
        assert out.status == Status.CANNOT_UNDERSTAND
        # An Error Comment (LO) keeps 64 characters: they name the tag and the VR.
        assert f"unknown VR '{vr.decode()}' in (0009,1001)" in out.comment[:64], out.comment
    assert ingest.store.index.counts()["instances"] == 0 and list(ingest.store.objects.rglob("*.dcm")) == []


def test_an_unknown_vr_leaves_the_stored_object_alone(ingest):
    ds = ct_series(1)[0]
    ok = ingest.accept(encode(ds), TransferSyntax.EXPLICIT_LE, sop_class_uid=ds.SOPClassUID,
                       sop_instance_uid=None, source=NET)
    stored = ok.path.read_bytes()
    for body in (_with_private(ds, b"TS", b"ABCD"), _with_private(_changed(ds), b"TS", b"ABCD")):
        out = ingest.accept(body, TransferSyntax.EXPLICIT_LE, sop_class_uid=ds.SOPClassUID,
                            sop_instance_uid=None, source=NET)
        assert out.status == Status.CANNOT_UNDERSTAND and "unknown VR 'TS'" in out.comment
    assert ok.path.read_bytes() == stored and ingest.store.index.counts()["instances"] == 1


def test_a_uid_with_a_trailing_newline_is_not_a_file_name(ingest):
    from appliance.store.store import path_component

    assert path_component("1.2.3") == "1.2.3"
    assert path_component("1.2.3\n") != "1.2.3\n" and "\n" not in path_component("1.2.3\n")
    ds = ct_series(1)[0]
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(ds, keyword, ds[keyword].value + "\n")
    out = ingest.accept(encode(ds), TransferSyntax.EXPLICIT_LE, sop_class_uid=ds.SOPClassUID,
                        sop_instance_uid=ds.SOPInstanceUID, source=NET)
    assert out.ok, out.comment
    parts = out.path.relative_to(ingest.store.objects).parts
    assert len(parts) == 3 and not any("\n" in p for p in parts), parts
    assert ingest.store.locate(ds.SOPInstanceUID) == out.path


def _both_ways(tmp_path, name, body, ts, sop_class_uid, uid, fragment):
    """Offer ``body`` as a network C-STORE in fragments of ``fragment`` bytes (what comes
    before the Pixel Data decoded while the rest arrives) and, to another store, whole (as
    a CD import: decoded after the last byte): return both outcomes and index rows."""
    from appliance.store.store import Store

    results: list[object] = []
    early = False
    for way in ("network", "whole"):
        store = Store(tmp_path / f"{name}-{fragment}-{way}")
        store.open_for_service()
        ingest = Ingest(store, StoreConfig(min_free_mb=0))
        if way == "network":
            incoming = ingest.open_stream(ts, sop_class_uid, uid, "SCANNER")
            view = memoryview(body)
            for i in range(0, len(view), fragment):
                incoming.write(view[i:i + fragment])
            early = incoming._early is not None  # decoded before the last byte
            out = incoming.finish()
            incoming.settle()
        else:
            out = ingest.accept(body, ts, sop_class_uid=sop_class_uid, sop_instance_uid=uid, source=NET)
        row = store.instance(uid)
        results.append((out.status, out.comment, None if row is None else
                        {k: v for k, v in vars(row).items() if k not in ("received_at", "calling_ae", "origin")}))
        store.close(clean=False)
    return results, early


@pytest.mark.parametrize("fragment", [7, 4096, 65530])
def test_a_network_object_decoded_while_it_arrives_is_judged_as_a_whole_one(tmp_path, fragment):
    """The SCP decodes what precedes the Pixel Data while the pixels still arrive: for every
    sample, and for data sets with elements after the Pixel Data (an attribute the index
    reads, a duplicate, padding, a truncation), the outcome and the index row are those
    of decoding the whole data set after the last byte."""
    cases = []
    for s in samples():
        data = s.path.read_bytes()
        off, ts = dicomio.split_part10(data)
        if fragment == 7 and len(data) > 200_000:
            continue  # one byte at a time, in effect; the larger fragments take these
        cases.append((s.name, data[off:], ts, s.sop_class_uid, s.sop_instance_uid))
    ds = ct_series(1, rows=16, cols=16)[0]
    body = encode(ds)
    uid = str(ds.SOPInstanceUID)
    lo = b"\x08\x00\x70\x00LO\x04\x00LATE"  # Manufacturer (0008,0070) after the Pixel Data
    modality = b"\x08\x00\x60\x00CS\x02\x00MR"  # a second Modality
    padding = b"\xfc\xff\xfc\xffOB\x00\x00\x04\x00\x00\x00\x00\x00\x00\x00"
    for name, extra in (("late-attribute", lo), ("twice", modality), ("padding", padding),
                        ("cut", None), ("cut-header", b"")):
        late = body[:-3] if extra is None else body[:200] if name == "cut-header" else body + extra
        cases.append((name, late, TransferSyntax.EXPLICIT_LE, str(ds.SOPClassUID), uid))
    early = []
    for name, data, ts, sop_class_uid, sop_uid in cases:
        (network, whole), was_early = _both_ways(tmp_path, name, data, ts, sop_class_uid, sop_uid, fragment)
        assert network == whole, name
        if was_early:
            early.append(name)
    assert len(cases) >= 10 and len(early) >= 10, early
    assert {"late-attribute", "twice", "padding", "cut"} <= set(early)


def test_the_next_objects_temp_file_is_made_after_the_answer(tmp_path):
    """After a stored object is answered and indexed (settle), the SCP makes the next
    object's temp file, so that creating it is not on the next sender's path: the next
    object is written into that very file, at most SPARE_TEMPS wait empty, nothing but
    them is left in tmp/, and closing the store removes them."""
    from appliance.store.ingest import SPARE_TEMPS
    from appliance.store.store import Store

    store = Store(tmp_path / "data")
    store.open_for_service()
    ingest = Ingest(store, StoreConfig(min_free_mb=0))
    series = ct_series(SPARE_TEMPS + 2, rows=16, cols=16)
    spares: list[int] = []
    for ds in series:
        waiting = list(store.tmp.iterdir())
        assert len(waiting) == min(len(spares), 1) and all(p.stat().st_size == 0 for p in waiting), waiting
        out = _stream(ingest, encode(ds, TransferSyntax.EXPLICIT_LE), TransferSyntax.EXPLICIT_LE, ds)
        assert out.ok and out.comment == "stored", out.comment
        if spares:
            assert out.path.stat().st_ino == spares[-1]  # written into the file made ahead
        (spare,) = store.tmp.iterdir()
        spares.append(spare.stat().st_ino)
    for _ in range(SPARE_TEMPS + 1):
        store.make_spare_temp(SPARE_TEMPS)
    assert len(list(store.tmp.iterdir())) == SPARE_TEMPS
    store.close()
    assert list(store.tmp.iterdir()) == []
    store.make_spare_temp(SPARE_TEMPS)  # a late association thread after the close: nothing is left
    assert list(store.tmp.iterdir()) == []
    again = _stream(ingest, encode(series[0], TransferSyntax.EXPLICIT_LE), TransferSyntax.EXPLICIT_LE, series[0])
    assert again.ok and "already stored" in again.comment  # used again after the close: spares again
    store.make_spare_temp(SPARE_TEMPS)
    assert len(list(store.tmp.iterdir())) == 1
    store.close()
    assert list(store.tmp.iterdir()) == []
    assert [pydicom.dcmread(p).SOPInstanceUID for p in sorted(store.objects.rglob("*.dcm"))] == sorted(
        ds.SOPInstanceUID for ds in series)
