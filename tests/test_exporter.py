"""USB export: a DICOM file-set with a DICOMDIR, values identical to the store, safe on bad media.

What runs where (the kernel here has no vfat): the writer itself is exercised on folder
targets (the host file system, and a tmpfs mounted here for the unmount-mid-write case);
real FAT images built with mtools ``mformat`` are exported to in userspace through the
exporter's FAT-image target (free space as FAT reports it, a second export onto the same
image), and their content is read back out with ``mcopy`` for checking. The kernel mount
path of a block device is only tested for its refusal here; mounting a real stick is tested
inside the QEMU image.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.fileset import FileInstance, FileSet, is_conformant_file_id
from pydicom.tag import Tag
from pydicom.uid import generate_uid

from appliance.dicom import attributes, dicomio

from appliance import cli, config

from appliance.media import dicomdir, exporter, usbtarget
from appliance.config import Config, ExportPolicy, StoreConfig, UsbConfig
from appliance.conformance import SOPClass, TransferSyntax
from appliance.errors import ConfigError, MediaError
from appliance.media.exporter import TOP, ExportStatus, FileOutcome, Selection, SelectionMode, export
from appliance.media.importer import ImportOutcome, run_import
from appliance.reports import Progress
from appliance.store.ingest import Ingest, Source
from appliance.store.queue import ExportQueue
from appliance.store.store import Store

from helpers import SAMPLES, ct_series, dcmtk, encode, samples

_SWAP = {"US": 2, "SS": 2, "OW": 2, "UL": 4, "SL": 4, "FL": 4, "OF": 4, "OL": 4, "FD": 8, "OD": 8}
pytestmark = pytest.mark.skipif(shutil.which("mformat") is None, reason="mtools is not installed")


# -- helpers -------------------------------------------------------------------------------


def _fill(store: Store, paths: list[Path]) -> int:
    ingest = Ingest(store, StoreConfig(min_free_mb=0))
    n = 0
    for p in paths:
        data = p.read_bytes()
        offset, ts = dicomio.split_part10(data)
        sop_class = str(dcmread(p, stop_before_pixels=True).SOPClassUID)
        outcome = ingest.accept(memoryview(data)[offset:], ts, sop_class_uid=sop_class, sop_instance_uid=None,
                                source=Source(None, "test"))
        n += outcome.ok
    return n


def _storable() -> list[Path]:
    """Every sample the store accepts; the Big Endian re-encodings first, so that they (and
    not their identical Little Endian twins) are the stored copies."""
    ok = [s for s in samples() if s.expected == "store-success"]
    return [s.path for s in sorted(ok, key=lambda s: s.transfer_syntax != TransferSyntax.EXPLICIT_BE)]


def _put_generated(store: Store, datasets: list[Dataset], ts: str = TransferSyntax.EXPLICIT_LE) -> None:
    """Put objects straight into the store (e.g. RT Dose, which the Storage Server refuses)."""
    for ds in datasets:
        body = encode(ds, ts)
        syntax = TransferSyntax(ts)
        layout = dicomio.walk(body, syntax.is_implicit_vr, syntax.is_little_endian)
        attrs = attributes.read(body, layout, syntax.is_implicit_vr, syntax.is_little_endian)
        store.put(dicomio.file_meta(ds.SOPClassUID, ds.SOPInstanceUID, ts), body, attrs, ts,
                  calling_ae=None, origin="test")


def _value(elem, big: bool):  # type: ignore[no-untyped-def]
    value = elem.value
    if value in (None, "", b"") or (isinstance(value, list) and not value):
        return None
    if isinstance(value, bytes):
        size = _SWAP.get(elem.VR, 1)
        if big and size > 1 and len(value) % size == 0:
            value = np.frombuffer(value, dtype=f">u{size}").astype(f"<u{size}").tobytes()
        return value
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [str(v) for v in value]
    return str(value)


def assert_same_values(orig: Dataset, new: Dataset, big: bool, path: str = "",
                       completed: frozenset[int] = frozenset()) -> None:
    """Every element of the stored ``orig`` is in ``new`` with the same value (Pixel Data and
    group lengths are compared elsewhere, the top-level tags ``completed`` by
    :func:`completed_keys`); implicit VR is read with the original's VR."""
    keys = lambda ds: {t for t in ds.keys() if t.element != 0 and t != 0x7FE00010} - completed  # noqa: E731
    assert keys(orig) == keys(new), f"{path}: tags differ: {sorted(keys(orig) ^ keys(new))}"
    for tag in sorted(keys(orig)):
        a, raw, b = orig[tag], new.get_item(tag), new[tag]
        if b.VR != a.VR and isinstance(raw, RawDataElement):
            b = convert_raw_data_element(raw._replace(VR=a.VR), ds=new)
        if a.VR == "SQ":
            assert len(a.value) == len(b.value), f"{path}{tag}"
            for i, (ia, ib) in enumerate(zip(a.value, b.value)):
                assert_same_values(ia, ib, big, f"{path}{tag}[{i}]")
        else:
            assert _value(a, big) == _value(b, False), f"{path}{tag}"


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def completed_keys(orig: Dataset, new: Dataset, instance: FileInstance) -> frozenset[int]:
    """The tags of the record keys the exporter changed in the copy ``new`` of ``orig``: only
    keys dicomdir.Keys may change, only an empty value completed or a date or time converted
    from its legacy form (or, if it is no date or time at all, replaced like an empty one),
    and always to the value of the instance's directory record: file and record agree."""
    convert = {"DA": dicomdir.dicom_date, "TM": dicomdir.dicom_time}
    changed = set()
    for keyword in dicomdir.COMPLETED_KEYS:
        before, after = _text(orig, keyword), _text(new, keyword)
        if before == after:
            continue
        readable = convert.get(dictionary_VR(keyword), lambda v: v)(before)
        assert not readable or after == readable, f"{instance.SOPInstanceUID}: {keyword} {before!r} -> {after!r}"
        assert after == str(instance[keyword].value).strip(), f"{instance.SOPInstanceUID}: {keyword}"
        changed.add(int(Tag(keyword)))
    return frozenset(changed)


def check_file_set(root: Path, store: Store, expected: set[str]) -> None:
    """The file-set under ``root`` lists exactly ``expected`` and every file matches the store
    (but for the record keys the exporter completes, which match the file's records)."""
    fs = FileSet(root / "DICOMDIR")
    assert {str(i.SOPInstanceUID) for i in fs} == expected
    files = []
    for inst in fs:
        file_id = Path(*inst.ReferencedFileID)
        assert is_conformant_file_id(file_id) and len(file_id.parts) <= 8, file_id
        assert inst.TransferSyntaxUID == TransferSyntax.IMPLICIT_LE
        new = dcmread(inst.path)
        assert new.file_meta.TransferSyntaxUID == TransferSyntax.IMPLICIT_LE
        assert new.file_meta.MediaStorageSOPClassUID == inst.SOPClassUID == new.SOPClassUID
        stored_path = store.locate(str(inst.SOPInstanceUID))
        assert stored_path is not None
        orig = dcmread(stored_path)
        assert_same_values(orig, new, big=orig.file_meta.TransferSyntaxUID == TransferSyntax.EXPLICIT_BE,
                           completed=completed_keys(orig, new, inst))
        if "PixelData" in orig:
            assert np.array_equal(orig.pixel_array, new.pixel_array), inst.SOPInstanceUID
        files.append(inst.path)
    assert not list(root.rglob("*.TMP"))
    dump = _tool(dcmtk("dcmdump"), "-q", str(root / "DICOMDIR"))
    assert dump.returncode == 0 and "DirectoryRecordSequence" in dump.stdout, dump.stderr
    for f in files:
        assert _tool(dcmtk("dcmdump"), "-q", "-dc", f).returncode == 0, f
    ftest = _tool(dcmtk("dcmftest"), *files)
    assert ftest.returncode == 0 and ftest.stdout.count("yes:") == len(files), ftest.stdout


def _tool(*cmd: str) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK or mtools command; its output may hold Latin-1 names, so decode leniently."""
    done = subprocess.run(cmd, capture_output=True, timeout=120)
    return subprocess.CompletedProcess(cmd, done.returncode, done.stdout.decode("utf-8", "replace"),
                                       done.stderr.decode("utf-8", "replace"))


def _instances(store: Store) -> set[str]:
    return {r.sop_instance_uid for r in store.instances()}


def _store_state(store: Store) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in store.objects.rglob("*.dcm")}


def _fat_image(path: Path, kib: int) -> Path:
    subprocess.run(["truncate", "-s", f"{kib}K", str(path)], check=True)
    subprocess.run(["mformat", "-i", str(path), "::"], check=True, capture_output=True)
    return path


def _mcopy_out(image: Path, dest: Path) -> Path:
    dest.mkdir()
    subprocess.run(["mcopy", "-i", str(image), "-s", "-n", "-m", "::/*", str(dest)], check=True,
                   capture_output=True)
    return dest


class _state:
    """The export queue and history, opened and closed."""

    def __init__(self, store: Store) -> None:
        self.state = ExportQueue(store.data_dir)

    def __enter__(self) -> ExportQueue:
        return self.state

    def __exit__(self, *exc: object) -> None:
        self.state.close()


def _studies(store: Store) -> list[str]:
    return store.study_uids()


# -- folder targets ---------------------------------------------------------------------------


def test_every_storable_sample_is_exported_as_implicit_le_with_identical_values(
    store: Store, tmp_path: Path
) -> None:
    assert _fill(store, _storable()) > 20
    syntaxes = {r.transfer_syntax for r in store.instances()}
    assert {TransferSyntax.IMPLICIT_LE, TransferSyntax.EXPLICIT_LE, TransferSyntax.EXPLICIT_BE} <= syntaxes
    stick = tmp_path / "stick"
    stick.mkdir()
    seen = []
    report = export(stick, store, Config(), progress=seen.append)
    assert report.ok and report.status is ExportStatus.DONE and report.safe_to_remove, report.render()
    assert report.count(FileOutcome.WRITTEN) == len(_instances(store))
    assert seen[-1].files_done == seen[-1].files_total and seen[-1].bytes_done == report.bytes_done
    assert "safe to remove" in report.summary()
    check_file_set(stick, store, _instances(store))


def test_rt_dose_and_plan_are_written_when_the_store_holds_them(store: Store, tmp_path: Path) -> None:
    ct = ct_series(2)
    dose, plan = Dataset(), Dataset()
    for ds, cls, modality in ((dose, SOPClass.RT_DOSE, "RTDOSE"), (plan, SOPClass.RT_PLAN, "RTPLAN")):
        for k in ("SpecificCharacterSet", "PatientName", "PatientID", "StudyInstanceUID", "StudyDate", "StudyTime"):
            setattr(ds, k, ct[0].get(k))
        ds.SOPClassUID, ds.Modality = str(cls), modality
        ds.SOPInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SeriesNumber, ds.InstanceNumber = 9, 1
    dose.DoseSummationType, dose.DoseUnits, dose.DoseType = "PLAN", "GY", "PHYSICAL"
    plan.RTPlanLabel = "PLAN1"
    _put_generated(store, ct)
    _put_generated(store, [dose, plan], TransferSyntax.EXPLICIT_BE)
    stick = tmp_path / "stick"
    stick.mkdir()
    report = export(stick, store, Config(), Selection(SelectionMode.ALL))
    assert report.ok and report.count(FileOutcome.WRITTEN) == 4, report.render()
    check_file_set(stick, store, _instances(store))
    types = {r.DirectoryRecordType for r in dcmread(stick / "DICOMDIR").DirectoryRecordSequence}
    assert {"RT DOSE", "RT PLAN", "IMAGE"} <= types


def test_a_second_export_adds_to_the_file_set_and_never_rewrites_it(store: Store, tmp_path: Path) -> None:
    _put_generated(store, ct_series(3))
    _put_generated(store, ct_series(2, patient="Other^Patient"))
    first, second = _studies(store)
    stick = tmp_path / "stick"
    stick.mkdir()
    assert export(stick, store, Config(), Selection.explicit(studies=(first,))).ok
    # Retention may delete what reached a stick: the first study, not the second.
    assert set(store.marks.get()) == {first} and store.marks.get()[first].delivered_to.startswith("USB stick")
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in stick.rglob("*") if p.is_file()
              and p.name != "DICOMDIR"}
    report = export(stick, store, Config(), Selection.explicit(studies=(first, second)))
    assert report.ok and report.count(FileOutcome.WRITTEN) == 2 and report.count(FileOutcome.ON_STICK) == 3
    assert set(store.marks.get()) == {first, second}
    from appliance import audit

    exports = [e for e in audit.read(store.data_dir) if e["event"] == "Export"]
    assert [sum(st["objects"] for st in e["studies"]) for e in exports] == [3, 2]
    assert exports[0]["participants"][0]["address"].startswith("USB stick")
    assert all((p.stat().st_ino, p.stat().st_mtime_ns) == v for p, v in before.items())
    check_file_set(stick, store, _instances(store))


def test_a_stick_pulled_mid_write_fails_cleanly_and_the_next_export_completes_it(
    store: Store, tmp_path: Path
) -> None:
    _put_generated(store, ct_series(5))
    stick = tmp_path / "stick"
    stick.mkdir()
    before = _store_state(store)

    def pull(p: Progress) -> None:
        if p.files_done == 2:
            shutil.rmtree(stick)

    report = export(stick, store, Config(), progress=pull)
    assert report.status is ExportStatus.FAILED and not report.ok and not report.safe_to_remove
    assert "removed" in report.error and "export again" in report.error
    assert report.count(FileOutcome.WRITTEN) == 2 and report.count(FileOutcome.FAILED) == 3
    assert all("not listed in the DICOMDIR" in i.reason for i in report.items if i.outcome is FileOutcome.WRITTEN)
    assert not stick.exists(), "nothing may be written where the stick was"
    assert _store_state(store) == before
    with _state(store) as state:
        assert state.mark(ExportStatus.DONE) is None  # a failed export does not count as "the last export"
    assert store.marks.get() == {}, "a study only part of which reached the stick is not delivered"
    stick.mkdir()  # the stick is back
    report = export(stick, store, Config())
    assert report.ok and report.count(FileOutcome.WRITTEN) == 5, report.render()
    check_file_set(stick, store, _instances(store))


def test_unmounting_the_stick_mid_write_never_writes_to_the_mount_point(store: Store, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        _put_generated(store, ct_series(4))

        def pull(p: Progress) -> None:
            if p.files_done == 1:
                subprocess.run(["umount", str(mnt)], check=True)

        report = export(mnt, store, Config(), progress=pull)
        assert report.status is ExportStatus.FAILED and "removed" in report.error, report.render()
        assert report.count(FileOutcome.WRITTEN) == 1
        assert list(mnt.iterdir()) == []  # the bare mount point got nothing
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


class _FaultyStick(usbtarget.FolderMedium):
    """A stick that gives back one file with one bit flipped (a failing flash cell)."""

    def __init__(self, root: Path, bad: int) -> None:
        super().__init__(root)
        self.bad, self.files_read = bad, 0

    def read_back(self, file_ids: list[str]):  # type: ignore[no-untyped-def]
        def faulty(contents):  # type: ignore[no-untyped-def]
            for file_id, data in zip(file_ids, contents):
                if file_id != "DICOMDIR":
                    self.files_read += 1
                    if self.files_read == self.bad:
                        data = bytes(data[:-1]) + bytes([data[-1] ^ 1])
                yield data
        return faulty(super().read_back(file_ids))


def test_a_file_that_reads_back_wrong_fails_the_export_before_any_dicomdir(store: Store, tmp_path: Path) -> None:
    # 36 slices of 512x512, 19 MB: more than one window is flushed and read back while the
    # next is written (VERIFY_WINDOW); the 30th file read back differs, in the second window.
    assert 36 * 512 * 512 * 2 > exporter.VERIFY_WINDOW
    _put_generated(store, ct_series(36, rows=512, cols=512))
    stick = tmp_path / "stick"
    stick.mkdir()
    before = _store_state(store)
    report = export(_FaultyStick(stick, bad=30), store, Config())
    assert report.status is ExportStatus.FAILED and not report.safe_to_remove, report.render()
    assert "differs from what was written" in report.error and "faulty" in report.error
    assert report.count(FileOutcome.WRITTEN) == 36  # all written and flushed, none listed
    assert all(i.reason == "written, but not listed in the DICOMDIR yet" for i in report.items)
    assert not (stick / "DICOMDIR").exists(), "a DICOMDIR only once every file was verified"
    assert store.marks.get() == {}, "files no DICOMDIR lists were not delivered"
    assert _store_state(store) == before
    report = export(stick, store, Config())  # a good stick (or the same one, again)
    assert report.ok and report.count(FileOutcome.WRITTEN) == 36, report.render()
    check_file_set(stick, store, _instances(store))


def test_a_file_changed_on_the_stick_after_it_was_written_is_caught_by_the_read_back(
    store: Store, tmp_path: Path
) -> None:
    # A real corruption, through the real file: as the 30th file is reported written (before
    # its window is flushed and read back), one byte of it on the stick is changed.
    _put_generated(store, ct_series(36, rows=512, cols=512))
    stick = tmp_path / "stick"
    stick.mkdir()
    corrupted: list[Path] = []

    def corrupt(p: Progress) -> None:
        if p.files_done == 30:
            newest = max((f for f in stick.rglob("IM*") if f.is_file()), key=lambda f: f.stat().st_mtime_ns)
            with open(newest, "r+b") as f:
                f.seek(-1, os.SEEK_END)
                last = f.read(1)
                f.seek(-1, os.SEEK_END)
                f.write(bytes([last[0] ^ 0x40]))
            corrupted.append(newest)

    report = export(stick, store, Config(), progress=corrupt)
    assert corrupted, "the 30th file was reported written"
    assert report.status is ExportStatus.FAILED and not report.safe_to_remove, report.render()
    assert "differs from what was written" in report.error and corrupted[0].name in report.error
    assert not (stick / "DICOMDIR").exists(), "no DICOMDIR claims a set whose file reads back wrong"
    assert store.marks.get() == {}
    report = export(stick, store, Config())  # the next export writes it again, and completes the set
    assert report.ok and report.count(FileOutcome.WRITTEN) == 36, report.render()
    check_file_set(stick, store, _instances(store))


def test_a_write_error_mid_export_leaves_no_dicomdir_and_the_next_export_completes_the_set(
    store: Store, tmp_path: Path
) -> None:
    _put_generated(store, ct_series(6))
    # Where the export puts each file, in the order it writes them (names come from the UIDs,
    # the same on every stick).
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    report = export(scratch, store, Config(), Selection(SelectionMode.ALL))
    written_order = [i.file_id for i in report.items]
    assert sorted(written_order) == sorted(str(f.relative_to(scratch)) for f in scratch.rglob("IM*"))
    # On the stick, a folder sits where the fourth file goes: opening it for writing fails (EISDIR).
    stick = tmp_path / "stick"
    (stick / written_order[3]).mkdir(parents=True)
    before, marks = _store_state(store), store.marks.get()
    report = export(stick, store, Config(), Selection(SelectionMode.ALL))
    assert report.status is ExportStatus.FAILED and not report.ok and not report.safe_to_remove, report.render()
    assert "writing to the stick failed" in report.error
    assert report.count(FileOutcome.WRITTEN) == 3 and report.count(FileOutcome.FAILED) == 3, report.render()
    assert all("not listed in the DICOMDIR" in i.reason for i in report.items if i.outcome is FileOutcome.WRITTEN)
    assert not (stick / "DICOMDIR").exists() and not list(stick.rglob("*.TMP"))
    assert store.marks.get() == marks and _store_state(store) == before  # this stick delivered nothing
    (stick / written_order[3]).rmdir()
    report = export(stick, store, Config(), Selection(SelectionMode.ALL))
    assert report.ok and report.count(FileOutcome.WRITTEN) == 6, report.render()
    check_file_set(stick, store, _instances(store))


_RECORD_PATH_KEYS = ("SOPClassUID", "SOPInstanceUID", "PatientID", "StudyInstanceUID", "SeriesInstanceUID")


def test_the_record_key_texts_worked_out_from_the_bytes_are_what_pydicom_gives() -> None:
    # dicomdir.header works out the text of each key once from its bytes (plain ASCII or a
    # UID, one value) instead of having pydicom convert it at each read: for every key of every
    # sample that transcodes (character sets, legacy dates, RT objects), the same text.
    from io import BytesIO

    from appliance.dicom.transcode import TranscodeError, to_implicit_le

    checked = fast = 0
    for sample in samples():
        try:
            t = to_implicit_le(sample.path)
        except TranscodeError:
            continue
        layout = dicomio.walk(t.body, True, True)
        cheap = dicomdir.header(t.body, layout.elements, t.sop_class_uid, t.sop_instance_uid)
        full = dcmread(BytesIO(t.part10()), stop_before_pixels=True)
        for _, keyword, _, _ in dicomdir._HEADER_KEYS:
            fast += keyword in cheap.texts
            assert dicomdir._text(cheap, keyword) == dicomdir._text(full, keyword), (sample.path, keyword)
            if keyword in _RECORD_PATH_KEYS:  # Records finds listed records by these: str() of pydicom's value
                assert dicomdir._exact(cheap, keyword) == str(full.get(keyword, "")), (sample.path, keyword)
        checked += 1
    assert checked >= 20 and fast > 20 * 20


def _pydicom_dicomdir(fs: FileSet) -> bytes:
    """What pydicom's own encoder (each record encoded twice) makes of ``fs``, with the
    implementation the appliance names in its file meta."""
    from io import BytesIO

    from pydicom.filebase import DicomFileLike
    from pydicom.uid import UID

    from appliance.conformance import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

    if not fs._ds:
        fs._ds = fs._create_dicomdir()
    fs._ds.file_meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    fs._ds.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    buf = BytesIO()
    fs._write_dicomdir(DicomFileLike(buf))
    return buf.getvalue()


def test_the_dicomdir_encoded_once_per_record_is_what_pydicom_encodes(store: Store, tmp_path: Path) -> None:
    # dicomdir.encode encodes each record once and sets its offsets in its bytes; pydicom
    # encodes each twice. A stick of every storable sample (several patients, RT records),
    # written in two exports (a set loaded from the stick, then added to), loaded again.
    _fill(store, _storable())
    studies = _studies(store)
    stick = tmp_path / "stick"
    stick.mkdir()
    assert export(stick, store, Config(), Selection.explicit(studies=tuple(studies[:2]))).ok
    assert export(stick, store, Config(), Selection(SelectionMode.ALL)).ok
    written = (stick / "DICOMDIR").read_bytes()
    assert dicomdir.encode(FileSet(stick / "DICOMDIR")) == written == _pydicom_dicomdir(FileSet(stick / "DICOMDIR"))
    empty = dicomdir.load(tmp_path)
    assert dicomdir.encode(empty) == _pydicom_dicomdir(empty)


# -- FAT images (mtools) -------------------------------------------------------------------------------


def test_a_stick_too_small_gets_nothing_and_the_message_says_how_much_is_needed(
    store: Store, tmp_path: Path
) -> None:
    _put_generated(store, ct_series(12, rows=256, cols=256))  # ~1.6 MB
    image = _fat_image(tmp_path / "small.img", 1440)
    with pytest.raises(MediaError, match=r"has [\d.]+ MB free; this export needs [\d.]+ MB \(12 files\)\. "
                                         r"Nothing was written"):
        export(image, store, Config())
    assert _tool("mdir", "-i", str(image), "-b", "::").stdout.strip() == ""
    with _state(store) as state:
        assert state.mark(ExportStatus.DONE) is None


def test_two_exports_onto_one_fat_image_make_one_file_set(store: Store, tmp_path: Path) -> None:
    _fill(store, [s.path for s in samples() if s.expected == "store-success" and s.modality in ("CT", "MR")])
    studies = _studies(store)
    assert len(studies) >= 2
    image = _fat_image(tmp_path / "stick.img", 16 * 1024)
    report = export(image, store, Config(), Selection.explicit(studies=tuple(studies[:1])))
    assert report.ok and report.safe_to_remove, report.render()
    first = _mcopy_out(image, tmp_path / "first")
    report = export(image, store, Config(), Selection(SelectionMode.ALL))
    assert report.ok and report.count(FileOutcome.ON_STICK) >= 1, report.render()
    out = _mcopy_out(image, tmp_path / "out")
    for f in first.rglob("*"):
        if f.is_file() and f.name != "DICOMDIR":
            assert (out / f.relative_to(first)).read_bytes() == f.read_bytes()
    check_file_set(out, store, _instances(store))
    listing = _tool("mdir", "-i", str(image), "-/", "-b", "::").stdout
    assert "DICOMDIR" in listing and ".TMP" not in listing


def test_a_fat_image_replaced_mid_export_fails_cleanly_and_claims_nothing(store: Store, tmp_path: Path) -> None:
    # Once the first window (32 files of 0.5 MB: VERIFY_WINDOW) was copied in and flushed,
    # the image is swapped for a fresh, empty one (a stick pulled and another pushed in under
    # the same name): the medium notices at its next step (the image it opened is not the file
    # under that name any more), and no DICOMDIR lands.
    assert 31 * 512 * 512 * 2 < exporter.VERIFY_WINDOW <= 32 * 512 * 512 * 2
    _put_generated(store, ct_series(36, rows=512, cols=512))
    image = _fat_image(tmp_path / "stick.img", 32 * 1024)
    spare = _fat_image(tmp_path / "spare.img", 32 * 1024)

    def swap(p: Progress) -> None:
        if p.files_done == 33:
            os.replace(spare, image)

    report = export(image, store, Config(), progress=swap)
    assert report.status is ExportStatus.FAILED and not report.ok and not report.safe_to_remove, report.render()
    # Every step of the medium checks it still writes the image it opened: the swap is named.
    assert "replaced by another file during the export" in report.error and "export again" in report.error
    assert report.count(FileOutcome.WRITTEN) >= 33
    assert all("not listed in the DICOMDIR" in i.reason for i in report.items if i.outcome is FileOutcome.WRITTEN)
    assert "DICOMDIR" not in _tool("mdir", "-i", str(image), "-/", "-b", "::").stdout
    assert store.marks.get() == {}
    report = export(image, store, Config())  # the next export completes the set on the stick now in
    assert report.ok and report.count(FileOutcome.WRITTEN) == 36, report.render()
    check_file_set(_mcopy_out(image, tmp_path / "out"), store, _instances(store))


@pytest.mark.parametrize(("kib", "fat"), [(1440, 12), (16 * 1024, 16), (48 * 1024, 32)])
def test_the_fat_reader_reads_back_what_mcopy_reads_on_fat12_16_and_32(
    store: Store, tmp_path: Path, kib: int, fat: int
) -> None:
    # The FAT image medium reads its files back through usbtarget.FatReader (boot sector,
    # FAT, short directory entries, cluster chains) instead of mtools: on each FAT type it
    # must read what mtools reads, and what was written.
    _put_generated(store, ct_series(3, rows=128, cols=128))
    image = tmp_path / "stick.img"
    subprocess.run(["truncate", "-s", f"{kib}K", str(image)], check=True)
    subprocess.run(["mformat", *(["-F"] if fat == 32 else []), "-i", str(image), "::"], check=True,
                   capture_output=True)
    assert f"FAT{fat}" in _tool("minfo", "-i", str(image), "::").stdout
    report = export(image, store, Config(), Selection(SelectionMode.ALL))
    assert report.ok and report.count(FileOutcome.WRITTEN) == 3, report.render()
    out = _mcopy_out(image, tmp_path / "out")
    files = [str(f.relative_to(out)) for f in out.rglob("*") if f.is_file()]
    assert "DICOMDIR" in files and len(files) == 4
    with open(image, "rb") as f:
        reader = usbtarget.FatReader(f.fileno())
        for name in files:
            assert bytes(reader.read(name)) == (out / name).read_bytes(), name
        with pytest.raises(FileNotFoundError):
            reader.read("DICOM/NOSUCH")
    check_file_set(out, store, _instances(store))


def test_a_large_export_onto_a_fat_image_is_copied_in_batches_and_verified(store: Store, tmp_path: Path) -> None:
    # More than a batch (usbtarget.FAT_BATCH_BYTES) and a window (exporter.VERIFY_WINDOW).
    assert 36 * 512 * 512 * 2 > max(exporter.VERIFY_WINDOW, usbtarget.FAT_BATCH_BYTES)
    _put_generated(store, ct_series(36, rows=512, cols=512))
    image = _fat_image(tmp_path / "stick.img", 32 * 1024)
    report = export(image, store, Config())
    assert report.ok and report.count(FileOutcome.WRITTEN) == 36, report.render()
    check_file_set(_mcopy_out(image, tmp_path / "out"), store, _instances(store))


# -- the DICOMDIR and its files against dciodvfy and dcmmkdir ----------------------------------------


def _sample_stick(store: Store, tmp_path: Path, strict: bool) -> Path:
    """Import every shared sample through the CD door (a folder import: it also takes the JPEG
    Lossless objects, dated ``1995.05.01``, that the network refuses; ``strict=False`` also
    the character sets stored flagged), export them all to a FAT image and copy it out."""
    report = run_import(SAMPLES, Ingest(store, StoreConfig(min_free_mb=0, charset_strict=strict)), eject_after=False)
    assert report.count(ImportOutcome.IMPORTED) >= 25, report.render()
    image = _fat_image(tmp_path / "stick.img", 32 * 1024)
    report = export(image, store, Config(), Selection(SelectionMode.ALL))
    assert report.ok and report.count(FileOutcome.WRITTEN) == len(_instances(store)), report.render()
    return _mcopy_out(image, tmp_path / "stick")


def _dciodvfy(path: Path) -> list[str]:
    tool = shutil.which("dciodvfy")
    if tool is None:
        raise RuntimeError("dicom3tools' dciodvfy is not installed; scripts/test installs Debian's dicom3tools")
    done = _tool(tool, str(path))
    return (done.stdout + done.stderr).splitlines()


@pytest.mark.parametrize("strict", [True, False], ids=["charset_strict", "charset_lax"])
def test_dciodvfy_finds_no_error_in_the_dicomdir_of_every_storable_sample(
    store: Store, tmp_path: Path, strict: bool
) -> None:
    stick = _sample_stick(store, tmp_path, strict)
    lines = _dciodvfy(stick / "DICOMDIR")
    assert "BasicDirectory" in lines, lines  # the IOD it recognised
    assert [line for line in lines if line.startswith("Error")] == []
    # Warned, and kept: a Patient's Name without a '^' (e.g. "Anonymized") as the scanner sent it.
    warnings = [line for line in lines if line.startswith("Warning")]
    assert all("Patient's Name" in w and "Retired Person Name form" in w for w in warnings), warnings


def _inconsistencies(lines: list[str]) -> list[tuple[str, str, list[str]]]:
    """Each "file inconsistent with existing DICOMDIR record" dcmmkdir reports, as (key
    keyword, key value, the keywords whose values differ between the record and the file)."""
    found = []
    for i, line in enumerate(lines):
        if "file inconsistent with existing DICOMDIR record" in line:
            key = re.search(r'\[Key: (\w+) \(.*\)="(.*)"\]', lines[i + 1])
            assert key is not None, lines[i + 1]
            differing = []
            for detail in lines[i + 3:]:
                if "File (" in detail:
                    break
                differing += re.findall(r"^W:\s+(\w+) \(", detail)
            found.append((key[1], key[2], differing))
    return found


@pytest.mark.parametrize("strict", [True, False], ids=["charset_strict", "charset_lax"])
def test_dcmmkdir_accepts_every_file_of_a_stick_of_every_storable_sample(
    store: Store, tmp_path: Path, strict: bool
) -> None:
    stick = _sample_stick(store, tmp_path, strict)
    files = sorted(p for p in (stick / TOP).rglob("*") if p.is_file())
    checked = tmp_path / "DICOMDIR.checked"  # dcmmkdir +A rewrites the DICOMDIR it appends to
    shutil.copyfile(stick / "DICOMDIR", checked)
    # +A: append the files to the stick's own DICOMDIR (each is checked against the General
    # Purpose profile, then against the records that list it); -Nxc: Implicit VR LE is only a
    # warning (Table 10 writes it, the profile wants Explicit VR LE); -I (default): strict on
    # the keys that are Type 1 in a DICOMDIR.
    done = _tool(dcmtk("dcmmkdir"), "-v", "+A", "-nb", "-Nxc", "+id", str(stick), "+D", str(checked), "+r", TOP)
    lines = (done.stdout + done.stderr).splitlines()
    assert done.returncode == 0, lines
    assert [line for line in lines if line.startswith(("E:", "F:"))] == []
    assert not any("cannot be added" in line for line in lines), lines
    assert sum("I: checking file:" in line for line in lines) == len(files)
    assert sum("LittleEndianExplicit expected but LittleEndianImplicit found" in line for line in lines) == len(files)
    assert sum("directory record for this SOP instance already exists" in line for line in lines) == len(files)
    # What dcmmkdir still warns about is in the objects themselves, never made by the box: the
    # files listed under the record disagree among themselves (the samples have one series with
    # Modality OT and DS, and RT Structure Sets of one patient and study under other names), or
    # pydicom reads the record's value and the file's alike (a Patient's Name ending in an
    # empty '=' group, which the record omits, PS3.5 6.2.1).
    fs = FileSet(stick / "DICOMDIR")
    copies = [dcmread(f, stop_before_pixels=True) for f in files]
    for key, key_value, differing in _inconsistencies(lines):
        under = [ds for ds in copies if _text(ds, key) == key_value]
        records = fs.find(**{key: key_value})
        assert under and records and differing, (key, key_value, differing)
        for keyword in differing:
            values = {_text(ds, keyword) for ds in under}
            assert len(values) > 1 or values == {str(records[0][keyword].value)}, (key, key_value, keyword, values)


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # the legacy values written here on purpose
def test_a_legacy_study_date_and_time_are_converted_in_the_record_and_the_copy_only(
    store: Store, tmp_path: Path
) -> None:
    series = ct_series(2)
    for ds in series:
        ds.StudyDate, ds.StudyTime, ds.SeriesDate, ds.SeriesTime = "1995.05.01", "15:26:10", "1995.05.01", "16:22:53.77"
    _put_generated(store, series)
    before = _store_state(store)
    stick = tmp_path / "stick"
    stick.mkdir()
    assert export(stick, store, Config()).ok
    study = [r for r in dcmread(stick / "DICOMDIR").DirectoryRecordSequence if r.DirectoryRecordType == "STUDY"]
    assert [(r.StudyDate, r.StudyTime) for r in study] == [("19950501", "152610")]
    for inst in FileSet(stick / "DICOMDIR"):
        copy = dcmread(inst.path)
        assert (copy.StudyDate, copy.StudyTime) == ("19950501", "152610")
        assert (copy.SeriesDate, copy.SeriesTime) == ("1995.05.01", "16:22:53.77")  # not a record key: as stored
    assert _store_state(store) == before
    assert [line for line in _dciodvfy(stick / "DICOMDIR") if line.startswith("Error")] == []
    check_file_set(stick, store, _instances(store))


def test_two_patients_without_an_id_and_with_one_name_get_two_patient_records(
    store: Store, tmp_path: Path
) -> None:
    absent, empty = ct_series(2, patient="Anonymized"), ct_series(1, patient="Anonymized")
    for ds in absent:
        del ds.PatientID, ds.StudyDate  # and no other date in the object to take one from
    for ds in empty:
        ds.PatientID, ds.StudyTime, ds.SeriesTime = "", "", "093000"
    _put_generated(store, absent + empty)
    received = {r.received_at[:10].replace("-", "") for r in store.instances() if r.study_uid == absent[0].StudyInstanceUID}
    before = _store_state(store)
    ids = []
    for name in ("stick1", "stick2"):
        stick = tmp_path / name
        stick.mkdir()
        assert export(stick, store, Config(), Selection(SelectionMode.ALL)).ok
        records = dcmread(stick / "DICOMDIR").DirectoryRecordSequence
        patients = [r for r in records if r.DirectoryRecordType == "PATIENT"]
        assert len(patients) == 2 and {str(r.PatientName) for r in patients} == {"Anonymized"}
        ids.append(sorted(r.PatientID for r in patients))
        assert ids[-1][0] != ids[-1][1] and all(i.startswith("NOID-") for i in ids[-1]), ids
        studies = {r.StudyInstanceUID: r for r in records if r.DirectoryRecordType == "STUDY"}
        assert (studies[empty[0].StudyInstanceUID].StudyDate, studies[empty[0].StudyInstanceUID].StudyTime) == (
            "20261128", "093000")  # the object's Study Date, its Series Time
        assert studies[absent[0].StudyInstanceUID].StudyDate in received  # nothing dates it but its arrival
        for inst in FileSet(stick / "DICOMDIR"):
            copy = dcmread(inst.path)
            assert copy.PatientID == inst.PatientID  # the file says what its PATIENT record says
            assert (copy.StudyDate, copy.StudyTime, copy.StudyID) == (inst.StudyDate, inst.StudyTime, inst.StudyID)
        check_file_set(stick, store, _instances(store))
        assert [line for line in _dciodvfy(stick / "DICOMDIR") if line.startswith("Error")] == []
    assert ids[0] == ids[1]  # the same study gets the same generated ID on every stick
    assert _store_state(store) == before  # only the copies carry it


# -- selection, queue, policy -------------------------------------------------------------------


def test_default_policy_exports_studies_received_since_the_last_export(store: Store, tmp_path: Path) -> None:
    _put_generated(store, ct_series(2))
    sticks = [tmp_path / f"stick{i}" for i in range(4)]
    for s in sticks:
        s.mkdir()
    assert export(sticks[0], store, Config()).count(FileOutcome.WRITTEN) == 2
    _put_generated(store, ct_series(3, patient="New^Arrival"))
    new = _studies(store)[1]
    # An explicit export does not move the mark: the default export still brings the new study.
    assert export(sticks[1], store, Config(), Selection.explicit(studies=(_studies(store)[0],))).ok
    report = export(sticks[2], store, Config())
    assert report.count(FileOutcome.WRITTEN) == 3 and {f.study_uid for f in report.items} == {new}
    assert export(sticks[3], store, Config()).status is ExportStatus.NOTHING


def test_the_queue_comes_before_the_policy_and_is_emptied_by_a_successful_export(
    store: Store, tmp_path: Path
) -> None:
    _put_generated(store, ct_series(2))
    _put_generated(store, ct_series(1, patient="B^B"))
    a, b = _studies(store)
    series_b = store.instances()[-1].series_uid
    with _state(store) as state:
        assert state.add(series_b, "series") and not state.add(series_b, "series")
    stick = tmp_path / "stick"
    stick.mkdir()
    report = export(stick, store, Config())
    assert {f.study_uid for f in report.items} == {b} and report.count(FileOutcome.WRITTEN) == 1
    with _state(store) as state:
        assert state.entries() == []
    queue_only = Config(usb=UsbConfig(policy=ExportPolicy.QUEUE_ONLY))
    assert export(stick, store, queue_only).status is ExportStatus.NOTHING
    assert export(stick, store, Config(usb=UsbConfig(policy=ExportPolicy.ALL))).count(FileOutcome.WRITTEN) == 2


def test_unknown_uids_are_refused_before_anything_is_touched(store: Store, tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="no stored study or series has UID 1.2.3"):
        export(tmp_path, store, Config(), Selection.explicit(studies=("1.2.3",)))
    assert not (tmp_path / "DICOMDIR").exists()


# -- block devices ----------------------------------------------------------------------------------


def _fake_sysfs(root: Path, removable: str, bus: str) -> Path:
    disk = root / "devices" / "pci0000:00" / bus / "host0" / "block" / "sda"
    (disk / "sda1").mkdir(parents=True)
    (disk / "sda1" / "partition").write_text("1\n")
    (disk / "removable").write_text(removable + "\n")
    (disk.parent.parent / "target").mkdir()
    os.symlink(disk.parent.parent / "target", disk / "device")
    (root / "dev" / "block").mkdir(parents=True)
    os.symlink(disk / "sda1", root / "dev" / "block" / "8:1")
    os.symlink(disk, root / "dev" / "block" / "8:0")
    return root


def test_only_removable_usb_disks_pass_the_sysfs_check(tmp_path: Path) -> None:
    usb = _fake_sysfs(tmp_path / "usb", "1", "0000:00:14.0/usb1/1-1")
    assert usbtarget.removable_usb_refusal(8, 1, usb) is None
    assert usbtarget.removable_usb_refusal(8, 0, usb) is None
    fixed = _fake_sysfs(tmp_path / "sata", "0", "0000:00:17.0/ata1")
    assert usbtarget.removable_usb_refusal(8, 1, fixed) == "it is not removable and it is not on a USB bus"
    assert usbtarget.removable_usb_refusal(9, 9, fixed) == "sysfs knows no such block device"


def test_a_fixed_disk_is_refused_and_never_mounted(store: Store) -> None:
    fixed = [Path("/dev") / d for d in os.listdir("/sys/block")
             if Path("/sys/block", d, "removable").read_text().strip() == "0" and Path("/dev", d).exists()]
    if not fixed:
        pytest.skip("no fixed block device to try")
    mounts = Path("/proc/mounts").read_text()
    with pytest.raises(MediaError, match="is not a removable USB disk .*only writes to USB sticks"):
        export(fixed[0], store, Config())
    assert Path("/proc/mounts").read_text() == mounts


# -- command line and config -----------------------------------------------------------------------


def test_cli_export_and_queue(store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _put_generated(store, ct_series(2))
    study = _studies(store)[0]
    data = ["--data-dir", str(store.data_dir)]
    stick = tmp_path / "stick"
    stick.mkdir()
    assert cli.main(data + ["queue", "add", study]) == 0
    assert cli.main(data + ["queue", "add", "9.9.9"]) == 1
    assert cli.main(data + ["queue", "ls"]) == 0
    assert study in capsys.readouterr().out
    assert cli.main(data + ["export", "--to", str(stick), "--queued"]) == 0
    out = capsys.readouterr().out
    assert "2 written" in out and "safe to remove" in out
    assert cli.main(data + ["queue", "rm", study]) == 1  # the export emptied the queue
    assert cli.main(data + ["export", "--to", str(stick), "--study", study]) == 0
    assert "2 already on the stick" in capsys.readouterr().out
    assert cli.main(data + ["export", "--to", str(tmp_path / "absent")]) == 1
    assert "cannot use" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(data + ["export", "--to", str(stick), "--study", study, "--all"])
    assert exc.value.code == 2


def test_usb_config_section() -> None:
    assert config.from_dict({"usb": {"policy": "all"}}).usb.policy is ExportPolicy.ALL
    assert Config().usb.policy is ExportPolicy.SINCE_LAST_EXPORT
    with pytest.raises(ConfigError, match="usb.policy: 'weekly' is not one of since-last-export, all, queue-only"):
        config.from_dict({"usb": {"policy": "weekly"}})


def test_a_stored_file_is_read_whole_whatever_size_the_index_gives(tmp_path: Path) -> None:
    # exporter._read reads into a buffer that the next file reuses; the index's size may be
    # wrong (a file changed under it): the whole file is read all the same.
    data = os.urandom(300_001)
    path = tmp_path / "stored.dcm"
    path.write_bytes(data)
    buffers = exporter._Buffers(1 << 20)
    for size in (len(data), len(data) - 1, 10, len(data) + 1, len(data) + 70_000):
        buffer = buffers.take(size + 1)
        assert bytes(exporter._read(path, size, buffer)) == data, size
        buffers.give(buffer)
    path.write_bytes(b"")
    assert bytes(exporter._read(path, 0, buffers.take(1))) == b""


def test_file_ids_are_named_by_uid_and_a_clash_takes_the_next_salted_name_for_every_object() -> None:
    from appliance.store.index import InstanceRow

    names = exporter._Names(dicomdir.load(Path("/nonexistent")))
    study, series = "1.2.3.4", "1.2.3.4.5"
    taken = f"{TOP}/{exporter._component('ST', study, 0)}"
    names.owner[taken] = "9.9.9"  # the study's first name is another study's on the stick
    rows = [InstanceRow(f"1.2.3.4.5.{n}", SOPClass.CT_IMAGE, series, study, "", TransferSyntax.IMPLICIT_LE,
                        1, "", None, "test") for n in range(3)]
    ids = [names.file_id(row) for row in rows]
    assert {i.rsplit("/", 2)[0] for i in ids} == {f"{TOP}/{exporter._component('ST', study, 1)}"}
    assert len({i.rsplit("/", 1)[0] for i in ids}) == 1 and len(set(ids)) == 3
    assert ids == [names.file_id(row) for row in rows]  # the same names again
    assert all(is_conformant_file_id(Path(*i.split("/"))) for i in ids)
