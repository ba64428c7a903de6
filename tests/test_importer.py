"""CD import (section 4.4, Table 9) from real ISO 9660 images built with xorriso, from a block
device (a read-only loop device over such an image) and from a mounted folder."""

from __future__ import annotations

import dataclasses
import errno
import io
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.fileset import FileSet

from appliance import cli
from appliance.conformance import TransferSyntax
from appliance.errors import MediaError
from appliance.media.importer import (
    DiscKind,
    FolderDisc,
    ImportOutcome,
    IsoDisc,
    import_disc,
    open_disc,
    run_import,
)
from appliance.reports import Progress
from helpers import ct_series, sample

I, A, R, S, U = (ImportOutcome.IMPORTED, ImportOutcome.ALREADY_STORED, ImportOutcome.REFUSED, ImportOutcome.SKIPPED,
                 ImportOutcome.UNREADABLE)

#: The sample disc: path on the disc (8.3-safe, so it reads the same in every namespace) ->
#: (what to put there, the expected outcome, a word the reason must contain).
#: Within a folder, files are read in name order: same-UID pairs rely on it.
DISC: dict[str, tuple[str, ImportOutcome, str]] = {
    "/README.TXT": ("junk", S, "not a DICOM"),
    "/EMPTY": ("empty", S, "empty"),
    "/NOTES.PDF": ("junk_big", S, "no 'DICM'"),
    "/DICOMDIR": ("dicomdir", S, "DICOMDIR"),
    "/CT/IM01": ("ct_ele", I, "stored"),
    "/CT/IM02": ("ct_ile", A, "already stored"),
    "/CT/IM03": ("ct_be", A, "already stored"),
    "/CT/IM04": ("ct_ele_2", I, "stored"),
    "/MR/IM01": ("mr_ile", I, "stored"),
    "/MR/IM02": ("mr_be", A, "already stored"),
    "/PET/IM01": ("pt_ele", I, "stored"),
    "/PET/IM02": ("pt_ile", I, "stored"),
    "/PET/IM03": ("pt_be", A, "already stored"),
    "/XA/IM01": ("xa_ele", I, "stored"),
    "/XA/IM02": ("xa_be", A, "already stored"),
    "/SC/IM01": ("sc_ele_2", I, "stored"),
    "/SC/IM02": ("sc_ile", I, "stored"),
    "/SC/IM03": ("sc_be", I, "stored"),
    "/RT/IM01": ("rtstruct_ile", I, "stored"),
    "/RT/IM02": ("rtstruct_ele", A, "already stored"),
    "/RT/IM03": ("rtstruct_be", A, "already stored"),
    "/JPEG/IM01": ("ts_jpeg_p14_mr_2", I, "decoded from JPEG Lossless, Non-Hierarchical (Process 14)"),
    "/JPEG/IM02": ("ts_jpeg_p14_mr", A, "already stored"),
    "/JPEG/IM03": ("ts_jpeg_sv1_ct", I, "decoded from JPEG Lossless, First-Order Prediction"),
    # Decodes, but the data set has no SOP Instance UID: ingest refuses it.
    "/JPEG/IM04": ("ts_jpeg_sv1_sc", R, "no SOP Instance UID"),
    "/NO/IM01": ("xa_multiframe", R, "multi-frame"),
    "/NO/IM02": ("pt_dynamic", R, "dynamic PET"),
    "/NO/IM03": ("sc_modality_nm", R, "modality 'NM'"),
    "/NO/IM04": ("img_cs_ISO_IR_144", R, "character set"),
    "/SKIP/IM01": ("rej_rtdose", S, "not in Table 9"),
    "/SKIP/IM02": ("rej_cr", S, "not in Table 9"),
    "/SKIP/IM03": ("ts_rle_mr", S, "RLE Lossless"),
    "/SKIP/IM04": ("ts_jpeg_baseline_sc", S, "JPEG Baseline"),
    "/SKIP/IM05": ("ts_jpeg_sv1_us_multiframe", S, "not in Table 9"),
    "/BAD/TRUNC": ("truncated", R, "does not decode"),
    "/BAD/NOMETA": ("no_meta", R, "file meta header is damaged"),
    "/A/B/C/D/E/F/G/H/DEEP": ("generated", I, "stored"),
}
#: The DICOMDIR's own objects (pydicom's FileSet layout: nested folders, names without extension).
FILESET = {f"/PT000000/ST000000/SE000000/IM00000{i}": ("", I, "stored") for i in range(2)}
JPEG_ROLES = ("ts_jpeg_p14_mr_2", "ts_jpeg_p14_mr", "ts_jpeg_sv1_ct")


def _write_tree(root: Path) -> None:
    """Write the sample disc's files under ``root`` (a folder tree xorriso turns into an ISO)."""
    slices = ct_series(4)
    for disc_path, (what, _, _) in DISC.items():
        dest = root / disc_path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if what == "junk":
            dest.write_text("Viewer for Windows. Insert the CD and run SETUP.EXE.\n")
        elif what == "empty":
            dest.touch()
        elif what == "junk_big":
            dest.write_bytes(b"%PDF-1.4\n" + bytes(range(256)) * 4096)
        elif what == "generated":
            slices[0].save_as(dest, enforce_file_format=True)
        elif what == "truncated":
            buf = io.BytesIO()
            slices[1].save_as(buf, enforce_file_format=True)
            dest.write_bytes(buf.getvalue()[:-100])
        elif what == "no_meta":
            dest.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff" + b"garbage" * 10)
        elif what == "dicomdir":
            pass  # written below, with its own objects
        else:
            shutil.copyfile(sample(what).path, dest)
    fs = FileSet()
    for ds in slices[2:]:
        ds.StudyID = "1"
        fs.add(ds)
    fs.write(root)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("disc") / "tree"
    _write_tree(root)
    return root


def xorriso(src: Path, out: Path, *opts: str, label: str = "PATIENT_CD") -> Path:
    subprocess.run(["xorriso", "-as", "mkisofs", *opts, "-V", label, "-o", str(out), str(src)],
                   check=True, capture_output=True, timeout=120)
    return out


#: xorriso options per name space: Rock Ridge + Joliet, Joliet only, plain ISO 9660 level 1.
NAMESPACES = {"rock_ridge": ("-R", "-J"), "joliet": ("-J", "--norock"), "level1": ("--norock", "-iso-level", "1")}


@pytest.fixture(scope="module")
def isos(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("isos")
    return {name: xorriso(tree, out / f"{name}.iso", *opts) for name, opts in NAMESPACES.items()}


def _by_path(report):  # type: ignore[no-untyped-def]
    return {f.path: f for f in report.items}


def _check_disc(report, store) -> None:  # type: ignore[no-untyped-def]
    got = _by_path(report)
    want = {**DISC, **FILESET}
    assert sorted(got) == sorted(want)
    for path, (_, result, word) in want.items():
        assert got[path].outcome is result, (path, got[path])
        assert word in got[path].reason, (path, got[path].reason)
    n_imported = sum(1 for _, r, _ in want.values() if r is I)
    assert report.count(I) == n_imported
    assert len(list(store.index.query("SELECT sop_instance_uid FROM instances"))) == n_imported
    assert not report.ok


@pytest.mark.parametrize("namespace", sorted(NAMESPACES))
def test_iso_image_every_file_gets_its_outcome(isos, namespace, ingest, store):
    report = run_import(isos[namespace], ingest)
    assert report.kind is DiscKind.IMAGE and report.label == "PATIENT_CD"
    assert report.eject == ""  # nothing to eject for an image file
    _check_disc(report, store)
    # Every stored object came through ingest, marked with the disc it came from.
    origins = {r["origin"] for r in store.index.query("SELECT origin FROM instances")}
    assert origins == {"cd:PATIENT_CD"}


def test_mounted_folder(tree, ingest, store, tmp_path):
    folder = tmp_path / "mnt"
    shutil.copytree(tree, folder)
    (folder / "A" / "loop").symlink_to("..")  # a symbolic link loop
    os.mkfifo(folder / "FIFO")  # reading it would block forever
    report = run_import(folder, ingest)
    assert report.kind is DiscKind.FOLDER
    extra = {"/A/loop": ("", S, "symbolic link"), "/FIFO": ("", S, "not a regular file")}
    got = _by_path(report)
    for path, (_, result, word) in extra.items():
        assert got[path].outcome is result and word in got[path].reason
    report_without = dataclasses.replace(report, items=tuple(f for f in report.items if f.path not in extra),
                                         bytes_done=0, seconds=0)
    _check_disc(report_without, store)


def test_block_device(isos, ingest, store):
    """A read-only loop device over the image is a block device, read like /dev/sr0."""
    losetup = subprocess.run(["losetup", "-r", "-f", "--show", str(isos["rock_ridge"])],
                             capture_output=True, text=True)
    if losetup.returncode != 0:
        pytest.skip(f"cannot set up a loop device here: {losetup.stderr.strip()}")
    device = Path(losetup.stdout.strip())
    try:
        report = run_import(device, ingest)
    finally:
        subprocess.run(["losetup", "-d", str(device)], check=True)
    assert report.kind is DiscKind.DRIVE
    _check_disc(report, store)
    # A loop device has no tray: the failed eject is reported, not raised.
    assert "cannot eject" in report.eject


def test_jpeg_lossless_stored_uncompressed_with_identical_pixels(isos, ingest, store):
    report = run_import(isos["rock_ridge"], ingest)
    got = _by_path(report)
    for path, (role, _, _) in DISC.items():
        if role not in JPEG_ROLES:
            continue
        original = pydicom.dcmread(sample(role).path)
        assert original.file_meta.TransferSyntaxUID.is_compressed
        stored = pydicom.dcmread(store.locate(got[path].sop_instance_uid))
        assert stored.file_meta.TransferSyntaxUID == TransferSyntax.EXPLICIT_LE
        assert stored.SOPInstanceUID == original.SOPInstanceUID
        assert np.array_equal(stored.pixel_array, original.pixel_array), path
        assert stored.pixel_array.dtype == original.pixel_array.dtype


def test_reimport_changes_nothing(isos, ingest, store):
    first = run_import(isos["joliet"], ingest)
    files = sorted(p for p in store.objects.rglob("*") if p.is_file())
    mtimes = [p.stat().st_mtime_ns for p in files]
    second = run_import(isos["joliet"], ingest)
    assert second.count(I) == 0
    assert second.count(A) == first.count(I) + first.count(A)
    assert "nothing new was stored" in second.summary()
    assert sorted(p for p in store.objects.rglob("*") if p.is_file()) == files
    assert [p.stat().st_mtime_ns for p in files] == mtimes


def test_rock_ridge_and_joliet_long_names(tmp_path, ingest):
    src = tmp_path / "src"
    series = ct_series(2)
    paths = ["/Patient Doe 2026-11-28/CT thorax with contrast/image.0001.dicom",
             "/Patient Doe 2026-11-28/CT thorax with contrast/slice without extension"]
    for ds, p in zip(series, paths):
        (src / p.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(src / p.lstrip("/"), enforce_file_format=True)
    for opts in (("-R",), ("-J", "--norock")):
        iso = xorriso(src, tmp_path / "long.iso", *opts)
        report = run_import(iso, ingest)
        assert sorted(f.path for f in report.items) == sorted(paths), opts
        assert all(f.outcome in (I, A) for f in report.items)
        assert report.ok
    # Plain ISO 9660 level 1 has 8.3 names with a version: shown without ';1'.
    iso = xorriso(src, tmp_path / "l1.iso", "--norock", "-iso-level", "1")
    names = [f.path for f in run_import(iso, ingest).items]
    assert all(";" not in n and n.count("/") == 3 for n in names), names


class ScratchedImage(io.FileIO):
    """An ISO image whose bytes in ``bad`` fail with EIO, as a scratched disc's sectors do."""

    def __init__(self, path: Path, bad: range) -> None:
        super().__init__(path, "rb")
        self.bad = bad

    def read(self, size: int = -1) -> bytes:
        pos = self.tell()
        end = pos + size if size >= 0 else 1 << 62
        if pos < self.bad.stop and end > self.bad.start:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return super().read(size)


def test_unreadable_sector_is_reported_and_the_rest_imported(tmp_path, ingest):
    src = tmp_path / "src"
    src.mkdir()
    series = ct_series(3)
    for i, ds in enumerate(series):
        ds.save_as(src / f"IM{i}", enforce_file_format=True)
    iso = xorriso(src, tmp_path / "scratched.iso", "-R")
    where = iso.read_bytes().find((src / "IM1").read_bytes()[:2048])
    assert where > 0 and where % 2048 == 0
    disc = IsoDisc(ScratchedImage(iso, range(where, where + 2048)), str(iso), DiscKind.DRIVE)
    try:
        report = import_disc(disc, ingest)
    finally:
        disc.close()
    got = _by_path(report)
    assert got["/IM1"].outcome is U and "input/output error" in got["/IM1"].reason
    assert got["/IM0"].outcome is I and got["/IM2"].outcome is I
    assert not report.ok


def test_truncated_image_reports_the_missing_files(tmp_path, ingest):
    src = tmp_path / "src"
    src.mkdir()
    for i, ds in enumerate(ct_series(2)):
        ds.save_as(src / f"IM{i}", enforce_file_format=True)
    iso = xorriso(src, tmp_path / "cut.iso", "-R")
    data = iso.read_bytes()
    iso.write_bytes(data[: data.find((src / "IM1").read_bytes()[200:400]) + 1000])
    report = run_import(iso, ingest)
    got = _by_path(report)
    assert got["/IM0"].outcome is I
    assert got["/IM1"].outcome is U and "cut short" in got["/IM1"].reason


def test_object_above_the_size_limit_is_refused_without_reading_junk(tmp_path, ingest):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(sample("ct_ele_2").path, src / "BIGCT")
    (src / "BIG.BIN").write_bytes(b"\0" * (8 << 20))
    report = run_import(xorriso(src, tmp_path / "big.iso", "-R"), ingest, max_object_bytes=1 << 16)
    got = _by_path(report)
    assert got["/BIGCT"].outcome is R and "MB are not imported" in got["/BIGCT"].reason
    assert got["/BIG.BIN"].outcome is S
    assert report.bytes_done < 1 << 16  # only the 132-byte heads were read


def test_ten_thousand_small_files(tmp_path, ingest):
    src = tmp_path / "src"
    slices = ct_series(10, rows=4, cols=4)
    for d in range(100):
        folder = src / f"D{d:03d}"
        folder.mkdir(parents=True)
        for i in range(100):
            (folder / f"F{i:04d}").write_bytes(b"small file %d\n" % i)
    for i, ds in enumerate(slices):
        ds.save_as(src / f"D{i:03d}" / "F0000", enforce_file_format=True)
    seen: list[Progress] = []
    report = run_import(xorriso(src, tmp_path / "many.iso", "-R", "-J"), ingest, progress=seen.append)
    assert len(report.items) == 10_000
    assert report.count(I) == 10 and report.count(S) == 9_990
    assert [p.files_done for p in seen] == list(range(1, 10_001))
    assert seen[-1].files_total == 10_000 and seen[-1].bytes_done == report.bytes_done


def test_what_cannot_be_read_at_all(tmp_path, ingest):
    with pytest.raises(MediaError, match="does not exist"):
        open_disc(tmp_path / "nothing.iso")
    junk = tmp_path / "notes.iso"
    junk.write_bytes(b"not a disc" * 10000)
    with pytest.raises(MediaError, match="does not hold an ISO 9660 file system"):
        open_disc(junk)
    assert isinstance(open_disc(tmp_path), FolderDisc)


def test_cli_import(isos, tree, tmp_path, capsys):
    data = tmp_path / "data"
    config = tmp_path / "appliance.toml"
    config.write_text("[store]\nmin_free_mb = 0\n")
    base = ["--config", str(config), "--data-dir", str(data), "import"]
    assert cli.main(base + [str(isos["level1"])]) == 3  # partial: stored, and refusals
    out = capsys.readouterr().out
    assert out.startswith("ISO image 'PATIENT_CD'")
    assert "refused         /NO/IM01" in out
    kept = list((data / "imports").glob("*PATIENT_CD.txt"))
    assert len(kept) == 1 and kept[0].read_text().splitlines()[0] == out.splitlines()[0]

    clean = tmp_path / "clean"
    (clean / "CT").mkdir(parents=True)
    shutil.copyfile(tree / "CT" / "IM01", clean / "CT" / "IM01")
    (clean / "README.TXT").write_text("junk is skipped, which is no failure\n")
    assert cli.main(base + ["--no-eject", str(clean)]) == 0
    assert "1 already stored" in capsys.readouterr().out
    assert cli.main(base + [str(tmp_path / "missing.iso")]) == 1
    assert "does not exist" in capsys.readouterr().err

    bad = tmp_path / "only-bad"
    bad.mkdir()
    shutil.copyfile(tree / "NO" / "IM01", bad / "IM01")  # a refused object, nothing else
    assert cli.main(base + [str(bad)]) == 1  # failure: nothing stored
