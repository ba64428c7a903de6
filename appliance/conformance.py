"""The conformance statement as data.

Every UID, presentation-context table, modality and character set that the
vendor conformance statement (``shared/reference/conformance-statement.txt``)
fixes is written here once. Every other module reads these tables; no other
module writes a DICOM UID literal.

Table numbers refer to the statement:

* Table 1-3: the Storage Server (our SCP).
* Table 4-8: the planning workstation's client AE (C-STORE/C-ECHO SCU).
* Table 9: objects read from CD-R.
* Table 10-11: objects written to USB flash drives.
* Table 12 (appendix A): the attributes the applications use.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping


class TransferSyntax(enum.StrEnum):
    """Transfer syntaxes named in the statement."""

    IMPLICIT_LE = "1.2.840.10008.1.2"
    EXPLICIT_LE = "1.2.840.10008.1.2.1"
    EXPLICIT_BE = "1.2.840.10008.1.2.2"
    JPEG_LOSSLESS_P14 = "1.2.840.10008.1.2.4.57"
    JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"

    @property
    def is_implicit_vr(self) -> bool:
        return self is TransferSyntax.IMPLICIT_LE

    @property
    def is_little_endian(self) -> bool:
        return self is not TransferSyntax.EXPLICIT_BE

    @property
    def is_compressed(self) -> bool:
        return self in (TransferSyntax.JPEG_LOSSLESS_P14, TransferSyntax.JPEG_LOSSLESS_SV1)


TRANSFER_SYNTAX_NAMES: Mapping[str, str] = MappingProxyType(
    {
        TransferSyntax.IMPLICIT_LE: "Implicit VR Little Endian",
        TransferSyntax.EXPLICIT_LE: "Explicit VR Little Endian",
        TransferSyntax.EXPLICIT_BE: "Explicit VR Big Endian",
        TransferSyntax.JPEG_LOSSLESS_P14: "JPEG Lossless, Non-Hierarchical (Process 14)",
        TransferSyntax.JPEG_LOSSLESS_SV1: "JPEG Lossless, First-Order Prediction (Process 14 SV1)",
    }
)

#: Uncompressed syntaxes in the Storage Server's order of preference
#: (Implicit LE above Explicit LE above Explicit BE).
UNCOMPRESSED: tuple[TransferSyntax, ...] = (
    TransferSyntax.IMPLICIT_LE,
    TransferSyntax.EXPLICIT_LE,
    TransferSyntax.EXPLICIT_BE,
)
JPEG_LOSSLESS: tuple[TransferSyntax, ...] = (
    TransferSyntax.JPEG_LOSSLESS_SV1,
    TransferSyntax.JPEG_LOSSLESS_P14,
)


class SOPClass(enum.StrEnum):
    """SOP classes named in the statement."""

    VERIFICATION = "1.2.840.10008.1.1"
    CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
    MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
    XA_IMAGE = "1.2.840.10008.5.1.4.1.1.12.1"
    PET_IMAGE = "1.2.840.10008.5.1.4.1.1.128"
    SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"
    RT_STRUCTURE_SET = "1.2.840.10008.5.1.4.1.1.481.3"
    RT_DOSE = "1.2.840.10008.5.1.4.1.1.481.2"
    RT_PLAN = "1.2.840.10008.5.1.4.1.1.481.5"
    # Beyond the statement (issue 20): the Query/Retrieve information models (PS3.4 C.6.1,
    # C.6.2) the Storage Server offers when [qr] is enabled.
    PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
    PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
    PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
    STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
    STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
    STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"

    @property
    def label(self) -> str:
        return SOP_CLASS_LABELS[self]

    @property
    def is_rt(self) -> bool:
        return self in RT_OBJECTS


SOP_CLASS_LABELS: Mapping[SOPClass, str] = MappingProxyType(
    {
        SOPClass.VERIFICATION: "Verification",
        SOPClass.CT_IMAGE: "CT Image Storage",
        SOPClass.MR_IMAGE: "MR Image Storage",
        SOPClass.XA_IMAGE: "X-Ray Angiographic Image Storage",
        SOPClass.PET_IMAGE: "PET Image Storage",
        SOPClass.SC_IMAGE: "Secondary Capture Image Storage",
        SOPClass.RT_STRUCTURE_SET: "RT Structure Set Storage",
        SOPClass.RT_DOSE: "RT Dose Storage",
        SOPClass.RT_PLAN: "RT Plan Storage",
        SOPClass.PATIENT_ROOT_FIND: "Patient Root Query/Retrieve - FIND",
        SOPClass.PATIENT_ROOT_MOVE: "Patient Root Query/Retrieve - MOVE",
        SOPClass.PATIENT_ROOT_GET: "Patient Root Query/Retrieve - GET",
        SOPClass.STUDY_ROOT_FIND: "Study Root Query/Retrieve - FIND",
        SOPClass.STUDY_ROOT_MOVE: "Study Root Query/Retrieve - MOVE",
        SOPClass.STUDY_ROOT_GET: "Study Root Query/Retrieve - GET",
    }
)

#: SOP classes whose character-set rules are those for "DICOM RT objects" (section 7).
RT_OBJECTS: frozenset[SOPClass] = frozenset(
    {SOPClass.RT_STRUCTURE_SET, SOPClass.RT_DOSE, SOPClass.RT_PLAN}
)
#: Image SOP classes: they carry pixel data and take part in 3D reconstruction.
IMAGE_OBJECTS: frozenset[SOPClass] = frozenset(
    {SOPClass.CT_IMAGE, SOPClass.MR_IMAGE, SOPClass.XA_IMAGE, SOPClass.PET_IMAGE, SOPClass.SC_IMAGE}
)


@dataclass(frozen=True)
class PresentationContextRow:
    """One row of a presentation-context table: an abstract syntax, its transfer syntaxes
    in order of preference, and our role."""

    abstract_syntax: SOPClass
    transfer_syntaxes: tuple[TransferSyntax, ...]
    role: str  # "SCP" or "SCU"


def _rows(
    classes: tuple[SOPClass, ...], syntaxes: tuple[TransferSyntax, ...], role: str
) -> tuple[PresentationContextRow, ...]:
    return tuple(PresentationContextRow(c, syntaxes, role) for c in classes)


_SCP_STORAGE = (
    SOPClass.CT_IMAGE,
    SOPClass.MR_IMAGE,
    SOPClass.XA_IMAGE,
    SOPClass.PET_IMAGE,
    SOPClass.RT_STRUCTURE_SET,
    SOPClass.SC_IMAGE,
)

#: Table 1: SOP classes supported by the Storage Server (SCP).
TABLE_1: tuple[SOPClass, ...] = _SCP_STORAGE + (SOPClass.VERIFICATION,)
#: Table 2: C-STORE SCP presentation contexts.
TABLE_2 = _rows(_SCP_STORAGE, UNCOMPRESSED, "SCP")
#: Table 3: C-ECHO SCP presentation context.
TABLE_3 = _rows((SOPClass.VERIFICATION,), UNCOMPRESSED, "SCP")

#: Table 4: SOP classes of the client AE (SCU).
TABLE_4: tuple[SOPClass, ...] = (
    SOPClass.CT_IMAGE,
    SOPClass.MR_IMAGE,
    SOPClass.PET_IMAGE,
    SOPClass.RT_STRUCTURE_SET,
    SOPClass.VERIFICATION,
)
#: Table 5: SOP classes of the client AE that only the planning system exports.
TABLE_5: tuple[SOPClass, ...] = (SOPClass.RT_DOSE, SOPClass.RT_PLAN)
#: Table 6: C-STORE SCU presentation contexts (Implicit VR LE only).
TABLE_6 = _rows(
    (SOPClass.CT_IMAGE, SOPClass.MR_IMAGE, SOPClass.PET_IMAGE, SOPClass.RT_STRUCTURE_SET),
    (TransferSyntax.IMPLICIT_LE,),
    "SCU",
)
#: Table 7: C-STORE SCU presentation contexts for RT Dose and RT Plan.
TABLE_7 = _rows((SOPClass.RT_DOSE, SOPClass.RT_PLAN), (TransferSyntax.IMPLICIT_LE,), "SCU")
#: Table 8: C-ECHO SCU presentation context.
TABLE_8 = _rows((SOPClass.VERIFICATION,), (TransferSyntax.IMPLICIT_LE,), "SCU")

#: Table 9: objects read from CD-R, with the transfer syntaxes accepted there.
TABLE_9 = _rows(
    (SOPClass.CT_IMAGE, SOPClass.MR_IMAGE, SOPClass.XA_IMAGE, SOPClass.PET_IMAGE, SOPClass.SC_IMAGE),
    UNCOMPRESSED + JPEG_LOSSLESS,
    "FSR",
) + _rows((SOPClass.RT_STRUCTURE_SET,), UNCOMPRESSED, "FSR")
#: Table 10: objects written to USB flash drives (Implicit VR LE).
TABLE_10 = _rows(
    (
        SOPClass.CT_IMAGE,
        SOPClass.MR_IMAGE,
        SOPClass.XA_IMAGE,
        SOPClass.PET_IMAGE,
        SOPClass.SC_IMAGE,
        SOPClass.RT_STRUCTURE_SET,
    ),
    (TransferSyntax.IMPLICIT_LE,),
    "FSC",
)
#: Table 11: RT Dose and RT Plan written to USB flash drives.
TABLE_11 = _rows((SOPClass.RT_DOSE, SOPClass.RT_PLAN), (TransferSyntax.IMPLICIT_LE,), "FSC")

#: The Storage Server accepts exactly Tables 2 and 3.
SCP_CONTEXTS = TABLE_2 + TABLE_3
#: The client AE proposes (a subset of) Tables 6 and 7 for export.
SCU_STORAGE_CONTEXTS = TABLE_6 + TABLE_7
#: Abstract syntaxes the Storage Server stores.
SCP_STORAGE_CLASSES: frozenset[SOPClass] = frozenset(r.abstract_syntax for r in TABLE_2)


# -- Beyond the statement: Query/Retrieve (issue 20) --------------------------------

#: The information models' FIND, MOVE and GET SOP classes (Patient Root, Study Root).
QR_FIND_CLASSES: frozenset[SOPClass] = frozenset({SOPClass.PATIENT_ROOT_FIND, SOPClass.STUDY_ROOT_FIND})
QR_MOVE_CLASSES: frozenset[SOPClass] = frozenset({SOPClass.PATIENT_ROOT_MOVE, SOPClass.STUDY_ROOT_MOVE})
QR_GET_CLASSES: frozenset[SOPClass] = frozenset({SOPClass.PATIENT_ROOT_GET, SOPClass.STUDY_ROOT_GET})
#: Query/Retrieve SCP presentation contexts, in the statement's uncompressed syntaxes and
#: order of preference. Not in the statement: accepted only when ``[qr] enabled``.
QR_CONTEXTS = _rows(
    (
        SOPClass.PATIENT_ROOT_FIND,
        SOPClass.STUDY_ROOT_FIND,
        SOPClass.PATIENT_ROOT_MOVE,
        SOPClass.STUDY_ROOT_MOVE,
        SOPClass.PATIENT_ROOT_GET,
        SOPClass.STUDY_ROOT_GET,
    ),
    UNCOMPRESSED,
    "SCP",
)
#: The information model (Patient Root or Study Root) of each Q/R SOP class.
QR_MODELS: Mapping[SOPClass, str] = MappingProxyType(
    {
        SOPClass.PATIENT_ROOT_FIND: "PATIENT",
        SOPClass.PATIENT_ROOT_MOVE: "PATIENT",
        SOPClass.PATIENT_ROOT_GET: "PATIENT",
        SOPClass.STUDY_ROOT_FIND: "STUDY",
        SOPClass.STUDY_ROOT_MOVE: "STUDY",
        SOPClass.STUDY_ROOT_GET: "STUDY",
    }
)


def syntaxes_for(table: tuple[PresentationContextRow, ...], sop_class: str) -> tuple[TransferSyntax, ...]:
    """Return the transfer syntaxes ``table`` allows for ``sop_class``, or ``()``."""
    for row in table:
        if row.abstract_syntax == sop_class:
            return row.transfer_syntaxes
    return ()


# -- Appendix A --------------------------------------------------------------

#: Note 1: accepted values of Modality (0008,0060). DS is retired but still found.
ACCEPTED_MODALITIES: frozenset[str] = frozenset({"CT", "MR", "XA", "PT", "RTSTRUCT", "OT", "DS"})

#: Series Type (0054,1000) value 1 that marks a dynamic PET series (refused).
DYNAMIC_PET_SERIES_TYPE = "DYNAMIC"

#: Table 12 attribute keywords, as pydicom names them.
TABLE_12: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "StudyDate",
    "StudyTime",
    "InstanceNumber",
    "PatientOrientation",
    "Modality",
    "ImageOrientationPatient",
    "BitsAllocated",
    "BitsStored",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "HighBit",
    "PixelRepresentation",
    "Columns",
    "Rows",
    "PixelData",
    "PixelSpacing",
    "PixelAspectRatio",
    "SeriesNumber",
    "SliceLocation",
    "StudyInstanceUID",
    "ImagePositionPatient",
    "SliceThickness",
    "SpacingBetweenSlices",
    "RescaleSlope",
    "RescaleIntercept",
    "PixelPaddingValue",
    "WindowCenter",
    "WindowWidth",
    "Manufacturer",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SeriesType",
    "NumberOfFrames",
    "SOPClassUID",
    "SpecificCharacterSet",
    "FrameOfReferenceUID",
)

# -- Section 7: character sets -----------------------------------------------

#: Specific Character Set values allowed for RT objects, besides the default repertoire.
RT_CHARACTER_SETS: frozenset[str] = frozenset(
    {
        "ISO_IR 100",
        "ISO_IR 101",
        "ISO_IR 109",
        "ISO_IR 110",
        "ISO_IR 144",
        "ISO_IR 127",
        "ISO_IR 126",
        "ISO_IR 138",
        "ISO_IR 148",
        "ISO_IR 192",
    }
)
#: Specific Character Set values allowed for images, besides the default repertoire.
IMAGE_CHARACTER_SETS: frozenset[str] = frozenset({"ISO_IR 100"})
#: The default repertoire: an absent or empty Specific Character Set, or ISO_IR 6.
DEFAULT_CHARACTER_SET = "ISO_IR 6"


def allowed_character_sets(sop_class: str) -> frozenset[str]:
    """Return the non-default character sets section 7 allows for ``sop_class``."""
    return RT_CHARACTER_SETS if sop_class in RT_OBJECTS else IMAGE_CHARACTER_SETS


#: The DICOM application context name (PS3.7 A.2), the only one there is.
APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"

# -- Identities ----------------------------------------------------------------

#: Default AE title and port of the Storage Server (section 6.1).
DEFAULT_SCP_AE_TITLE = "ELEKTA_STORAGE"
DEFAULT_SCP_PORT = 104
#: Section 3.1: at most 5 simultaneous associations.
DEFAULT_MAX_ASSOCIATIONS = 5
#: The client AE title cannot be configured in the statement (section 6.2).
CLIENT_AE_TITLE = "ELEKTA_CLIENT"
#: Section 3.2/6.2: the client's max PDU, from 4 KiB, default 64 KiB.
MIN_PDU = 4096
DEFAULT_CLIENT_PDU = 65536

#: Our own implementation identity (the statement's Storage Server reused DCMTK's;
#: we do not pretend to be DCMTK). 2.25 is the UUID-derived root of PS3.5 B.2,
#: so the UID is globally unique without an organisation root.
IMPLEMENTATION_CLASS_UID = "2.25.229416081467150574813735420347563196227"
IMPLEMENTATION_VERSION_NAME = "APPLIANCE_010"

#: The root of every UID the appliance generates (RT Dose, RT Plan, their series): the same
#: UUID-derived root as IMPLEMENTATION_CLASS_UID (PS3.5 B.2), no organisation root needed.
UID_ROOT = "2.25."


def new_uid() -> str:
    """Return a new UID under :data:`UID_ROOT`: ``2.25.`` and a random UUID as an integer (<= 44 chars)."""
    return UID_ROOT + str(uuid.uuid4().int)


#: Spatial Registration Storage: not in the statement's tables; the appliance only reads one
#: as the explicit registration of a dose that is not in its image series' Frame of Reference.
SPATIAL_REGISTRATION = "1.2.840.10008.5.1.4.1.1.66.1"


class Status(enum.IntEnum):
    """DIMSE statuses the appliance answers with (PS3.4 Annex B, PS3.7 Annex C)."""

    SUCCESS = 0x0000
    #: Warning: a duplicate was stored under the configured policy.
    WARNING_COERCED = 0xB000
    #: Refused: Out of Resources (disk below watermark or full).
    OUT_OF_RESOURCES = 0xA700
    #: Error: Data Set does not match SOP Class.
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    #: Error: Cannot understand (the data set does not decode).
    CANNOT_UNDERSTAND = 0xC000
    #: Failure (0xCxxx, "cannot understand" range): refused by appendix A rules.
    REFUSED_MODALITY = 0xC001
    REFUSED_DYNAMIC_PET = 0xC002
    REFUSED_MULTIFRAME_XA = 0xC003
    REFUSED_CHARACTER_SET = 0xC004
    REFUSED_UID_MISMATCH = 0xC005
    REFUSED_PIXEL_DATA = 0xC006
    REFUSED_DUPLICATE = 0xC007
    #: Failure: Processing failure (an unexpected fault on our side).
    PROCESSING_FAILURE = 0x0110
    # Query/Retrieve (beyond the statement; PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4).
    #: C-FIND, C-MOVE, C-GET: matches or sub-operations are continuing.
    PENDING = 0xFF00
    #: C-FIND: matches are continuing; one or more optional keys were not supported.
    PENDING_WARNING = 0xFF01
    #: Matching or sub-operations ended by a C-CANCEL-RQ.
    CANCEL = 0xFE00
    #: C-MOVE: the Move Destination is not a configured destination.
    MOVE_DESTINATION_UNKNOWN = 0xA801
    #: C-MOVE, C-GET: out of resources, unable to perform sub-operations.
    OUT_OF_RESOURCES_SUBOPERATIONS = 0xA702
    #: C-MOVE, C-GET: sub-operations complete, one or more failures or warnings (0xB000,
    #: the value of WARNING_COERCED: a name of its own for what it means here).
    SUBOPERATIONS_FAILED = 0xB000
    #: C-FIND, C-MOVE, C-GET: Identifier does not match SOP Class (0xA900).
    IDENTIFIER_DOES_NOT_MATCH = 0xA900
    #: C-FIND, C-MOVE, C-GET: unable to process (0xC000, as Cannot understand).
    UNABLE_TO_PROCESS = 0xC000

    @property
    def is_success(self) -> bool:
        return self == Status.SUCCESS or (self & 0xF000) == 0xB000
