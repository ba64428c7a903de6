"""The generated RT Dose and RT Plan as DICOM (Tables 5 and 7): patient, study and Specific
Character Set from the structure set, geometry from the series, new UIDs under
:data:`appliance.conformance.UID_ROOT`; each object is encoded once in Implicit VR LE.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from datetime import datetime

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.tag import Tag

from appliance import __version__
from appliance.conformance import SOPClass, TransferSyntax, new_uid
from appliance.dicom import dosegrid
from appliance.dicom.dosegrid import Grid
from appliance.dicom.transcode import Transcoded
from appliance.rt.inputs import Roi, RTExportError, Series

MANUFACTURER = "appliance"
PLAN_LABEL = "DOSE EXPORT"


@dataclass(frozen=True)
class Context:
    series: Series
    ss: Dataset
    now: datetime
    dose_series_uid: str
    plan_series_uid: str
    plan_uid: str


_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                  "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription")


def _common(ctx: Context, sop_class: SOPClass, uid: str, modality: str, series_uid: str, number: int) -> Dataset:
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


def rt_dose(ctx: Context, number: int, roi: Roi, grid: Grid, q: dosegrid.Quantized) -> Dataset:
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


def rt_plan(ctx: Context, ss_uid: str, dose_uids: list[str], rois: list[Roi]) -> Dataset:
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


def encode(ds: Dataset) -> Transcoded:
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
