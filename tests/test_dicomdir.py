"""The DICOMDIR encoder (appliance/media/dicomdir.py) uses private parts of pydicom's
FileSet. This pins what they produce, byte for byte, for a fixed file-set: an upgrade of
pydicom (pinned at 3.0.2 in pyproject.toml) that changes them fails here, not on a stick.
The values of the record keys (dicomdir.Keys) are tested here too."""

from __future__ import annotations

import hashlib
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
)

from appliance.conformance import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    SOPClass,
    TransferSyntax,
)
from appliance.dicom import dicomio
from appliance.dicom.transcode import TranscodeError, to_implicit_le
from appliance.media import dicomdir

from helpers import ct_series, encode, samples

#: sha256 of the DICOMDIR below as pydicom 3.0.2 encodes it, with the appliance's identity in its meta.
PINNED = "bac068d591bfd2080b26bbae4045536a28fd61534a92452cd30985a41f04fb45"


def _header(n: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SOPClass.CT_IMAGE
    ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.10.9.77.{n}"
    ds.SOPClassUID = SOPClass.CT_IMAGE
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.9.77.{n}"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.9.77.100"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.9.77.200"
    ds.PatientID = "PIN-1"
    ds.PatientName = "Pinned^Test"
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.SeriesNumber = 3
    ds.InstanceNumber = n
    return ds


def _encoded(tmp_path) -> bytes:  # type: ignore[no-untyped-def]
    fs = dicomdir.load(tmp_path)  # no DICOMDIR there: a new, empty set
    fs.UID = "1.2.826.0.1.3680043.10.9.77.1000"
    records = dicomdir.Records(fs)
    for n in (1, 2):
        records.add(_header(n), f"DICOM/STAAAAAA/SEBBBBBB/IM00000{n}")
    return dicomdir.encode(fs)


def test_the_dicomdir_names_our_files_and_reads_back(tmp_path):
    data = _encoded(tmp_path)
    ds = dcmread(BytesIO(data))
    assert ds.FileSetID == dicomdir.FILE_SET_ID
    # PS3.10 8.6 / PS3.11: the DICOMDIR itself in Explicit VR LE, written by the appliance (as
    # its files' meta says); each record names its file's syntax, Implicit VR LE (Table 10).
    assert ds.file_meta.MediaStorageSOPClassUID == MediaStorageDirectoryStorage
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert ds.file_meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME
    kinds = [r.DirectoryRecordType for r in ds.DirectoryRecordSequence]
    assert kinds == ["PATIENT", "STUDY", "SERIES", "IMAGE", "IMAGE"]
    images = [r for r in ds.DirectoryRecordSequence if r.DirectoryRecordType == "IMAGE"]
    assert [list(r.ReferencedFileID) for r in images] == [
        ["DICOM", "STAAAAAA", "SEBBBBBB", f"IM00000{n}"] for n in (1, 2)]
    assert [r.ReferencedSOPInstanceUIDInFile for r in images] == [f"1.2.826.0.1.3680043.10.9.77.{n}" for n in (1, 2)]
    assert {r.ReferencedTransferSyntaxUIDInFile for r in images} == {ImplicitVRLittleEndian}
    assert {r.ReferencedSOPClassUIDInFile for r in images} == {SOPClass.CT_IMAGE}


def test_the_dicomdir_bytes_are_pinned(tmp_path):
    first = _encoded(tmp_path / "a")
    assert first == _encoded(tmp_path / "b")  # deterministic
    assert hashlib.sha256(first).hexdigest() == PINNED


def test_legacy_dates_and_times_become_da_and_tm_and_what_is_no_date_becomes_empty():
    assert [dicomdir.dicom_date(v) for v in ("1995.05.01", "19950501", " 20040119 ", "1995-05-01", "20041340", "")] == [
        "19950501", "19950501", "20040119", "", "", ""]
    assert [dicomdir.dicom_time(v) for v in ("15:26:10", "16:22:53.770000", "11:42", "072730", "1200",
                                             "094836.214743984", "25:00", "15:26:10:01")] == [
        "152610", "162253.770000", "1142", "072730", "1200", "094836.214743", "", ""]


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # the legacy values written here on purpose
def test_keys_convert_legacy_values_and_complete_empty_type_1_keys_only():
    keys = dicomdir.Keys(dicomdir.load(Path("/nonexistent")))
    ds = _header(1)
    ds.StudyDate, ds.StudyTime = "1995.05.01", "15:26:10"
    ds.StructureSetDate = "not a date"  # a Type 2 key of RT records (if this were one): emptied, not invented
    assert keys.complete(ds, "2026-11-30T15:24:29.965+00:00") == {
        "StudyDate": "19950501", "StudyTime": "152610", "StructureSetDate": ""}
    ds = _header(2)
    del ds.PatientID
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.InstanceNumber = "", "", "", None
    ds.AccessionNumber, ds.PatientName = "", ""  # Type 2 in the records: stay empty
    ds.AcquisitionDate, ds.ContentTime = "2024.01.03", "09:30"
    done = keys.complete(ds, "2026-11-30T15:24:29.965+00:00")
    assert done == {"PatientID": dicomdir.generated_id("patient", ds.StudyInstanceUID), "StudyDate": "20240103",
                    "StudyTime": "0930", "StudyID": dicomdir.generated_id("study", ds.StudyInstanceUID),
                    "InstanceNumber": "1"}
    keys.listed(dicomdir.record_source(ds, done))
    # The next object of the study takes what its records say; the next of the series the next number.
    ds = _header(3)
    del ds.PatientID
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.InstanceNumber = "", "", "", ""
    assert keys.complete(ds, "2027-01-01T00:00:00+00:00") == {k: v for k, v in done.items() if k != "InstanceNumber"} | {
        "InstanceNumber": "2"}
    # Nothing in the object dates it: the time the box received it.
    ds = _header(4)
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = "1.2.826.0.1.3680043.10.9.77.101", "", ""
    assert keys.complete(ds, "2026-11-30T15:24:29.965+00:00") == {"StudyDate": "20261130", "StudyTime": "152429"}


def test_generated_ids_are_deterministic_per_study_and_fit_their_vrs():
    a, b = "1.2.826.0.1.3680043.10.9.77.100", "1.2.826.0.1.3680043.10.9.77.101"
    assert dicomdir.generated_id("patient", a) == dicomdir.generated_id("patient", a)
    assert len({dicomdir.generated_id(kind, uid) for kind in ("patient", "study") for uid in (a, b)}) == 4
    assert all(len(dicomdir.generated_id("study", uid)) <= 16 for uid in (a, b))  # SH


def test_a_record_keeps_its_character_set_only_if_one_of_its_keys_needs_it():
    ascii_name = _header(1)
    ascii_name.SpecificCharacterSet = "ISO_IR 100"
    assert "SpecificCharacterSet" not in dicomdir.record_source(ascii_name, {})
    latin = _header(1)
    latin.SpecificCharacterSet, latin.PatientName = "ISO_IR 100", "Buc^J\u00e9r\u00f4me"
    buf = BytesIO()
    latin.save_as(buf, implicit_vr=True, little_endian=True, enforce_file_format=True)
    for header in (latin, dcmread(BytesIO(buf.getvalue()))):  # decoded, and raw as read from a file
        assert dicomdir.record_source(header, {}).SpecificCharacterSet == "ISO_IR 100"


def _kinds() -> list[Dataset]:
    """Instances of two patients, three studies and five series, with each record type the
    exporter writes (IMAGE, RT STRUCTURE SET, RT PLAN, RT DOSE), series interleaved."""
    out = []
    for n, (patient, study, series, sop_class) in enumerate([
        ("P1", 100, 200, SOPClass.CT_IMAGE), ("P1", 100, 201, SOPClass.RT_STRUCTURE_SET),
        ("P1", 100, 200, SOPClass.CT_IMAGE), ("P2", 101, 202, SOPClass.MR_IMAGE),
        ("P1", 102, 203, SOPClass.RT_PLAN), ("P1", 100, 200, SOPClass.CT_IMAGE),
        ("P2", 101, 204, SOPClass.RT_DOSE), ("P2", 101, 202, SOPClass.MR_IMAGE),
    ], start=10):
        ds = _header(n)
        ds.PatientID, ds.PatientName = patient, f"Patient^{patient}"
        ds.StudyInstanceUID = f"1.2.826.0.1.3680043.10.9.77.{study}"
        ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.10.9.77.{series}"
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.StructureSetLabel, ds.RTPlanLabel, ds.DoseSummationType = "SS", "PLAN", "PLAN"
        if sop_class != SOPClass.RT_PLAN:
            del ds.RTPlanLabel  # pydicom takes any object with an RT Plan Label for an RT PLAN
        out.append(ds)
    return out


def test_records_list_what_pydicoms_own_fileset_add_lists(tmp_path):
    """Records (which finds listed records by key and makes only the missing ones) gives,
    byte for byte, the DICOMDIR that pydicom's FileSet.add gives, for a new set and for one
    loaded from a stick and added to."""
    headers = _kinds()

    def by_pydicom(fs, instances):  # what dicomdir.add did before Records
        for ds in instances:
            fs.add(ds).node._record.ReferencedFileID = ["DICOM", "ST", "SE", f"IM{ds.InstanceNumber}"]

    def by_records(fs, instances):
        records = dicomdir.Records(fs)
        for ds in instances:
            records.add(ds, f"DICOM/ST/SE/IM{ds.InstanceNumber}")

    encoded = []
    for add in (by_pydicom, by_records):
        fs = dicomdir.load(tmp_path / "none")
        fs.UID = "1.2.826.0.1.3680043.10.9.77.1000"
        add(fs, headers[:5])
        first = dicomdir.encode(fs)
        stick = tmp_path / add.__name__
        (stick / "DICOM/ST/SE").mkdir(parents=True)
        (stick / "DICOMDIR").write_bytes(first)
        for ds in headers[:5]:  # pydicom drops a listed instance whose file is missing
            (stick / f"DICOM/ST/SE/IM{ds.InstanceNumber}").touch()
        fs = dicomdir.load(stick)
        add(fs, headers[5:] + headers[:1])  # the last is listed already: left as it is
        encoded.append((first, dicomdir.encode(fs)))
    assert encoded[0] == encoded[1]
    kinds = [r.DirectoryRecordType for r in dcmread(BytesIO(encoded[1][1])).DirectoryRecordSequence]
    assert kinds.count("PATIENT") == 2 and kinds.count("STUDY") == 3 and kinds.count("SERIES") == 5
    assert {"IMAGE", "RT STRUCTURE SET", "RT PLAN", "RT DOSE"} <= set(kinds) and len(kinds) == 10 + len(headers)  # IM10 once


def test_the_header_from_the_walk_gives_what_pydicom_reading_the_file_gives():
    """dicomdir.header (the record keys, taken from dicomio.walk's layout) makes the same
    record sources and the same completed keys as pydicom reading the whole file, for every
    sample that transcodes (character sets, legacy dates, RT objects, missing IDs)."""
    checked = 0
    for sample in samples():
        try:
            t = to_implicit_le(sample.path)
        except TranscodeError:
            continue
        layout = dicomio.walk(t.body, True, True)
        cheap = dicomdir.header(t.body, layout.elements, t.sop_class_uid, t.sop_instance_uid)
        full = dcmread(BytesIO(t.part10()), stop_before_pixels=True)
        keys = [dicomdir.Keys(dicomdir.load(Path("/nonexistent"))) for _ in range(2)]
        values = [k.complete(ds, "2026-11-30T15:24:29.965+00:00") for k, ds in zip(keys, (cheap, full))]
        assert values[0] == values[1], sample.path
        sources = [dicomdir.record_source(ds, values[0]) for ds in (cheap, full)]
        assert sources[0] == sources[1], sample.path
        assert sources[0].file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        checked += 1
    assert checked >= 20


_RECEIVED_AT = "2026-11-30T15:24:29.965+00:00"


def _implicit_bodies() -> list[tuple[bytes, str, str]]:
    """(Implicit VR LE data set, SOP Class UID, SOP Instance UID) of every sample that
    transcodes and pydicom's FileSet takes, each UID once, and of generated objects: a CT
    series and an MR series of one study, Instance Numbers as pydicom keeps them ("007",
    "+5") and a missing one, and the record kinds of _kinds()."""
    out: dict[str, tuple[bytes, str, str]] = {}
    for sample in samples():
        try:
            t = to_implicit_le(sample.path)
        except TranscodeError:
            continue
        out.setdefault(t.sop_instance_uid, (t.body, t.sop_class_uid, t.sop_instance_uid))
    study = "1.2.826.0.1.3680043.10.9.77.500"
    generated = ct_series(4, study_uid=study) + ct_series(2, study_uid=study)
    for ds in generated[4:]:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SOPClass.MR_IMAGE
        ds.Modality = "MR"
    generated[1].InstanceNumber = "007"
    generated[2].InstanceNumber = "+5"
    del generated[3].InstanceNumber
    del generated[0].StudyDate  # completed from the series (none), then from the time received
    for ds in generated + _kinds():
        body = encode(ds, TransferSyntax.IMPLICIT_LE)
        out.setdefault(str(ds.SOPInstanceUID), (body, str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
    taken = []
    for body, sop_class, uid in out.values():  # what pydicom's FileSet refuses, both refuse alike
        try:
            dicomdir.load(Path("/nonexistent")).add(_sources([(body, sop_class, uid)])[0])
        except ValueError:
            continue
        taken.append((body, sop_class, uid))
    return taken


def _sources(bodies: list[tuple[bytes, str, str]]) -> list[dicomdir.Header]:
    """The record sources the exporter makes of ``bodies``, keys completed in turn."""
    keys = dicomdir.Keys(dicomdir.load(Path("/nonexistent")))
    out = []
    for body, sop_class, uid in bodies:
        header = dicomdir.header(body, dicomio.walk(body, True, True).elements, sop_class, uid)
        source = dicomdir.record_source(header, keys.complete(header, _RECEIVED_AT))
        keys.listed(source)
        out.append(source)
    return out


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
def test_records_made_in_bytes_are_what_pydicom_makes_of_every_sample(tmp_path):
    """The IMAGE records Records encodes itself (from the record sources, no pydicom Dataset)
    and the DICOMDIR around them are byte for byte what pydicom's FileSet.add and its
    encoder give, for the samples and generated series, in a new set and in one loaded from
    a stick and added to."""
    bodies = _implicit_bodies()
    assert len(bodies) >= 30
    half = len(bodies) // 2
    file_ids = [f"DICOM/ST{n // 8:06d}/SE{n // 4:06d}/IM{n:06d}" for n in range(len(bodies))]

    def by_pydicom(fs, sources, ids):  # type: ignore[no-untyped-def]
        for source, file_id in zip(sources, ids, strict=True):
            fs.add(source).node._record.ReferencedFileID = file_id.split("/")
        return 0

    def by_records(fs, sources, ids):  # type: ignore[no-untyped-def]
        records = dicomdir.Records(fs)
        for source, file_id in zip(sources, ids, strict=True):
            records.add(source, file_id)
        return sum(type(node) is dicomdir._EncodedNode for node in fs._tree)

    encoded = []
    for add in (by_pydicom, by_records):
        sources = _sources(bodies)  # anew: pydicom converts the elements it reads in place
        fs = dicomdir.load(tmp_path / "none")
        fs.UID = "1.2.826.0.1.3680043.10.9.77.1000"
        made = add(fs, sources[:half], file_ids[:half])
        first = dicomdir.encode(fs)
        stick = tmp_path / add.__name__
        stick.mkdir()
        (stick / "DICOMDIR").write_bytes(first)
        for file_id in file_ids[:half]:  # pydicom drops a listed instance whose file is missing
            (stick / file_id).parent.mkdir(parents=True, exist_ok=True)
            (stick / file_id).touch()
        fs = dicomdir.load(stick)
        made += add(fs, sources[half:], file_ids[half:])
        encoded.append((first, dicomdir.encode(fs), made))
    assert encoded[0][:2] == encoded[1][:2]
    assert encoded[1][2] >= 20  # most records were made in bytes
    records = dcmread(BytesIO(encoded[1][1])).DirectoryRecordSequence
    assert {"007", "+5"} <= {str(r.get("InstanceNumber", "")) for r in records}
