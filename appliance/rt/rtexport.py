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
* Each ROI's bounding box is compared with the region the images cover and with the input
  dose grid (:class:`Coverage`): a part with no image or no dose is a warning, logged and in
  the report, in words and percent.
* Generated objects carry new UIDs under :data:`appliance.conformance.UID_ROOT`, the
  structure set's patient, study and Specific Character Set, and are encoded once in
  Implicit VR LE; :func:`send` and :func:`write_usb` pass them, with the image series and the
  structure set, through :func:`appliance.net.sender.send` and :func:`appliance.media.exporter.export`.

The inputs are read and checked in :mod:`appliance.rt.inputs`, the objects' attributes and
encoding are in :mod:`appliance.rt.objects`; this module lays out the grids and fills them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from appliance.config import Config, Destination
from appliance.conformance import new_uid
from appliance.dicom import dosegrid
from appliance.dicom.dosegrid import Box, GeometryError, Grid
from appliance.dicom.transcode import Transcoded
from appliance.media import exporter
from appliance.net import sender
from appliance.reports import Progress
from appliance.rt.inputs import (
    DoseInput,
    Roi,
    RTExportError,
    Series,
    read_registration,
    read_series,
    read_structure_set,
    select_rois,
)
from appliance.rt.objects import Context, encode, rt_dose, rt_plan
from appliance.store.store import Store

log = logging.getLogger(__name__)


# -- building the objects ----------------------------------------------------------------


@dataclass(frozen=True)
class GridOptions:
    """How the dose grids are laid out and filled (defaults: the series' own lattice, trilinear)."""

    pixel_spacing: tuple[float, float] | None = None
    slice_spacing: float | None = None
    method: str = "linear"


#: The words for the ends of a series' three axes (row direction, column direction, normal).
_ENDS = (("first column", "last column"), ("first row", "last row"), ("first slice", "last slice"))
_ALONG = ("along the rows", "along the columns", "along the slice normal")


@dataclass(frozen=True)
class Coverage:
    """How much of an ROI's bounding box (its volume; its area or length if it is flat) lies
    outside the region the images cover, and outside the input dose grid (fractions 0..1)."""

    roi_number: int
    roi_name: str
    modality: str
    no_image: float
    no_dose: float
    #: Where the box passes the images' ends, in words ("z 105.0..120.0 mm beyond the last slice at 105.0 mm").
    beyond: tuple[str, ...] = ()

    @property
    def warning(self) -> str:
        """The warning for the operator, or "" when images and dose cover the whole box."""
        parts = []
        if self.no_image > 0:
            where = f" ({', '.join(self.beyond)})" if self.beyond else ""
            series = f"the {self.modality} series" if self.modality else "the image series"
            parts.append(f"{_percent(self.no_image)} of its extent lies outside {series}{where}")
        if self.no_dose > 0:
            parts.append(f"{_percent(self.no_dose)} has no dose" if parts else
                         f"{_percent(self.no_dose)} of its extent has no dose")
        return f"ROI {self.roi_name!r} ({self.roi_number}): " + "; ".join(parts) if parts else ""


def _percent(fraction: float) -> str:
    """A fraction in whole percent; a part that rounds to 0 or 100 % is not called that."""
    p = fraction * 100
    if 0 < p < 0.5:
        return "less than 1 %"
    if 99.5 <= p < 100:
        return "more than 99 %"
    return f"{p:.0f} %"


def coverage(roi: Roi, series: Series, dose: DoseInput, to_source: np.ndarray | None = None) -> Coverage:
    """Compare ``roi``'s bounding box (along the series' axes) with the images of ``series``
    and the grid of ``dose`` (``to_source``: series coordinates into the dose's, None if the same)."""
    images = series.box()
    box = Box.around(roi.points, images.origin, images.orientation)
    no_image = 1 - dosegrid.fraction_inside(box, images)
    no_dose = 1 - dosegrid.fraction_inside(box, dose.grid.box(), to_region=to_source)
    return Coverage(roi.number, roi.name, series.modality, no_image, no_dose,
                    _beyond(box, images) if no_image > 0 else ())


def _beyond(box: Box, images: Box) -> tuple[str, ...]:
    """Where ``box`` passes the ends of ``images`` (both on the series' origin and axes), in words:
    patient coordinates along an axis that is x, y or z, else the distance along an oblique axis."""
    tol = dosegrid.COVERAGE_TOLERANCE_MM
    origin = np.asarray(images.origin)
    out = []
    for i, (first, last) in enumerate(_ENDS):
        a = images.axes[:, i]
        k = int(np.argmax(np.abs(a)))
        label, base, scale = ("xyz"[k], float(origin[k]), float(a[k])) if abs(a[k]) > 1 - 1e-6 else \
            (_ALONG[i], float(origin @ a), 1.0)
        spans = []
        if box.lo[i] < images.lo[i] - tol:
            spans.append((first, box.lo[i], min(box.hi[i], images.lo[i]), images.lo[i]))
        if box.hi[i] > images.hi[i] + tol:
            spans.append((last, max(box.lo[i], images.hi[i]), box.hi[i], images.hi[i]))
        for end, u0, u1, edge in spans:
            lo, hi = sorted((base + scale * u0, base + scale * u1))
            out.append(f"{label} {lo:.1f}..{hi:.1f} mm beyond the {end} at {base + scale * edge:.1f} mm")
    return tuple(out)


@dataclass(frozen=True)
class DoseObject:
    """One generated RT Dose: its ROI, grid, values as stored, how many points lay outside
    the input dose, and how much of the ROI's box has no image or no dose."""

    roi_number: int
    roi_name: str
    grid: Grid
    quantized: dosegrid.Quantized = field(repr=False)
    outside: int
    obj: Transcoded = field(repr=False)
    coverage: Coverage


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

    @property
    def warnings(self) -> tuple[str, ...]:
        """One line per ROI whose bounding box has a part with no image or no dose."""
        return tuple(d.coverage.warning for d in self.doses if d.coverage.warning)

    def render(self) -> str:
        lines = []
        for d in self.doses:
            f, r, c = d.grid.shape
            lines.append(f"RT Dose {d.obj.sop_instance_uid}  ROI {d.roi_name!r}: {c} x {r} x {f} points, max "
                         f"{d.quantized.dose.max():.3f} Gy, {d.outside} point(s) outside the input dose (set to 0)")
            if d.coverage.warning:
                lines.append(f"  warning: {d.coverage.warning}")
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
    ctx = Context(series, ss.dataset, now, new_uid(), new_uid(), new_uid())
    doses = []
    for n, roi in enumerate(chosen, 1):
        try:
            grid = dosegrid.roi_grid(lattice, roi.points)
            resampled = dosegrid.resample(dose.values, dose.grid, grid, to_source=to_source, method=options.method)
            quantized = dosegrid.quantize(resampled.values)
            covered = coverage(roi, series, dose, to_source)
        except GeometryError as exc:
            raise RTExportError(f"ROI {roi.name!r}: {exc}") from None
        if resampled.outside:
            log.warning("ROI %s: %d of %d grid points lie outside the input dose grid; they are 0",
                        roi.number, resampled.outside, resampled.values.size)
        if covered.warning:
            log.warning("%s", covered.warning)
        obj = encode(rt_dose(ctx, n, roi, grid, quantized))
        doses.append(DoseObject(roi.number, roi.name, grid, quantized, resampled.outside, obj, covered))
    plan = encode(rt_plan(ctx, structure_set_uid, [d.obj.sop_instance_uid for d in doses], chosen))
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
