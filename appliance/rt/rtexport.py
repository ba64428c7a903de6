"""RT Dose and RT Plan for export (sections 2.2 and 3.2, Tables 5, 7 and 11).

From a stored image series, a stored RT Structure Set and a dose file from the planning
side, :func:`build` makes, for each selected ROI, one RT Dose whose grid is aligned with the
series (its Image Orientation (Patient), its pixel lattice and slice positions, or spacings
given) and spans the ROI's bounding box, edges included; and one RT Plan (geometry PATIENT)
that references every dose, the structure set and the Frame of Reference.

* The dose file is an RT Dose on any grid and orientation, or a NIfTI or MetaImage volume
  read with SimpleITK (whose physical space is DICOM's LPS patient space). Its units,
  geometry and frame of reference are checked; ambiguity is refused (:class:`RTExportError`).
* Values are interpolated with :func:`appliance.dicom.dosegrid.resample` (scipy, trilinear by
  default); points outside the input are 0 and counted in the report.
* Generated objects carry new UIDs under :data:`appliance.conformance.UID_ROOT`, the
  structure set's patient, study and Specific Character Set, and are encoded once in
  Implicit VR LE; :func:`send` and :func:`write_usb` pass them, with the image series and the
  structure set, through :func:`appliance.net.sender.send` and :func:`appliance.media.exporter.export`.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.tag import Tag

from appliance import __version__
from appliance.config import Config, Destination
from appliance.conformance import (
    SPATIAL_REGISTRATION,
    SOPClass,
    TransferSyntax,
    new_uid,
)
from appliance.dicom import dosegrid
from appliance.dicom.dosegrid import GeometryError, Grid, Lattice
from appliance.dicom.transcode import Transcoded
from appliance.errors import ApplianceError
from appliance.media import exporter
from appliance.net import sender
from appliance.reports import Progress
from appliance.store.store import Store

log = logging.getLogger(__name__)

MANUFACTURER = "appliance"
PLAN_LABEL = "DOSE EXPORT"
#: Dose units a volume file (which cannot say) may be declared in, and their factor to Gy.
VOLUME_UNITS = {"GY": 1.0, "CGY": 0.01}
_SERIES_TAGS = ["SOPClassUID", "SOPInstanceUID", "FrameOfReferenceUID", "ImageOrientationPatient",
                "ImagePositionPatient", "PixelSpacing", "PatientID", "StudyInstanceUID",
                "PositionReferenceIndicator", "SliceThickness"]


class RTExportError(ApplianceError):
    """The RT Dose/RT Plan export cannot be made from these inputs; the message says why."""


def _floats(value: Any, n: int, what: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise RTExportError(f"{what} is not numeric: {value!r}") from None
    if len(out) != n:
        raise RTExportError(f"{what} has {len(out)} values; {n} are needed")
    return out


# -- the image series --------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    """An image series' geometry and identity, read from its stored headers."""

    series_uid: str
    frame_of_reference_uid: str
    patient_id: str
    #: The series' lattice: first slice (lowest along the normal), pixel spacing, slice offsets.
    lattice: Lattice
    #: Image Orientation (Patient) as the images write it (copied verbatim into the doses).
    orientation_text: tuple[str, ...]
    position_reference: str
    slice_thickness: str


def read_series(store: Store, series_uid: str) -> Series:
    """Read the geometry of stored image series ``series_uid``; refuse anything not one volume."""
    rows = store.instances(series_uid)
    if not rows:
        raise RTExportError(f"series {series_uid} is not stored on this box; 'appliance ls --series' lists them")
    headers = []
    for row in rows:
        try:
            headers.append(dcmread(store.data_dir / row.path, stop_before_pixels=True, specific_tags=_SERIES_TAGS))
        except (OSError, InvalidDicomError, ValueError) as exc:
            raise RTExportError(f"cannot read stored image {row.sop_instance_uid}: {exc}") from None
    if any("ImagePositionPatient" not in h or "ImageOrientationPatient" not in h or "PixelSpacing" not in h
           for h in headers):
        raise RTExportError(f"series {series_uid} is not an image volume: some objects lack Image Position/"
                            "Orientation (Patient) or Pixel Spacing")
    frames = {str(h.get("FrameOfReferenceUID", "")) for h in headers}
    if len(frames) != 1 or "" in frames:
        raise RTExportError(f"series {series_uid} has {'no' if frames == {''} else 'several'} Frame of Reference "
                            "UID; a dose can only be placed on a series in one frame of reference")
    first = headers[0]
    orientation = _floats(first.ImageOrientationPatient, 6, "Image Orientation (Patient)")
    spacing = _floats(first.PixelSpacing, 2, "Pixel Spacing")
    for h in headers[1:]:
        if np.max(np.abs(np.subtract(_floats(h.ImageOrientationPatient, 6, "Image Orientation (Patient)"),
                                     orientation))) > 1e-4:
            raise RTExportError(f"series {series_uid} mixes orientations; it is not one volume")
        if np.max(np.abs(np.subtract(_floats(h.PixelSpacing, 2, "Pixel Spacing"), spacing))) > 1e-4:
            raise RTExportError(f"series {series_uid} mixes pixel spacings; it is not one volume")
    try:
        axes = dosegrid.axes_of(orientation)
    except GeometryError as exc:
        raise RTExportError(f"series {series_uid}: {exc}") from None
    positions = np.array([_floats(h.ImagePositionPatient, 3, "Image Position (Patient)") for h in headers])
    along = positions @ axes[:, 2]
    order = np.argsort(along)
    along = along[order]
    if np.any(np.diff(along) < 1e-6):
        raise RTExportError(f"series {series_uid} has two slices at the same position; it is not one volume")
    origin = positions[order[0]]
    inplane = (positions - origin) @ axes[:, :2]
    if np.max(np.abs(inplane)) > 0.01:
        raise RTExportError(f"the slices of series {series_uid} are not stacked along their normal "
                            "(a gantry tilt); the dose grid cannot share their positions")
    return Series(
        series_uid,
        frames.pop(),
        str(first.get("PatientID", "")),
        Lattice((float(origin[0]), float(origin[1]), float(origin[2])), orientation,  # type: ignore[arg-type]
                (spacing[0], spacing[1]), tuple(float(w - along[0]) for w in along)),
        tuple(str(v) for v in first.ImageOrientationPatient),
        str(first.get("PositionReferenceIndicator", "") or ""),
        str(first.get("SliceThickness", "") or ""),
    )


# -- the structure set -------------------------------------------------------------------


@dataclass(frozen=True)
class Roi:
    """One ROI of a structure set, with every contour point (N, 3) in patient coordinates."""

    number: int
    name: str
    points: np.ndarray = field(repr=False)
    closed_planar: bool


@dataclass(frozen=True)
class StructureSet:
    """A stored structure set's header (patient, study, character set) and its ROIs."""

    dataset: Dataset
    rois: tuple[Roi, ...]
    #: Each ROI's Referenced Frame of Reference UID, by ROI number ("" if not given).
    frames: dict[int, str]


def read_structure_set(store: Store, uid: str, series: Series) -> StructureSet:
    """Read stored RT Structure Set ``uid`` and check it belongs with ``series``."""
    path = store.locate(uid)
    if path is None:
        raise RTExportError(f"no stored object has SOP Instance UID {uid}; 'appliance ls --instances' lists them")
    try:
        ds = dcmread(path)
    except (OSError, InvalidDicomError, ValueError) as exc:
        raise RTExportError(f"cannot read stored structure set {uid}: {exc}") from None
    if ds.get("SOPClassUID") != SOPClass.RT_STRUCTURE_SET:
        raise RTExportError(f"{uid} is not an RT Structure Set (it is {ds.get('SOPClassUID', 'of no SOP class')})")
    if str(ds.get("PatientID", "")) != series.patient_id:
        raise RTExportError(f"structure set {uid} is for patient ID '{ds.get('PatientID', '')}', series "
                            f"{series.series_uid} for '{series.patient_id}'")
    frames = {str(f.get("FrameOfReferenceUID", "")) for f in ds.get("ReferencedFrameOfReferenceSequence", [])}
    if series.frame_of_reference_uid not in frames:
        raise RTExportError(f"structure set {uid} does not reference the Frame of Reference "
                            f"{series.frame_of_reference_uid} of series {series.series_uid}")
    names: dict[int, tuple[str, str]] = {}
    for item in ds.get("StructureSetROISequence", []):
        names[int(item.ROINumber)] = (str(item.get("ROIName", "") or f"ROI {item.ROINumber}"),
                                      str(item.get("ReferencedFrameOfReferenceUID", "")))
    rois = []
    for rc in ds.get("ROIContourSequence", []):
        number = int(rc.ReferencedROINumber)
        name, frame = names.get(number, (f"ROI {number}", ""))
        pts: list[np.ndarray] = []
        closed = False
        for c in rc.get("ContourSequence", []):
            data = np.asarray([float(v) for v in c.get("ContourData", [])])
            if data.size % 3:
                raise RTExportError(f"ROI '{name}' of structure set {uid} has contour data whose length "
                                    f"{data.size} is not a multiple of 3")
            if data.size:
                pts.append(data.reshape(-1, 3))
                closed |= str(c.get("ContourGeometricType", "")) == "CLOSED_PLANAR"
        if frame and frame != series.frame_of_reference_uid:
            closed = False  # never selected by default; refused if asked for (select_rois)
        rois.append(Roi(number, name, np.concatenate(pts) if pts else np.empty((0, 3)), closed))
    header = Dataset()
    for elem in ds:
        if elem.keyword not in ("ROIContourSequence", "StructureSetROISequence", "RTROIObservationsSequence"):
            header.add(elem)
    return StructureSet(header, tuple(rois), {n: f for n, (_, f) in names.items()})


def select_rois(ss: StructureSet, names: Sequence[str], series: Series, uid: str) -> list[Roi]:
    """The ROIs named (each must exist once and have contours), or every closed-planar ROI."""
    frames = ss.frames
    if not names:
        chosen = [r for r in ss.rois if r.closed_planar]
        if not chosen:
            raise RTExportError(f"structure set {uid} has no closed-planar ROI in the series' frame of reference; "
                                "name ROIs with --roi")
        return chosen
    chosen = []
    for name in dict.fromkeys(names):
        found = [r for r in ss.rois if r.name == name]
        if not found:
            known = ", ".join(repr(r.name) for r in ss.rois) or "none"
            raise RTExportError(f"structure set {uid} has no ROI named {name!r} (it has {known})")
        if len(found) > 1:
            raise RTExportError(f"structure set {uid} has {len(found)} ROIs named {name!r}; the name is ambiguous")
        roi = found[0]
        if not len(roi.points):
            raise RTExportError(f"ROI {name!r} of structure set {uid} has no contour points")
        frame = frames.get(roi.number, "")
        if frame and frame != series.frame_of_reference_uid:
            raise RTExportError(f"ROI {name!r} is in Frame of Reference {frame}, not the series' "
                                f"{series.frame_of_reference_uid}")
        chosen.append(roi)
    return chosen


# -- the dose input ----------------------------------------------------------------------


@dataclass(frozen=True)
class DoseInput:
    """A dose distribution in Gy on its own grid, and the frame of reference it is in (or None)."""

    values: np.ndarray = field(repr=False)
    grid: Grid
    frame_of_reference_uid: str | None
    source: str


def read_dose(path: Path, *, units: str | None = None, frame_of_reference: str | None = None) -> DoseInput:
    """Read a dose file: an RT Dose (any grid and orientation), or a NIfTI/MetaImage volume.

    ``units`` (GY or CGY) must be given for a volume, which cannot say; it must not contradict
    an RT Dose. ``frame_of_reference`` states which frame a volume is in; for an RT Dose it
    must agree with the file's."""
    try:
        with path.open("rb") as fp:
            head = fp.read(132)
    except OSError as exc:
        raise RTExportError(f"cannot read the dose file {path}: {exc.strerror}") from None
    if head[128:132] == b"DICM":
        return _read_rt_dose(path, units, frame_of_reference)
    return _read_volume(path, units, frame_of_reference)


def _read_rt_dose(path: Path, units: str | None, frame: str | None) -> DoseInput:
    try:
        ds = dcmread(path)
    except (OSError, InvalidDicomError, ValueError) as exc:
        raise RTExportError(f"cannot read the dose file {path}: {exc}") from None
    if ds.get("SOPClassUID") != SOPClass.RT_DOSE:
        raise RTExportError(f"{path} is a DICOM object but not an RT Dose ({ds.get('SOPClassUID', 'no SOP class')})")
    dose_units = str(ds.get("DoseUnits", "")).upper()
    if dose_units != "GY":
        raise RTExportError(f"{path} has Dose Units '{dose_units}'; only absolute dose in GY can be exported "
                            "(RELATIVE dose cannot)")
    if units is not None and units.upper() != "GY":
        raise RTExportError(f"{path} says its Dose Units are GY, but {units} was given; leave out --dose-units")
    dose_type = str(ds.get("DoseType", ""))
    if dose_type != "PHYSICAL":
        raise RTExportError(f"{path} has Dose Type '{dose_type}'; the export writes PHYSICAL dose, so only "
                            "PHYSICAL dose is accepted")
    for kw in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "PixelData", "DoseGridScaling"):
        if kw not in ds:
            raise RTExportError(f"{path} has no {kw}; it carries no dose grid")
    own = str(ds.get("FrameOfReferenceUID", "")) or None
    if frame and own and frame != own:
        raise RTExportError(f"{path} is in Frame of Reference {own}, not {frame} as given")
    orientation = _floats(ds.ImageOrientationPatient, 6, f"{path}: Image Orientation (Patient)")
    position = _floats(ds.ImagePositionPatient, 3, f"{path}: Image Position (Patient)")
    spacing = _floats(ds.PixelSpacing, 2, f"{path}: Pixel Spacing")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    offsets = [float(v) for v in (ds.get("GridFrameOffsetVector") or [0.0])] if frames > 1 else [0.0]
    if len(offsets) != frames:
        raise RTExportError(f"{path} has {frames} frames but {len(offsets)} Grid Frame Offset Vector values")
    if offsets[0] != 0:
        # The absolute form (PS3.3 C.8.8.3.2) is only defined for axial 1\0\0\0\1\0 orientation.
        if np.max(np.abs(np.subtract(orientation, (1, 0, 0, 0, 1, 0)))) > 1e-6:
            raise RTExportError(f"{path}: Grid Frame Offset Vector starts at {offsets[0]} (not 0) with a "
                                "non-axial orientation; its frames' positions are ambiguous")
        if abs(offsets[0] - position[2]) > 1e-3:
            raise RTExportError(f"{path}: Grid Frame Offset Vector starts at {offsets[0]}, Image Position "
                                f"(Patient) z at {position[2]}; its frames' positions are ambiguous")
        offsets = [o - offsets[0] for o in offsets]
    try:
        pixels = ds.pixel_array.reshape(frames, int(ds.Rows), int(ds.Columns)).astype(float)
        grid = Grid(position, orientation, spacing, int(ds.Rows), int(ds.Columns), tuple(offsets))  # type: ignore[arg-type]
    except GeometryError as exc:
        raise RTExportError(f"{path}: {exc}") from None
    except (ValueError, AttributeError) as exc:
        raise RTExportError(f"cannot decode the dose grid of {path}: {exc}") from None
    values = pixels * float(ds.DoseGridScaling)
    _check_values(values, path)
    return DoseInput(values, grid, own, f"RT Dose {ds.SOPInstanceUID}")


def _read_volume(path: Path, units: str | None, frame: str | None) -> DoseInput:
    import SimpleITK as sitk  # noqa: PLC0415 - large; only this path needs it

    try:
        image: Any = sitk.ReadImage(str(path))  # SimpleITK is untyped
    except RuntimeError:
        raise RTExportError(f"cannot read the dose file {path}: it is neither DICOM nor a volume SimpleITK "
                            "reads (NIfTI .nii/.nii.gz, MetaImage .mha/.mhd)") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise RTExportError(f"{path} is a {image.GetDimension()}-D image with {image.GetNumberOfComponentsPerPixel()} "
                            "component(s); a dose is a 3-D scalar volume")
    if units is None or units.upper() not in VOLUME_UNITS:
        raise RTExportError(f"{path} does not say its dose units; give --dose-units GY or CGY")
    if not frame:
        raise RTExportError(f"{path} has no Frame of Reference; give --dose-frame-of-reference UID (the image "
                            "series' Frame of Reference UID if the dose was computed on it), with --registration if it is another frame")
    direction = np.array([float(v) for v in image.GetDirection()]).reshape(3, 3)
    sx, sy, sz = image.GetSpacing()
    row, col, third = direction[:, 0], direction[:, 1], direction[:, 2]
    orientation = tuple(float(v) for v in (*row, *col))
    try:
        normal = dosegrid.axes_of(orientation)[:, 2]
    except GeometryError as exc:
        raise RTExportError(f"{path}: its direction matrix is not orthonormal ({exc})") from None
    sign = float(third @ normal)
    if abs(abs(sign) - 1) > 1e-4:
        raise RTExportError(f"{path}: its third axis is not perpendicular to the first two (sheared volume)")
    values = sitk.GetArrayFromImage(image).astype(float) * VOLUME_UNITS[units.upper()]  # (z, y, x)
    try:
        grid = Grid(tuple(float(v) for v in image.GetOrigin()), orientation, (float(sy), float(sx)),  # type: ignore[arg-type]
                    values.shape[1], values.shape[2], tuple(float(k * sz * np.sign(sign)) for k in range(values.shape[0])))
    except GeometryError as exc:
        raise RTExportError(f"{path}: {exc}") from None
    _check_values(values, path)
    return DoseInput(values, grid, frame, f"volume {path.name}")


def _check_values(values: np.ndarray, path: Path) -> None:
    if not np.all(np.isfinite(values)):
        raise RTExportError(f"{path} holds non-finite dose values (NaN or infinity)")
    if values.size and float(values.min()) < 0:
        raise RTExportError(f"{path} holds negative dose values (lowest {float(values.min()):g} Gy)")


def read_registration(path: Path, moving: str, fixed: str) -> np.ndarray:
    """Return the 4x4 matrix taking frame ``moving`` (the dose's) into frame ``fixed`` (the
    series') from a DICOM Spatial Registration object (PS3.3 C.20.2: its own Frame of
    Reference is the fixed one; the item for ``moving`` holds the matrices, applied in order)."""
    try:
        ds = dcmread(path)
    except (OSError, InvalidDicomError, ValueError) as exc:
        raise RTExportError(f"cannot read the registration {path}: {exc}") from None
    if ds.get("SOPClassUID") != SPATIAL_REGISTRATION:
        raise RTExportError(f"{path} is not a Spatial Registration object")
    if str(ds.get("FrameOfReferenceUID", "")) != fixed:
        raise RTExportError(f"{path} registers into Frame of Reference {ds.get('FrameOfReferenceUID', '(none)')}, "
                            f"not the series' {fixed}")
    items = [r for r in ds.get("RegistrationSequence", []) if str(r.get("FrameOfReferenceUID", "")) == moving]
    if len(items) != 1:
        raise RTExportError(f"{path} holds {len(items)} registrations of the dose's Frame of Reference {moving}; "
                            "exactly one is needed")
    total = np.eye(4)
    for mr in items[0].get("MatrixRegistrationSequence", []):
        for m in mr.get("MatrixSequence", []):
            values = _floats(m.get("FrameOfReferenceTransformationMatrix", []), 16, f"{path}: a registration matrix")
            matrix = np.asarray(values).reshape(4, 4)
            if np.max(np.abs(matrix[3] - (0, 0, 0, 1))) > 1e-9 or abs(np.linalg.det(matrix[:3, :3])) < 1e-9:
                raise RTExportError(f"{path}: a registration matrix is not an invertible affine transform")
            total = matrix @ total
    if np.array_equal(total, np.eye(4)) and not items[0].get("MatrixRegistrationSequence"):
        raise RTExportError(f"{path} has no matrix for the dose's Frame of Reference {moving}")
    return total


# -- building the objects ----------------------------------------------------------------


@dataclass(frozen=True)
class GridOptions:
    """How the dose grids are laid out and filled (defaults: the series' own lattice, trilinear)."""

    pixel_spacing: tuple[float, float] | None = None
    slice_spacing: float | None = None
    method: str = "linear"


@dataclass(frozen=True)
class DoseObject:
    """One generated RT Dose: its ROI, grid, values as stored, and how many points lay outside."""

    roi_number: int
    roi_name: str
    grid: Grid
    quantized: dosegrid.Quantized = field(repr=False)
    outside: int
    obj: Transcoded = field(repr=False)


@dataclass(frozen=True)
class RTExport:
    """What :func:`build` made: the RT Doses and the RT Plan, ready to send or write."""

    series_uid: str
    structure_set_uid: str
    structure_set_series_uid: str
    doses: tuple[DoseObject, ...]
    plan: Transcoded = field(repr=False)

    @property
    def objects(self) -> tuple[Transcoded, ...]:
        return tuple(d.obj for d in self.doses) + (self.plan,)

    def render(self) -> str:
        lines = []
        for d in self.doses:
            f, r, c = d.grid.shape
            lines.append(f"RT Dose {d.obj.sop_instance_uid}  ROI {d.roi_name!r}: {c} x {r} x {f} points, max "
                         f"{d.quantized.dose.max():.3f} Gy, {d.outside} point(s) outside the input dose (set to 0)")
        lines.append(f"RT Plan {self.plan.sop_instance_uid} references {len(self.doses)} dose(s) and structure set "
                     f"{self.structure_set_uid}")
        return "\n".join(lines)


def build(store: Store, series_uid: str, structure_set_uid: str, dose: DoseInput, *, rois: Sequence[str] = (),
          registration: Path | None = None, options: GridOptions = GridOptions()) -> RTExport:
    """Make one RT Dose per selected ROI and the RT Plan linking them (nothing is written)."""
    series = read_series(store, series_uid)
    ss = read_structure_set(store, structure_set_uid, series)
    chosen = select_rois(ss, rois, series, structure_set_uid)
    to_source = _frame_transform(dose, series, registration)
    try:
        lattice = series.lattice.with_spacing(options.pixel_spacing, options.slice_spacing)
    except GeometryError as exc:
        raise RTExportError(str(exc)) from None
    now = datetime.now()
    ctx = _Context(series, ss.dataset, now, new_uid(), new_uid(), new_uid())
    doses = []
    for n, roi in enumerate(chosen, 1):
        try:
            grid = dosegrid.roi_grid(lattice, roi.points)
            resampled = dosegrid.resample(dose.values, dose.grid, grid, to_source=to_source, method=options.method)
            quantized = dosegrid.quantize(resampled.values)
        except GeometryError as exc:
            raise RTExportError(f"ROI {roi.name!r}: {exc}") from None
        if resampled.outside:
            log.warning("ROI %s: %d of %d grid points lie outside the input dose grid; they are 0",
                        roi.number, resampled.outside, resampled.values.size)
        obj = _encode(_rt_dose(ctx, n, roi, grid, quantized))
        doses.append(DoseObject(roi.number, roi.name, grid, quantized, resampled.outside, obj))
    plan = _encode(_rt_plan(ctx, structure_set_uid, [d.obj.sop_instance_uid for d in doses], chosen))
    log.info("built %d RT Dose(s) and RT Plan %s for series %s from %s", len(doses), plan.sop_instance_uid,
             series_uid, dose.source)
    return RTExport(series_uid, structure_set_uid, str(ss.dataset.get("SeriesInstanceUID", "")), tuple(doses), plan)


def _frame_transform(dose: DoseInput, series: Series, registration: Path | None) -> np.ndarray | None:
    """The 4x4 matrix from series coordinates into the dose's, or None when they share a frame."""
    fixed = series.frame_of_reference_uid
    if dose.frame_of_reference_uid is None:
        raise RTExportError(f"the {dose.source} has no Frame of Reference UID; it cannot be placed on series "
                            f"{series.series_uid} (Frame of Reference {fixed})")
    if dose.frame_of_reference_uid == fixed:
        if registration is not None:
            raise RTExportError(f"the {dose.source} is already in the series' Frame of Reference {fixed}; "
                                "leave out --registration")
        return None
    if registration is None:
        raise RTExportError(f"the {dose.source} is in Frame of Reference {dose.frame_of_reference_uid}, series "
                            f"{series.series_uid} in {fixed}; give --registration with a Spatial Registration "
                            "object relating them")
    return np.linalg.inv(read_registration(registration, dose.frame_of_reference_uid, fixed))


@dataclass(frozen=True)
class _Context:
    series: Series
    ss: Dataset
    now: datetime
    dose_series_uid: str
    plan_series_uid: str
    plan_uid: str


_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                  "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription")


def _common(ctx: _Context, sop_class: SOPClass, uid: str, modality: str, series_uid: str, number: int) -> Dataset:
    """Patient, study, series, equipment and SOP common attributes shared by the generated objects."""
    ds = Dataset()
    if ctx.ss.get("SpecificCharacterSet"):
        ds.SpecificCharacterSet = ctx.ss.SpecificCharacterSet
    ds.InstanceCreationDate = ctx.now.strftime("%Y%m%d")
    ds.InstanceCreationTime = ctx.now.strftime("%H%M%S")
    ds.SOPClassUID = str(sop_class)
    ds.SOPInstanceUID = uid
    for kw in _PATIENT_STUDY:  # as in the structure set (Type 2: present, empty if it has none)
        if kw in ctx.ss:
            ds[kw] = ctx.ss[kw]
        elif kw != "StudyDescription":
            setattr(ds, kw, "")
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = number
    ds.OperatorsName = ""
    ds.FrameOfReferenceUID = ctx.series.frame_of_reference_uid
    ds.PositionReferenceIndicator = ctx.series.position_reference
    ds.Manufacturer = MANUFACTURER
    ds.SoftwareVersions = __version__
    return ds


def _rt_dose(ctx: _Context, number: int, roi: Roi, grid: Grid, q: dosegrid.Quantized) -> Dataset:
    uid = new_uid()
    ds = _common(ctx, SOPClass.RT_DOSE, uid, "RTDOSE", ctx.dose_series_uid, 1)
    ds.InstanceNumber = number
    ds.ContentDate = ctx.now.strftime("%Y%m%d")
    ds.ContentTime = ctx.now.strftime("%H%M%S")
    ds.SeriesDescription = "Dose per structure"
    ds.ImageOrientationPatient = list(ctx.series.orientation_text)
    ds.ImagePositionPatient = [_ds(v) for v in grid.origin]
    ds.PixelSpacing = [_ds(v) for v in grid.spacing]
    ds.SliceThickness = ctx.series.slice_thickness
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = len(grid.offsets)
    ds.FrameIncrementPointer = Tag("GridFrameOffsetVector")
    ds.Rows, ds.Columns = grid.rows, grid.columns
    ds.BitsAllocated = ds.BitsStored = dosegrid.BITS
    ds.HighBit = dosegrid.BITS - 1
    ds.PixelRepresentation = 0
    ds.DoseUnits = "GY"
    ds.DoseType = "PHYSICAL"
    ds.DoseComment = roi.name[:64]
    ds.DoseSummationType = "PLAN"
    ds.GridFrameOffsetVector = [_ds(v) for v in grid.offsets]
    ds.DoseGridScaling = q.scaling
    ref = Dataset()
    ref.ReferencedSOPClassUID = str(SOPClass.RT_PLAN)
    ref.ReferencedSOPInstanceUID = ctx.plan_uid
    ds.ReferencedRTPlanSequence = [ref]
    ds.PixelData = q.pixels.astype("<u2").tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def _rt_plan(ctx: _Context, ss_uid: str, dose_uids: list[str], rois: list[Roi]) -> Dataset:
    ds = _common(ctx, SOPClass.RT_PLAN, ctx.plan_uid, "RTPLAN", ctx.plan_series_uid, 1)
    ds.InstanceNumber = 1
    ds.SeriesDescription = "Dose export plan"
    ds.RTPlanLabel = PLAN_LABEL
    ds.RTPlanName = "Dose per structure"
    ds.RTPlanDescription = "Doses for: " + ", ".join(r.name for r in rois)
    ds.RTPlanDate = ctx.now.strftime("%Y%m%d")
    ds.RTPlanTime = ctx.now.strftime("%H%M%S")
    ds.RTPlanGeometry = "PATIENT"
    ref = Dataset()
    ref.ReferencedSOPClassUID = str(SOPClass.RT_STRUCTURE_SET)
    ref.ReferencedSOPInstanceUID = ss_uid
    ds.ReferencedStructureSetSequence = [ref]
    doses = []
    for uid in dose_uids:
        item = Dataset()
        item.ReferencedSOPClassUID = str(SOPClass.RT_DOSE)
        item.ReferencedSOPInstanceUID = uid
        doses.append(item)
    ds.ReferencedDoseSequence = doses
    return ds


def _ds(value: float) -> str:
    """A decimal string of at most 16 characters for ``value`` (mm)."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text if len(text) <= 16 else f"{value:.9e}"


def _encode(ds: Dataset) -> Transcoded:
    """Encode a generated object once, Implicit VR LE, text in its Specific Character Set."""
    buf = DicomBytesIO()
    buf.is_implicit_VR = True
    buf.is_little_endian = True
    with warnings.catch_warnings():  # pydicom only warns when text does not fit the character set
        warnings.filterwarnings("error", message="Failed to encode value")
        try:
            write_dataset(buf, ds)
        except UserWarning as exc:
            raise RTExportError(f"a name cannot be encoded in the structure set's character set "
                                f"{ds.get('SpecificCharacterSet', 'ISO_IR 6')!r}: {exc}") from None
    return Transcoded(str(ds.SOPClassUID), str(ds.SOPInstanceUID), TransferSyntax.IMPLICIT_LE, buf.getvalue())


# -- output ------------------------------------------------------------------------------


def send(store: Store, export: RTExport, peer: Destination, settings: sender.ClientSettings | None = None,
         progress: Callable[[Progress], None] | None = None) -> sender.SendReport:
    """Send the image series, the structure set and the generated objects over one association
    (Tables 6 and 7, Implicit VR LE), through :func:`appliance.net.sender.send`."""
    plan = sender.plan_send(store, series=[export.series_uid])
    if plan.refused:
        raise RTExportError("the image series cannot be exported: " + "; ".join(str(r) for r in plan.refused))
    if all(o.sop_instance_uid != export.structure_set_uid for o in plan.objects):
        row = store.index.instance(export.structure_set_uid)
        assert row is not None  # read_structure_set found it
        plan = sender.SendPlan(plan.objects + (row,), plan.series, plan.refused)
    return sender.send(store, plan, peer, settings, progress, extra=export.objects)


def write_usb(target: Path, store: Store, cfg: Config, export: RTExport,
              progress: Callable[[Progress], None] | None = None) -> exporter.ExportReport:
    """Write the image series, the structure set's series and the generated objects as one
    file-set with its DICOMDIR (Tables 10 and 11), through :func:`appliance.media.exporter.export`."""
    selection = exporter.Selection.explicit(series=(export.series_uid, export.structure_set_series_uid))
    return exporter.export(target, store, cfg, selection, progress, extra=export.objects)
