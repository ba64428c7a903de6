"""The DICOMDIR encoder (appliance/media/dicomdir.py) uses two private parts of pydicom's
FileSet. This pins what they produce, byte for byte, for a fixed file-set: an upgrade of
pydicom (pinned at 3.0.2 in pyproject.toml) that changes them fails here, not on a stick."""

from __future__ import annotations

import hashlib
from io import BytesIO

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ImplicitVRLittleEndian

from appliance.conformance import SOPClass
from appliance.media import dicomdir

#: sha256 of the DICOMDIR below as pydicom 3.0.2 encodes it.
PINNED = "049d067b7da54e6c274689fe5fe384b5c2eacce4056599a9f3b1bef7a6f00b6e"


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
    for n in (1, 2):
        dicomdir.add(fs, _header(n), f"DICOM/STAAAAAA/SEBBBBBB/IM00000{n}")
    return dicomdir.encode(fs)


def test_the_dicomdir_names_our_files_and_reads_back(tmp_path):
    data = _encoded(tmp_path)
    ds = dcmread(BytesIO(data))
    assert ds.FileSetID == dicomdir.FILE_SET_ID
    kinds = [r.DirectoryRecordType for r in ds.DirectoryRecordSequence]
    assert kinds == ["PATIENT", "STUDY", "SERIES", "IMAGE", "IMAGE"]
    images = [r for r in ds.DirectoryRecordSequence if r.DirectoryRecordType == "IMAGE"]
    assert [list(r.ReferencedFileID) for r in images] == [
        ["DICOM", "STAAAAAA", "SEBBBBBB", f"IM00000{n}"] for n in (1, 2)]
    assert [r.ReferencedSOPInstanceUIDInFile for r in images] == [f"1.2.826.0.1.3680043.10.9.77.{n}" for n in (1, 2)]


def test_the_dicomdir_bytes_are_pinned(tmp_path):
    first = _encoded(tmp_path / "a")
    assert first == _encoded(tmp_path / "b")  # deterministic
    assert hashlib.sha256(first).hexdigest() == PINNED
