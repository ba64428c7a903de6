"""Synthetic CT and MR series for the benchmark, generated once into a cache directory.

Each series is a valid image series: one study, series and frame of reference, Image
Position (Patient) stepping by the slice thickness along z, the spacing between slices
equal to it (appendix A note 2), Specific Character Set ISO_IR 100, Implicit VR Little
Endian Part 10 files. UIDs are derived from the series' key (2.25 UUID form) and pixels
from a fixed seed, so that the same options give the same bytes on every machine.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID

from appliance.conformance import SOPClass, TransferSyntax

#: Bump when the generated data changes, so that stale caches are not reused.
GENERATOR_VERSION = 2


@dataclass(frozen=True)
class SeriesSpec:
    """A synthetic series: ``slices`` images of ``size`` x ``size`` pixels."""

    modality: str  # "CT" or "MR"
    slices: int
    size: int
    seed: int

    @property
    def key(self) -> str:
        return f"{self.modality.lower()}-{self.size}x{self.size}x{self.slices}-seed{self.seed}-v{GENERATOR_VERSION}"


@dataclass(frozen=True)
class Series:
    """A generated series on disk."""

    spec: SeriesSpec
    files: tuple[Path, ...]
    nbytes: int

    def describe(self) -> str:
        spec = self.spec
        kind = "int16" if spec.modality == "CT" else "uint16"
        return f"{spec.modality} {len(self.files)} x {spec.size}x{spec.size} {kind}, {self.nbytes / 1e6:.1f} MB"


@dataclass(frozen=True)
class _Model:
    """How a modality's series looks: geometry (mm) and pixel values."""

    sop_class: SOPClass
    series_number: int
    field_of_view: float
    slice_thickness: float
    signed: bool
    bits_stored: int
    outside: int  # air around the body
    tissue: int
    organ: int  # a disk inside the body, its radius varying along the series
    noise: float  # standard deviation of the Gaussian noise


_MODELS = {
    # Hounsfield units, signed 16 bit
    "CT": _Model(SOPClass.CT_IMAGE, 2, 500.0, 1.0, True, 16, -1000, 40, 300, 12.0),
    # arbitrary units, unsigned 12 bit
    "MR": _Model(SOPClass.MR_IMAGE, 3, 240.0, 1.5, False, 12, 10, 600, 1400, 30.0),
}


def cached(cache_dir: Path, spec: SeriesSpec) -> Series | None:
    """The series ``spec`` if ``cache_dir`` holds it complete, else None."""
    directory = cache_dir / spec.key
    files = tuple(sorted(directory.glob("*.dcm")))
    if not (directory / "complete").exists() or len(files) != spec.slices:
        return None
    return Series(spec, files, sum(f.stat().st_size for f in files))


def generate(cache_dir: Path, spec: SeriesSpec) -> Series:
    """Write the series ``spec`` into ``cache_dir`` (atomically: staged, then renamed)."""
    directory = cache_dir / spec.key
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.key}.", dir=cache_dir))
    try:
        _write_series(spec, staging)
        (staging / "complete").write_text("")
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    series = cached(cache_dir, spec)
    assert series is not None
    return series


def _write_series(spec: SeriesSpec, directory: Path) -> None:
    """Write the slices of ``spec`` into ``directory`` as Part 10 files, Implicit VR LE.

    The pixels are a phantom (an elliptic body holding a disk whose radius changes along
    the series) plus Gaussian noise from a fixed seed: deterministic, and not a block of
    zeros that some layer could shortcut.
    """
    model = _MODELS[spec.modality]
    thickness = model.slice_thickness

    def uid(*parts: object) -> UID:
        # 2.25 + a name-based UUID (PS3.5 B.2): unique without an org root, and repeatable
        # (pydicom's generate_uid(prefix=None) ignores entropy_srcs and is random)
        name = "/".join(["appliance bench-scp", spec.key, *map(str, parts)])
        return UID(f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}")

    study_uid, series_uid, frame_uid = uid("study"), uid("series"), uid("frame of reference")
    rng = np.random.default_rng(spec.seed)
    n = spec.size
    yy, xx = np.mgrid[0:n, 0:n]
    centre = (n - 1) / 2
    body = ((xx - centre) / (0.42 * n)) ** 2 + ((yy - centre) / (0.34 * n)) ** 2 <= 1.0
    radius = np.hypot(xx - centre, yy - centre)
    bits = model.bits_stored
    dtype = np.dtype(np.int16 if model.signed else np.uint16)
    lowest = -(2 ** (bits - 1)) if model.signed else 0
    highest = lowest + 2**bits - 1
    spacing = model.field_of_view / n
    origin = -model.field_of_view / 2

    for i in range(spec.slices):
        z = origin + i * thickness
        organ_r = 0.12 * n * (1.25 + np.sin(2 * np.pi * i / max(spec.slices, 1)))
        image = np.where(body, model.tissue, model.outside).astype(np.float64)
        image[radius <= organ_r] = model.organ
        image += rng.normal(0.0, model.noise, (n, n))
        pixels = np.clip(np.rint(image), lowest, highest).astype(dtype)

        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = UID(model.sop_class)
        ds.SOPInstanceUID = uid("instance", i)
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240115"
        ds.StudyTime = ds.SeriesTime = "093000"
        ds.ContentTime = f"0930{i % 60:02d}"
        ds.AccessionNumber = ""
        ds.Modality = spec.modality
        ds.Manufacturer = "appliance bench-scp"
        ds.ReferringPhysicianName = ""
        ds.SeriesDescription = f"bench {spec.modality} {spec.slices} slices"
        ds.PatientName = "BENCH^PHANTOM"
        ds.PatientID = "BENCH-0001"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.SliceThickness = f"{thickness:g}"
        ds.SpacingBetweenSlices = f"{thickness:g}"
        ds.PatientPosition = "HFS"
        if spec.modality == "CT":
            ds.KVP = "120"
        else:
            ds.ScanningSequence = "SE"
            ds.SequenceVariant = "NONE"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "2D"
            ds.RepetitionTime = "500"
            ds.EchoTime = "15"
            ds.EchoTrainLength = "1"
            ds.MagneticFieldStrength = "1.5"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = model.series_number
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [f"{origin:g}", f"{origin:g}", f"{z:g}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{z:g}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = n
        ds.PixelSpacing = [f"{spacing:.6g}", f"{spacing:.6g}"]
        ds.BitsAllocated = 16
        ds.BitsStored = bits
        ds.HighBit = bits - 1
        ds.PixelRepresentation = 1 if model.signed else 0
        if spec.modality == "CT":
            ds.WindowCenter, ds.WindowWidth = "40", "400"
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
        else:
            ds.WindowCenter, ds.WindowWidth = "800", "1600"
        ds.PixelData = pixels.tobytes()

        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = UID(TransferSyntax.IMPLICIT_LE)
        ds.save_as(directory / f"{spec.modality.lower()}{i + 1:04d}.dcm", enforce_file_format=True)
