"""RT Dose and RT Plan export: accuracy against an analytic dose, bounding boxes, geometry
equal to the series', IOD validity (dcmdump, dciodvfy), and round trips to DCMTK storescp
and a USB folder, re-read with pydicom.

Every case is generated: an oblique CT series (rotated 30 degrees in-plane, unequal row and
column spacing), an RT Structure Set whose contours lie on its slices, and a dose on an input
grid rotated about all three axes, not aligned with the series.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import subprocess
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.fileset import FileSet
from pydicom.uid import ExplicitVRLittleEndian

from appliance.cli import main
from appliance.config import Config
from appliance.conformance import SPATIAL_REGISTRATION, UID_ROOT, SOPClass, TransferSyntax, new_uid
from appliance.dicom.dosegrid import Box, fraction_inside
from appliance.rt.inputs import RTExportError, read_dose
from appliance.rt.rtexport import GridOptions, build
from appliance.store.store import Store

from helpers import dcmtk, sample
from test_sender import PEER_AE, put, put_file, storescp  # noqa: F401 - storescp is a fixture

# -- the analytic dose -----------------------------------------------------------------------

#: f(p) = A + B sin(k . p + phi), Gy, p in mm (patient coordinates of the series' frame).
A, B, PHI = 20.0, 10.0, 0.3
K = 2 * math.pi / 80.0 * np.array([0.6, -0.48, 0.64])  # |k| = 2 pi / 80 mm, along no axis


def f(p: np.ndarray) -> np.ndarray:
    return A + B * np.sin(p @ K + PHI)


def trilinear_bound(axes: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """The error bound of trilinear interpolation of f on a grid with unit ``axes`` (columns,
    in the series' frame) and ``spacing`` (mm) along them.

    Tensor-product linear interpolation I = Ix Iy Iz, each of sup-norm 1, so
    |f - I f| <= sum_i h_i^2 / 8 * max |d^2 f / du_i^2|, and here d^2 f / du_i^2 =
    -B (k . e_i)^2 sin(...), so the bound is B / 8 * sum_i h_i^2 (k . e_i)^2."""
    return B / 8 * sum(h * h * float(K @ axes[:, i]) ** 2 for i, h in enumerate(spacing))


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


#: The input dose grid: rotated about x, y and z; spacing (columns, rows, frames) in mm.
DOSE_AXES = rotation(math.radians(15), math.radians(10), math.radians(20))
DOSE_SPACING = (2.0, 3.0, 2.5)
#: Quantization of the input RT Dose (32 bits) and of ours (16 bits): half a step each.
OUT_STEP_BOUND = (A + B) / 65535


# -- the generated case -------------------------------------------------------------------------


@dataclass
class Case:
    images: list[Dataset]
    ss: Dataset
    frame: str
    series_axes: np.ndarray  # columns: row dir, column dir, normal
    rois: dict[str, np.ndarray]  # ROI name -> contour points

    @property
    def series_uid(self) -> str:
        return str(self.images[0].SeriesInstanceUID)

    @property
    def ss_uid(self) -> str:
        return str(self.ss.SOPInstanceUID)


SERIES_ANGLE = math.radians(30)
ROW_DIR = np.array([math.cos(SERIES_ANGLE), math.sin(SERIES_ANGLE), 0.0])
COL_DIR = np.array([-math.sin(SERIES_ANGLE), math.cos(SERIES_ANGLE), 0.0])
PIXEL_SPACING = (1.5, 1.25)  # between rows, between columns
SLICE_GAP = 2.5
N_SLICES, N_ROWS, N_COLS = 20, 40, 48
ORIGIN = np.array([-20.0, -35.0, -25.0])


def _slice_position(k: int) -> np.ndarray:
    return ORIGIN + k * SLICE_GAP * np.cross(ROW_DIR, COL_DIR)


def _ellipse(k: int, center: tuple[float, float], radii: tuple[float, float], n: int = 24) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return (_slice_position(k) + np.outer(center[0] + radii[0] * np.cos(t), ROW_DIR)
            + np.outer(center[1] + radii[1] * np.sin(t), COL_DIR))


def make_case(store: Store, *, charset: str = "ISO_IR 100", patient: str = "Müller^Jürgen",
              names: tuple[str, str, str] = ("PTV Lunge", "Rückenmark", "Marker")) -> Case:
    study, series, frame = new_uid(), new_uid(), new_uid()
    images = []
    for k in range(N_SLICES):
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = str(SOPClass.CT_IMAGE)
        ds.SOPInstanceUID = new_uid()
        ds.StudyDate, ds.StudyTime = "20260301", "093000"
        ds.Modality, ds.Manufacturer = "CT", "Test"
        ds.PatientName = "Müller^Jürgen"
        ds.PatientID = "RT-1"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SeriesNumber, ds.InstanceNumber = 2, k + 1
        ds.ImagePositionPatient = [round(float(v), 6) for v in _slice_position(k)]
        ds.ImageOrientationPatient = [round(float(v), 8) for v in (*ROW_DIR, *COL_DIR)]
        ds.PixelSpacing = list(PIXEL_SPACING)
        ds.SliceThickness = ds.SpacingBetweenSlices = SLICE_GAP
        ds.PositionReferenceIndicator = ""
        ds.Rows, ds.Columns = N_ROWS, N_COLS
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = np.full((N_ROWS, N_COLS), 1000, dtype=np.int16).tobytes()
        images.append(ds)
        put(store, ds)
    rois = {
        names[0]: np.concatenate([_ellipse(k, (30.0, 25.0), (9.3, 6.1)) for k in range(5, 12)]),
        names[1]: np.concatenate([_ellipse(k, (22.0, 40.0), (3.0, 3.0), 12) for k in range(2, 17)]),
        names[2]: _slice_position(9) + 20 * ROW_DIR + 18 * COL_DIR,
    }
    ss = Dataset()
    ss.SpecificCharacterSet = charset
    ss.SOPClassUID = str(SOPClass.RT_STRUCTURE_SET)
    ss.SOPInstanceUID = new_uid()
    ss.Modality = "RTSTRUCT"
    ss.PatientName, ss.PatientID, ss.PatientBirthDate, ss.PatientSex = patient, "RT-1", "19500101", "F"
    ss.StudyDate, ss.StudyTime, ss.StudyInstanceUID, ss.StudyID = "20260301", "093000", study, "S1"
    ss.AccessionNumber, ss.ReferringPhysicianName = "A1", ""
    ss.SeriesInstanceUID, ss.SeriesNumber, ss.InstanceNumber = new_uid(), 90, 1
    ss.StructureSetLabel = "Plan"
    ss.StructureSetDate, ss.StructureSetTime = "20260301", "100000"
    se = Dataset()
    se.SeriesInstanceUID = series
    se.ContourImageSequence = []
    for img in images:
        ci = Dataset()
        ci.ReferencedSOPClassUID, ci.ReferencedSOPInstanceUID = img.SOPClassUID, img.SOPInstanceUID
        se.ContourImageSequence.append(ci)
    st = Dataset()
    st.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # noqa: S105 - Detached Study (retired), tests only
    st.ReferencedSOPInstanceUID = study
    st.RTReferencedSeriesSequence = [se]
    fr = Dataset()
    fr.FrameOfReferenceUID = frame
    fr.RTReferencedStudySequence = [st]
    ss.ReferencedFrameOfReferenceSequence = [fr]
    ss.StructureSetROISequence, ss.ROIContourSequence = [], []
    for n, (name, pts) in enumerate(rois.items(), 1):
        r = Dataset()
        r.ROINumber, r.ReferencedFrameOfReferenceUID, r.ROIName = n, frame, name
        r.ROIGenerationAlgorithm = "MANUAL"
        ss.StructureSetROISequence.append(r)
        rc = Dataset()
        rc.ReferencedROINumber = n
        rc.ROIDisplayColor = [255, 0, 0]
        rc.ContourSequence = []
        per = pts.reshape(-1, 24 if n == 1 else 12, 3) if n < 3 else pts.reshape(1, 1, 3)
        for contour in per:
            c = Dataset()
            c.ContourGeometricType = "CLOSED_PLANAR" if n < 3 else "POINT"
            c.NumberOfContourPoints = len(contour)
            c.ContourData = [round(float(v), 6) for v in contour.ravel()]
            rc.ContourSequence.append(c)
        ss.ROIContourSequence.append(rc)
    put(store, ss)
    rois = {name: np.asarray(
        [float(v) for c in rc.ContourSequence for v in c.ContourData]).reshape(-1, 3)
        for name, rc in zip(rois, ss.ROIContourSequence)}
    axes = np.column_stack([ROW_DIR, COL_DIR, np.cross(ROW_DIR, COL_DIR)])
    return Case(images, ss, frame, axes, rois)


def dose_grid(half_extent: float = 60.0, to_frame: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """(origin, points (frames, rows, cols, 3), shape) of the rotated input grid around the
    series' centre; ``to_frame`` maps series coordinates into the dose's frame."""
    center = _slice_position(N_SLICES // 2) + 30 * ROW_DIR + 30 * COL_DIR
    if to_frame is not None:
        center = to_frame[:3, :3] @ center + to_frame[:3, 3]
    n = [int(2 * half_extent / h) + 1 for h in DOSE_SPACING]  # columns, rows, frames
    origin = center - DOSE_AXES @ (np.array([n[0] - 1, n[1] - 1, n[2] - 1]) * DOSE_SPACING / 2)
    k, j, i = np.meshgrid(np.arange(n[2]) * DOSE_SPACING[2], np.arange(n[1]) * DOSE_SPACING[1],
                          np.arange(n[0]) * DOSE_SPACING[0], indexing="ij")
    pts = origin + i[..., None] * DOSE_AXES[:, 0] + j[..., None] * DOSE_AXES[:, 1] + k[..., None] * DOSE_AXES[:, 2]
    return origin, pts, (n[2], n[1], n[0])


def write_rt_dose(path: Path, frame: str, values: np.ndarray, origin: np.ndarray, **attrs: str) -> float:
    """Write ``values`` (frames, rows, cols), Gy, as a 32-bit RT Dose on the rotated grid; return its scaling."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = str(SOPClass.RT_DOSE), new_uid()
    ds.Modality, ds.PatientID = "RTDOSE", "RT-1"
    ds.FrameOfReferenceUID = frame
    ds.ImageOrientationPatient = [float(v) for v in (*DOSE_AXES[:, 0], *DOSE_AXES[:, 1])]
    ds.ImagePositionPatient = [float(v) for v in origin]
    ds.PixelSpacing = [DOSE_SPACING[1], DOSE_SPACING[0]]
    ds.NumberOfFrames = values.shape[0]
    ds.GridFrameOffsetVector = [k * DOSE_SPACING[2] for k in range(values.shape[0])]
    ds.Rows, ds.Columns = values.shape[1], values.shape[2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 32
    ds.HighBit, ds.PixelRepresentation = 31, 0
    scaling = float(values.max()) / (2**32 - 2)
    ds.DoseUnits, ds.DoseType, ds.DoseSummationType = "GY", "PHYSICAL", "PLAN"
    ds.DoseGridScaling = f"{scaling:.9e}"
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.PixelData = np.rint(values / float(ds.DoseGridScaling)).astype("<u4").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return float(ds.DoseGridScaling)


@pytest.fixture
def box(tmp_path: Path) -> Store:
    s = Store(tmp_path / "data")
    yield s  # type: ignore[misc]
    s.close()


@pytest.fixture
def case(box: Store) -> Case:
    return make_case(box)


@pytest.fixture
def dose_file(tmp_path: Path, case: Case) -> Path:
    origin, pts, _ = dose_grid()
    path = tmp_path / "dose.dcm"
    write_rt_dose(path, case.frame, f(pts), origin)
    return path


# -- reading back what was generated ----------------------------------------------------------


def grid_points(ds: Dataset) -> np.ndarray:
    """Patient coordinates of every voxel of an RT Dose, computed from its attributes only."""
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    dy, dx = (float(v) for v in ds.PixelSpacing)
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    offsets = [float(v) for v in ds.GridFrameOffsetVector]
    k, j, i = np.meshgrid(offsets, np.arange(ds.Rows) * dy, np.arange(ds.Columns) * dx, indexing="ij")
    return ipp + i[..., None] * row + j[..., None] * col + k[..., None] * normal


def dose_values(ds: Dataset) -> np.ndarray:
    return ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns) * float(ds.DoseGridScaling)


def parsed(made) -> dict[str, Dataset]:  # type: ignore[no-untyped-def]
    return {o.sop_instance_uid: dcmread(BytesIO(o.part10())) for o in made.objects}


def assert_within_bound(ds: Dataset, bound: float) -> float:
    err = float(np.max(np.abs(dose_values(ds) - f(grid_points(ds)))))
    assert err <= bound, f"max error {err:.4g} Gy exceeds the bound {bound:.4g} Gy"
    return err


def interpolation_bound(axes: np.ndarray = DOSE_AXES) -> float:
    # Input quantization (32 bits) is ~1e-8 Gy; the output's is half a 16-bit step.
    return trilinear_bound(axes, DOSE_SPACING) + OUT_STEP_BOUND / 2 + 1e-6


def check_objects(objects: dict[str, Dataset], case: Case, rois: tuple[str, ...] = ("PTV Lunge", "Rückenmark")) -> None:
    """Every value of the generated objects (as re-read) is as it must be."""
    doses = {u: d for u, d in objects.items() if d.SOPClassUID == SOPClass.RT_DOSE}
    plans = [d for d in objects.values() if d.SOPClassUID == SOPClass.RT_PLAN]
    assert len(plans) == 1 and len(doses) == len(rois)
    plan = plans[0]
    assert [str(d.DoseComment) for d in sorted(doses.values(), key=lambda d: d.InstanceNumber)] == list(rois)
    assert {str(r.ReferencedSOPInstanceUID) for r in plan.ReferencedDoseSequence} == set(doses)
    assert all(r.ReferencedSOPClassUID == SOPClass.RT_DOSE for r in plan.ReferencedDoseSequence)
    assert plan.RTPlanGeometry == "PATIENT"
    assert plan.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == case.ss_uid
    assert plan.ReferencedStructureSetSequence[0].ReferencedSOPClassUID == SOPClass.RT_STRUCTURE_SET
    assert plan.Modality == "RTPLAN"
    for ds in [*doses.values(), plan]:
        assert ds.file_meta.TransferSyntaxUID == TransferSyntax.IMPLICIT_LE
        for kw in ("SOPInstanceUID", "SeriesInstanceUID"):
            uid = str(ds[kw].value)
            assert uid.startswith(UID_ROOT) and len(uid) <= 64 and re.fullmatch(r"2\.25\.[1-9][0-9]*", uid)
        assert ds.FrameOfReferenceUID == case.frame
        for kw in ("SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                   "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber"):
            assert ds[kw].value == case.ss[kw].value, kw
    assert len({d.SeriesInstanceUID for d in doses.values()}) == 1
    assert plan.SeriesInstanceUID not in {d.SeriesInstanceUID for d in doses.values()}
    for ds in doses.values():
        assert (ds.Modality, ds.DoseUnits, ds.DoseType, ds.DoseSummationType) == ("RTDOSE", "GY", "PHYSICAL", "PLAN")
        assert ds.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == plan.SOPInstanceUID
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 16, 15, 0)
        assert int(ds.pixel_array.max()) <= 65535 and int(ds.pixel_array.max()) > 65535 * 0.99  # full range, no clip
        assert list(ds.ImageOrientationPatient) == list(case.images[0].ImageOrientationPatient)
        assert_within_bound(ds, interpolation_bound())


# -- accuracy ------------------------------------------------------------------------------------


def test_analytic_dose_on_a_rotated_grid_is_resampled_within_the_trilinear_bound(box, case, dose_file) -> None:  # type: ignore[no-untyped-def]
    made = build(box, case.series_uid, case.ss_uid, read_dose(dose_file))
    bound = interpolation_bound()
    # The stated bound: B/8 * sum h_i^2 (k.e_i)^2 on the input grid, plus half a 16-bit step.
    assert 0.051 < bound < 0.052  # Gy: about 0.17 % of the 30 Gy maximum
    errors = []
    for d, ds in zip(made.doses, parsed(made).values()):
        assert d.outside == 0
        errors.append(assert_within_bound(ds, bound))
    assert max(errors) > bound / 10  # the comparison is not vacuous: the input grid is coarse


def test_an_affine_dose_is_reproduced_up_to_quantization(box, case, tmp_path) -> None:  # type: ignore[no-untyped-def]
    origin, pts, _ = dose_grid()
    g = lambda p: 20 + p @ np.array([0.1, -0.05, 0.08])  # noqa: E731 - trilinear is exact for it
    write_rt_dose(tmp_path / "affine.dcm", case.frame, g(pts), origin)
    made = build(box, case.series_uid, case.ss_uid, read_dose(tmp_path / "affine.dcm"))
    for ds in parsed(made).values():
        if ds.SOPClassUID == SOPClass.RT_DOSE:
            step = float(ds.DoseGridScaling)
            assert np.max(np.abs(dose_values(ds) - g(grid_points(ds)))) <= step / 2 + 1e-6


def test_points_outside_the_input_are_zero_and_counted(box, case, tmp_path) -> None:  # type: ignore[no-untyped-def]
    origin, pts, _ = dose_grid(half_extent=22.0)
    write_rt_dose(tmp_path / "small.dcm", case.frame, f(pts), origin)
    made = build(box, case.series_uid, case.ss_uid, read_dose(tmp_path / "small.dcm"))
    dose = parsed(made)[made.doses[1].obj.sop_instance_uid]  # the long spinal cord leaves the input grid
    assert made.doses[1].outside > 0
    values = dose_values(dose)
    assert int(np.sum(values == 0)) == made.doses[1].outside
    inside = values > 0
    assert np.max(np.abs(values - f(grid_points(dose)))[inside]) <= interpolation_bound()
    assert f"{made.doses[1].outside} point(s) outside" in made.render()


# -- geometry ----------------------------------------------------------------------------------


def test_each_grid_contains_its_roi_and_is_at_most_one_voxel_larger(box, case, dose_file) -> None:  # type: ignore[no-untyped-def]
    made = build(box, case.series_uid, case.ss_uid, read_dose(dose_file))
    for d in made.doses:
        ds = dcmread(BytesIO(d.obj.part10()))
        pts = case.rois[d.roi_name]
        corner = np.array([float(v) for v in ds.ImagePositionPatient])
        local = (pts - corner) @ case.series_axes  # along row dir, column dir, normal
        offsets = np.array([float(v) for v in ds.GridFrameOffsetVector])
        dy, dx = (float(v) for v in ds.PixelSpacing)
        extent = np.array([(ds.Columns - 1) * dx, (ds.Rows - 1) * dy, offsets[-1]])
        step = np.array([dx, dy, SLICE_GAP])
        tol = 1e-6
        assert np.all(local.min(axis=0) >= -tol) and np.all(local.max(axis=0) <= extent + tol)
        assert np.all(local.min(axis=0) < step - tol), "more than one voxel before the box"
        assert np.all(extent - local.max(axis=0) < step - tol), "more than one voxel after the box"


def test_orientation_spacing_and_positions_equal_the_series(box, case, dose_file) -> None:  # type: ignore[no-untyped-def]
    made = build(box, case.series_uid, case.ss_uid, read_dose(dose_file))
    series_ipp = np.array([[float(v) for v in img.ImagePositionPatient] for img in case.images])
    for ds in (d for d in parsed(made).values() if d.SOPClassUID == SOPClass.RT_DOSE):
        assert list(ds.ImageOrientationPatient) == list(case.images[0].ImageOrientationPatient)
        assert [float(v) for v in ds.PixelSpacing] == list(PIXEL_SPACING)
        corner = np.array([float(v) for v in ds.ImagePositionPatient])
        for w in (float(v) for v in ds.GridFrameOffsetVector):
            frame_pos = corner + w * case.series_axes[:, 2]
            # On one of the series' slices, and on its pixel lattice (whole pixels from its corner).
            k = int(np.argmin(np.abs((series_ipp - frame_pos) @ case.series_axes[:, 2])))
            delta = (frame_pos - series_ipp[k]) @ case.series_axes
            assert abs(delta[2]) < 1e-5
            assert abs(delta[0] / PIXEL_SPACING[1] - round(delta[0] / PIXEL_SPACING[1])) < 1e-5
            assert abs(delta[1] / PIXEL_SPACING[0] - round(delta[1] / PIXEL_SPACING[0])) < 1e-5


def test_spacings_are_configurable(box, case, dose_file) -> None:  # type: ignore[no-untyped-def]
    made = build(box, case.series_uid, case.ss_uid, read_dose(dose_file),
                 options=GridOptions(pixel_spacing=(2.0, 2.0), slice_spacing=5.0))
    for ds in (d for d in parsed(made).values() if d.SOPClassUID == SOPClass.RT_DOSE):
        assert [float(v) for v in ds.PixelSpacing] == [2.0, 2.0]
        assert np.allclose(np.diff([float(v) for v in ds.GridFrameOffsetVector]), 5.0)
        assert_within_bound(ds, interpolation_bound())


# -- coverage: the part of each ROI with no image or no dose -----------------------------------


def test_fraction_inside_matches_sampling_for_boxes_in_any_orientation() -> None:
    rng = np.random.default_rng(18)
    partial = 0
    for trial in range(8):
        ra, ba = rotation(*rng.uniform(-1, 1, 3)), rotation(*rng.uniform(-1, 1, 3))
        lo = rng.uniform(-5, 15, 3)
        hi = lo + rng.uniform(10, 40, 3)
        if trial >= 6:
            hi[2] = lo[2]  # a flat box (one slice): the fraction of its area
        to_region = np.eye(4)
        to_region[:3, :3] = rotation(0.1, -0.05, 0.2)
        to_region[:3, 3] = rng.uniform(-3, 3, 3)
        # The region (in another frame and orientation) about the box's centre, shifted by up to 15 mm.
        size = rng.uniform(20, 40, 3)
        centre = to_region[:3, :3] @ (ba @ ((lo + hi) / 2)) + to_region[:3, 3] + rng.uniform(-15, 15, 3)
        region = Box(tuple(centre - ra @ size / 2), (*ra[:, 0], *ra[:, 1]), (0.0, 0.0, 0.0), tuple(size))
        box = Box((0.0, 0.0, 0.0), (*ba[:, 0], *ba[:, 1]), tuple(lo), tuple(hi))
        got = fraction_inside(box, region, to_region=to_region, tolerance=1e-9)
        u = lo + rng.random((400_000, 3)) * (hi - lo)
        p = (u @ ba.T) @ to_region[:3, :3].T + to_region[:3, 3]
        v = (p - np.asarray(region.origin)) @ ra
        expected = float(np.mean(np.all((v >= 0) & (v <= size), axis=1)))
        assert abs(got - expected) < 0.005, (trial, got, expected)
        partial += 0.05 < expected < 0.95
    assert partial >= 6  # the boxes overlap in part: the comparison is not vacuous
    inside = Box((0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0), (0.0, 0.0, 0.0), (10.0, 10.0, 10.0))
    assert fraction_inside(Box((2.0, 3.0, 4.0), (1, 0, 0, 0, 1, 0), (0.0,) * 3, (0.0,) * 3), inside) == 1.0
    assert fraction_inside(Box((2.0, 3.0, 11.0), (1, 0, 0, 0, 1, 0), (0.0,) * 3, (0.0,) * 3), inside) == 0.0


def test_a_dose_that_misses_part_of_an_oblique_roi_is_a_warning(box, case, tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    origin, pts, shape = dose_grid(half_extent=22.0)
    write_rt_dose(tmp_path / "small.dcm", case.frame, f(pts), origin)
    with caplog.at_level(logging.WARNING, logger="appliance.rt.rtexport"):
        made = build(box, case.series_uid, case.ss_uid, read_dose(tmp_path / "small.dcm"))
    cord = made.doses[1]
    # The cord's bounding box along the oblique series' axes, sampled, against the rotated input grid.
    local = (case.rois["Rückenmark"] - _slice_position(0)) @ case.series_axes
    rng = np.random.default_rng(4)
    u = local.min(axis=0) + rng.random((400_000, 3)) * (local.max(axis=0) - local.min(axis=0))
    v = (_slice_position(0) + u @ case.series_axes.T - origin) @ DOSE_AXES
    extent = (np.array(shape[::-1]) - 1) * DOSE_SPACING
    expected = 1 - float(np.mean(np.all((v >= -0.01) & (v <= extent + 0.01), axis=1)))
    assert 0.01 < expected < 0.99
    assert cord.coverage.no_dose == pytest.approx(expected, abs=0.005)
    assert cord.coverage.no_image == 0
    text = f"ROI 'Rückenmark' (2): {round(100 * cord.coverage.no_dose)} % of its extent has no dose"
    assert made.warnings == (text,)
    assert f"warning: {text}" in made.render()
    assert text in caplog.text
    assert made.doses[0].coverage.warning == ""  # the PTV lies inside


def test_a_fully_covered_case_warns_nothing(box, case, dose_file, caplog) -> None:  # type: ignore[no-untyped-def]
    with caplog.at_level(logging.WARNING):
        made = build(box, case.series_uid, case.ss_uid, read_dose(dose_file))
    assert made.warnings == ()
    assert all(d.coverage.no_image == 0 and d.coverage.no_dose == 0 for d in made.doses)
    assert "warning" not in made.render() and caplog.text == ""


#: The real LCTSC slice is copied along z, 3 mm apart (its Slice Thickness), from this slice on.
LCTSC_FIRST, LCTSC_SLICES = -550.2, 37


@dataclass
class Lctsc:
    store: Store
    series_uid: str
    ss: Dataset  # the real structure set as stored
    frame: str
    #: The lowest and highest corner of what the slices cover (patient coordinates; the series is axial).
    corners: tuple[np.ndarray, np.ndarray]


@pytest.fixture(scope="module")
def lctsc(tmp_path_factory) -> Lctsc:  # type: ignore[no-untyped-def]
    """A CT series made of the LCTSC sample slice (real pixels, geometry and frame), shorter than
    the sample structure set's ROIs, and that structure set, stored."""
    store = Store(tmp_path_factory.mktemp("lctsc") / "data")
    ct = dcmread(sample("ct_ele_2").path)
    series = new_uid()
    for k in range(LCTSC_SLICES):
        ds = copy.deepcopy(ct)
        ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = new_uid(), series, k + 1
        x, y, _ = (float(v) for v in ct.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, round(LCTSC_FIRST + 3.0 * k, 6)]
        put(store, ds)
    put_file(store, sample("rtstruct_ile_large").path)
    x, y, _ = (float(v) for v in ct.ImagePositionPatient)
    dy, dx = (float(v) for v in ct.PixelSpacing)
    lo = np.array([x, y, LCTSC_FIRST])
    hi = np.array([x + (ct.Columns - 1) * dx, y + (ct.Rows - 1) * dy, LCTSC_FIRST + 3.0 * (LCTSC_SLICES - 1)])
    yield Lctsc(store, series, dcmread(sample("rtstruct_ile_large").path), str(ct.FrameOfReferenceUID), (lo, hi))
    store.close()


def roi_boxes(ss: Dataset) -> dict[str, tuple[int, np.ndarray, np.ndarray]]:
    """ROI name -> (number, lowest x y z, highest x y z) of its contour points, read from the structure set."""
    names = {int(r.ROINumber): str(r.ROIName) for r in ss.StructureSetROISequence}
    out = {}
    for rc in ss.ROIContourSequence:
        pts = np.concatenate([np.array([float(v) for v in c.ContourData]).reshape(-1, 3) for c in rc.ContourSequence])
        out[names[int(rc.ReferencedROINumber)]] = (int(rc.ReferencedROINumber), pts.min(axis=0), pts.max(axis=0))
    return out


def outside(lo: np.ndarray, hi: np.ndarray, elo: np.ndarray, ehi: np.ndarray) -> float:
    """The fraction of the axis-aligned box [lo, hi] outside [elo, ehi] (a flat axis counts by its position)."""
    inside = 1.0
    for a, b, c, d in zip(lo, hi, elo, ehi):
        inside *= float(c <= a <= d) if b - a < 0.01 else max(0.0, min(b, d) - max(a, c)) / (b - a)
    return 1 - inside


def sample_dose(path: Path, frame: str, origin: tuple[float, float, float], spacing: float, gap: float,
                frames: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The pydicom RT Dose sample (10 x 10 x 15 points) as an absolute dose in ``frame``, placed at
    ``origin`` with ``spacing`` in-plane and ``gap`` between frames, only its first ``frames`` kept.
    Returns the lowest and highest corner of its grid."""
    ds = dcmread(sample("rej_rtdose").path)
    n = frames or int(ds.NumberOfFrames)
    pixels = ds.pixel_array[:n]
    ds.SOPInstanceUID, ds.DoseUnits, ds.FrameOfReferenceUID = new_uid(), "GY", frame
    ds.ImagePositionPatient, ds.PixelSpacing = list(origin), [spacing, spacing]
    ds.NumberOfFrames, ds.GridFrameOffsetVector = n, [k * gap for k in range(n)]
    ds.PixelData = pixels.astype("<u4").tobytes()
    ds.save_as(path, enforce_file_format=True)
    lo = np.asarray(origin, dtype=float)
    return lo, lo + np.array([(ds.Columns - 1) * spacing, (ds.Rows - 1) * spacing, (n - 1) * gap])


#: The dose grid over the heart: 20 mm in-plane, 8 mm between frames (180 x 180 x 112 mm).
HEART_DOSE = {"origin": (-60.0, -300.0, -550.0), "spacing": 20.0, "gap": 8.0}


def check_lctsc(made, lctsc: Lctsc, dose: tuple[np.ndarray, np.ndarray], rois: dict) -> None:  # type: ignore[no-untyped-def, type-arg]
    """Each ROI's fractions, its warning's percentages and words, against the boxes computed here."""
    lo_img, hi_img = lctsc.corners
    for d in made.doses:
        number, lo, hi = rois[d.roi_name]
        no_image, no_dose = outside(lo, hi, lo_img, hi_img), outside(lo, hi, *dose)
        assert d.coverage.no_image == pytest.approx(no_image, abs=1e-3), d.roi_name
        assert d.coverage.no_dose == pytest.approx(no_dose, abs=1e-3), d.roi_name
        text = d.coverage.warning
        if not no_image and not no_dose:
            assert text == ""
            continue
        assert text.startswith(f"ROI {d.roi_name!r} ({number}): ")
        if no_image:
            assert f"{round(100 * no_image)} % of its extent lies outside the CT series (" in text
            if hi[2] > hi_img[2] + 0.01:  # the contours' -550.20001 is the slice at -550.2
                assert f"z {hi_img[2]:.1f}..{hi[2]:.1f} mm beyond the last slice at {hi_img[2]:.1f} mm" in text
            if lo[2] < lo_img[2] - 0.01:
                assert f"z {lo[2]:.1f}..{lo_img[2]:.1f} mm beyond the first slice at {lo_img[2]:.1f} mm" in text
        if no_dose:
            assert text.endswith(f"; {round(100 * no_dose)} % has no dose" if no_image else
                                 f": {round(100 * no_dose)} % of its extent has no dose")
    assert made.warnings == tuple(d.coverage.warning for d in made.doses if d.coverage.warning)


def test_real_rois_past_the_last_slice_and_a_cropped_dose_are_warned_in_percent(lctsc, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    rois = roi_boxes(lctsc.ss)
    uid = str(lctsc.ss.SOPInstanceUID)
    full = sample_dose(tmp_path / "heart.dcm", lctsc.frame, **HEART_DOSE)  # type: ignore[arg-type]
    made = build(lctsc.store, lctsc.series_uid, uid, read_dose(tmp_path / "heart.dcm"))
    assert {d.roi_name for d in made.doses} == set(rois)
    check_lctsc(made, lctsc, full, rois)
    heart = next(d for d in made.doses if d.roi_name == "Heart")
    assert heart.coverage.warning == ""  # inside the slices and the dose grid
    lung = next(d for d in made.doses if d.roi_name == "Lung_R")
    assert lung.coverage.no_image > 0.2 and lung.coverage.no_dose > lung.coverage.no_image
    # The same dose with its last 7 frames cropped: the heart's upper half has no dose.
    cropped = sample_dose(tmp_path / "cropped.dcm", lctsc.frame, frames=8, **HEART_DOSE)  # type: ignore[arg-type]
    made = build(lctsc.store, lctsc.series_uid, uid, read_dose(tmp_path / "cropped.dcm"), rois=["Heart", "Lung_L"])
    check_lctsc(made, lctsc, cropped, rois)
    assert 0.2 < made.doses[0].coverage.no_dose < 0.8 and made.doses[0].coverage.no_image == 0
    # The CLI prints the warnings with the other lines of the export.
    stick = tmp_path / "stick"
    stick.mkdir()
    args = ["--data-dir", str(lctsc.store.data_dir), "rt-export", "--series", lctsc.series_uid, "--structure-set",
            uid, "--dose", str(tmp_path / "cropped.dcm"), "--roi", "Heart", "--roi", "Lung_L", "--to", str(stick)]
    assert main(args) == 0
    out = capsys.readouterr().out
    for line in made.warnings:
        assert f"  warning: {line}\n" in out


def test_a_shifted_roi_past_the_images_edge_is_named_by_its_side(lctsc, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ss = copy.deepcopy(lctsc.ss)
    ss.SOPInstanceUID = new_uid()
    number = next(int(r.ROINumber) for r in ss.StructureSetROISequence if r.ROIName == "Heart")
    for rc in ss.ROIContourSequence:
        if int(rc.ReferencedROINumber) == number:  # 200 mm to the patient's left, 30 mm up
            for c in rc.ContourSequence:
                c.ContourData = [round(float(v) + dv, 4) for v, dv in zip(c.ContourData, [200.0, 0.0, 30.0] * len(c.ContourData))]
    path = tmp_path / "shifted.dcm"
    ss.save_as(path, enforce_file_format=True)
    put_file(lctsc.store, path)
    sample_dose(tmp_path / "heart.dcm", lctsc.frame, **HEART_DOSE)  # type: ignore[arg-type]
    made = build(lctsc.store, lctsc.series_uid, str(ss.SOPInstanceUID), read_dose(tmp_path / "heart.dcm"),
                 rois=["Heart"])
    _, lo, hi = roi_boxes(ss)["Heart"]
    lo_img, hi_img = lctsc.corners
    assert hi[0] > hi_img[0] and hi[2] > hi_img[2]
    text = made.doses[0].coverage.warning
    assert f"{round(100 * outside(lo, hi, lo_img, hi_img))} % of its extent lies outside the CT series" in text
    assert (f"(x {hi_img[0]:.1f}..{hi[0]:.1f} mm beyond the last column at {hi_img[0]:.1f} mm, "
            f"z {hi_img[2]:.1f}..{hi[2]:.1f} mm beyond the last slice at {hi_img[2]:.1f} mm)") in text
    assert text.endswith("% has no dose")


# -- selection and refusals ----------------------------------------------------------------------


def test_default_rois_are_the_closed_planar_ones_and_named_rois_are_checked(box, case, dose_file) -> None:  # type: ignore[no-untyped-def]
    dose = read_dose(dose_file)
    assert [d.roi_name for d in build(box, case.series_uid, case.ss_uid, dose).doses] == ["PTV Lunge", "Rückenmark"]
    assert [d.roi_name for d in build(box, case.series_uid, case.ss_uid, dose, rois=["Rückenmark"]).doses] == [
        "Rückenmark"]
    with pytest.raises(RTExportError, match="no ROI named 'GTV'.*'PTV Lunge', 'Rückenmark', 'Marker'"):
        build(box, case.series_uid, case.ss_uid, dose, rois=["GTV"])


def test_ambiguous_or_wrong_doses_are_refused(box, case, tmp_path) -> None:  # type: ignore[no-untyped-def]
    origin, pts, _ = dose_grid()
    values = f(pts)
    write_rt_dose(tmp_path / "rel.dcm", case.frame, values, origin, DoseUnits="RELATIVE")
    with pytest.raises(RTExportError, match="Dose Units 'RELATIVE'; only absolute dose in GY"):
        read_dose(tmp_path / "rel.dcm")
    write_rt_dose(tmp_path / "eff.dcm", case.frame, values, origin, DoseType="EFFECTIVE")
    with pytest.raises(RTExportError, match="Dose Type 'EFFECTIVE'"):
        read_dose(tmp_path / "eff.dcm")
    other = new_uid()
    write_rt_dose(tmp_path / "other.dcm", other, values, origin)
    with pytest.raises(RTExportError, match=f"Frame of Reference {other}.*give --registration"):
        build(box, case.series_uid, case.ss_uid, read_dose(tmp_path / "other.dcm"))
    (tmp_path / "junk.nii").write_bytes(b"not an image")
    with pytest.raises(RTExportError, match="neither DICOM nor a volume"):
        read_dose(tmp_path / "junk.nii", units="GY", frame_of_reference=case.frame)
    with pytest.raises(RTExportError, match="not stored"):
        build(box, new_uid(), case.ss_uid, read_dose(tmp_path / "other.dcm"))


# -- other inputs: NIfTI/MetaImage, a registration --------------------------------------------


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha"])
def test_a_volume_file_needs_units_and_frame_and_is_resampled_within_the_bound(box, case, tmp_path, suffix) -> None:  # type: ignore[no-untyped-def]
    import SimpleITK as sitk

    origin, pts, _ = dose_grid()
    image = sitk.GetImageFromArray((f(pts) * 100).astype(np.float32))  # cGy, (z, y, x)
    image.SetOrigin([float(v) for v in origin])
    image.SetSpacing(list(DOSE_SPACING))
    image.SetDirection([float(v) for v in DOSE_AXES.ravel()])
    path = tmp_path / f"dose{suffix}"
    sitk.WriteImage(image, str(path))
    with pytest.raises(RTExportError, match="give --dose-units GY or CGY"):
        read_dose(path, frame_of_reference=case.frame)
    with pytest.raises(RTExportError, match="no Frame of Reference; give --dose-frame-of-reference"):
        read_dose(path, units="CGY")
    made = build(box, case.series_uid, case.ss_uid, read_dose(path, units="CGY", frame_of_reference=case.frame))
    float32 = 30 * 2.0**-23  # the volume stores float32 cGy
    for ds in (d for d in parsed(made).values() if d.SOPClassUID == SOPClass.RT_DOSE):
        assert_within_bound(ds, interpolation_bound() + float32)


def test_a_dose_in_another_frame_is_placed_through_a_spatial_registration(box, case, tmp_path) -> None:  # type: ignore[no-untyped-def]
    other = new_uid()
    to_series = np.eye(4)  # dose frame -> series frame: rotate 5 degrees about z, then shift
    to_series[:3, :3] = rotation(0, 0, math.radians(5))
    to_series[:3, 3] = [3.0, -2.0, 1.5]
    to_dose = np.linalg.inv(to_series)
    origin, pts, _ = dose_grid(to_frame=to_dose)
    in_series = pts @ to_series[:3, :3].T + to_series[:3, 3]
    write_rt_dose(tmp_path / "moved.dcm", other, f(in_series), origin)
    reg = Dataset()
    reg.SOPClassUID, reg.SOPInstanceUID = SPATIAL_REGISTRATION, new_uid()
    reg.FrameOfReferenceUID = case.frame
    item, mr, m = Dataset(), Dataset(), Dataset()
    m.FrameOfReferenceTransformationMatrixType = "RIGID"
    m.FrameOfReferenceTransformationMatrix = [float(v) for v in to_series.ravel()]
    mr.MatrixSequence = [m]
    item.FrameOfReferenceUID = other
    item.MatrixRegistrationSequence = [mr]
    reg.RegistrationSequence = [item]
    reg.save_as(tmp_path / "reg.dcm", implicit_vr=True, little_endian=True, enforce_file_format=True)
    made = build(box, case.series_uid, case.ss_uid, read_dose(tmp_path / "moved.dcm"), registration=tmp_path / "reg.dcm")
    axes_in_series = to_series[:3, :3] @ DOSE_AXES
    for d, ds in zip(made.doses, parsed(made).values()):
        assert d.outside == 0
        assert ds.FrameOfReferenceUID == case.frame
        assert_within_bound(ds, interpolation_bound(axes_in_series))


# -- character sets -----------------------------------------------------------------------------


def test_generated_objects_carry_the_structure_sets_character_set(box, tmp_path) -> None:  # type: ignore[no-untyped-def]
    case = make_case(box, charset="ISO_IR 144", patient="Петров^Иван",
                     names=("Спинной мозг", "Лёгкое", "Метка"))
    origin, pts, _ = dose_grid()
    write_rt_dose(tmp_path / "d.dcm", case.frame, f(pts), origin)
    made = build(box, case.series_uid, case.ss_uid, read_dose(tmp_path / "d.dcm"))
    raw = made.doses[0].obj.body
    assert "Спинной мозг".encode("iso8859_5") in raw and "Петров^Иван".encode("iso8859_5") in raw
    ds = dcmread(BytesIO(made.doses[0].obj.part10()))
    assert ds.SpecificCharacterSet == "ISO_IR 144" and ds.DoseComment == "Спинной мозг"
    plan = dcmread(BytesIO(made.plan.part10()))
    assert "Лёгкое" in plan.RTPlanDescription
    assert "Лёгкое".encode("iso8859_5") in made.plan.body


# -- IOD validity ---------------------------------------------------------------------------------


def test_dcmdump_reads_and_dciodvfy_finds_no_errors(box, case, dose_file, tmp_path) -> None:  # type: ignore[no-untyped-def]
    made = build(box, case.series_uid, case.ss_uid, read_dose(dose_file))
    for obj in made.objects:
        path = tmp_path / f"{obj.sop_instance_uid}.dcm"
        path.write_bytes(obj.part10())
        dump = subprocess.run([dcmtk("dcmdump"), str(path)], capture_output=True, text=True, errors="replace",
                              timeout=60)
        assert dump.returncode == 0 and "E:" not in dump.stderr, dump.stderr
        verify = subprocess.run(["dciodvfy", "-filename", str(path)], capture_output=True, text=True, timeout=60)
        out = verify.stdout + verify.stderr
        assert "RTDose" in out or "RTPlan" in out, out  # the IOD was recognised
        errors = [line for line in out.splitlines() if line.startswith("Error")]
        assert errors == [], out


# -- round trips ---------------------------------------------------------------------------------


def rt_args(data_dir: Path, case: Case, dose: Path, *target: str) -> list[str]:
    return ["--data-dir", str(data_dir), "rt-export", "--series", case.series_uid, "--structure-set", case.ss_uid,
            "--dose", str(dose), *target]


def test_round_trip_to_storescp_with_the_series_and_structure_set(box, case, dose_file, storescp, capsys) -> None:  # type: ignore[no-untyped-def]
    peer = storescp()
    assert main(rt_args(box.data_dir, case, dose_file, "-aec", PEER_AE, "127.0.0.1", str(peer.port))) == 0
    out = capsys.readouterr().out
    assert "24 of 24 object(s) stored" in out, out  # 20 slices, the structure set, 2 doses, the plan
    received = peer.received()
    assert {str(i.SOPInstanceUID) for i in case.images} | {case.ss_uid} <= set(received)
    check_objects({u: d for u, d in received.items() if d.SOPClassUID in (SOPClass.RT_DOSE, SOPClass.RT_PLAN)}, case)


def test_round_trip_to_a_usb_folder_with_dicomdir(box, case, dose_file, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    stick = tmp_path / "stick"
    stick.mkdir()
    assert main(rt_args(box.data_dir, case, dose_file, "--to", str(stick))) == 0
    fs = FileSet(stick / "DICOMDIR")
    objects = {str(i.SOPInstanceUID): i.load() for i in fs}
    assert {str(i.SOPInstanceUID) for i in case.images} | {case.ss_uid} <= set(objects)
    check_objects({u: d for u, d in objects.items() if d.SOPClassUID in (SOPClass.RT_DOSE, SOPClass.RT_PLAN)}, case)
    kinds = {str(i.DirectoryRecordType) for i in fs}
    assert {"RT DOSE", "RT PLAN", "RT STRUCTURE SET", "IMAGE"} <= kinds, kinds


def test_cli_refuses_with_one_line_and_needs_one_target(box, case, dose_file, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as exc:
        main(rt_args(box.data_dir, case, dose_file))
    assert exc.value.code == 2
    capsys.readouterr()
    assert main(rt_args(box.data_dir, case, dose_file, "--roi", "GTV", "--to", str(tmp_path))) == 1
    err = capsys.readouterr().err
    assert err.startswith("appliance: structure set") and "no ROI named 'GTV'" in err
