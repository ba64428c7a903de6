"""The RT export's inputs, read and checked (sections 2.2 and 3.2): the stored image series
(one volume in one frame of reference), the stored RT Structure Set and its ROIs, the dose
file from the planning side (an RT Dose, or a NIfTI or MetaImage volume read with SimpleITK)
and a Spatial Registration relating two frames. Anything ambiguous is refused with
:class:`RTExportError`, whose message says why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from appliance.conformance import SPATIAL_REGISTRATION, SOPClass
from appliance.dicom import dosegrid
from appliance.dicom.dosegrid import Box, GeometryError, Grid, Lattice
from appliance.errors import ApplianceError
from appliance.store.store import Store

#: Dose units a volume file (which cannot say) may be declared in, and their factor to Gy.
VOLUME_UNITS = {"GY": 1.0, "CGY": 0.01}
_SERIES_TAGS = ["SOPClassUID", "SOPInstanceUID", "FrameOfReferenceUID", "ImageOrientationPatient",
                "ImagePositionPatient", "PixelSpacing", "PatientID", "StudyInstanceUID",
                "PositionReferenceIndicator", "SliceThickness", "Rows", "Columns", "Modality"]


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


def _read(path: Path, what: str) -> Dataset:
    """Read the DICOM file at ``path``; refuse it as 'cannot read {what}: why' when that fails."""
    try:
        return dcmread(path)
    except (OSError, InvalidDicomError, ValueError) as exc:
        raise RTExportError(f"cannot read {what}: {exc}") from None


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
    #: Rows and Columns every slice has at least (the in-plane extent all of them cover).
    rows: int
    columns: int
    modality: str

    def box(self) -> Box:
        """The region the images cover: from the first to the last pixel centre of every slice,
        and from the first slice to the last."""
        lat = self.lattice
        return Box(lat.origin, lat.orientation, (0.0, 0.0, 0.0),
                   ((self.columns - 1) * lat.spacing[1], (self.rows - 1) * lat.spacing[0], lat.offsets[-1]))


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
        min(int(h.get("Rows", 0) or 0) for h in headers),
        min(int(h.get("Columns", 0) or 0) for h in headers),
        str(first.get("Modality", "") or ""),
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
    ds = _read(path, f"stored structure set {uid}")
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
    ds = _read(path, f"the dose file {path}")
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
    ds = _read(path, f"the registration {path}")
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
