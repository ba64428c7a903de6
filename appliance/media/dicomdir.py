"""The DICOMDIR of a USB file-set (PS3.10 8.2, PS3.3 F.5), through pydicom's FileSet.

The only module that touches pydicom's FileSet internals: private uses in :class:`Records`,
:class:`_Instance` and :func:`encode`, pinned by ``tests/test_dicomdir.py`` (byte for byte,
with pydicom pinned at 3.0.2 in ``pyproject.toml``). ``FileSet.write()`` cannot serve: it
copies every staged instance itself (no temp name, no fsync) and, when adding to an existing
set, copies every existing file off the stick and back onto it; the exporter writes the files
itself, makes them durable and verifies them, and asks this module only for the DICOMDIR's bytes.
The IMAGE record of an instance, one per file, is made here in bytes where they are known
to be pydicom's (:func:`_image_record`); every other record pydicom makes.

:class:`Keys` decides the values of the record keys (PS3.3 F.5) that an object cannot give
as they are: a date or time in the ACR-NEMA form (``1995.05.01``, ``15:26:10``) is
converted, and a key that is Type 1 in a record but only Type 2 in the object (Patient ID,
Study Date, Time and ID, Series and Instance Number) is completed when the object leaves it
empty. The exporter writes the same values into the object's copy on the stick, so that
records and files agree (DCMTK's ``dcmmkdir`` checks both); the stored object never changes.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import itertools
import re
import struct
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path

from pydicom.charset import default_encoding
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.fileset import (  # private helpers: pinned by tests/test_dicomdir.py
    _FOUR_LEVEL_SOP_CLASSES,
    _SINGLE_LEVEL_SOP_CLASSES,
    DIRECTORY_RECORDERS,
    FileInstance,
    FileSet,
    RecordNode,
    _four_level_record_type,
    _single_level_record_type,
)
from pydicom.filewriter import write_data_element, write_dataset, write_file_meta_info
from pydicom.tag import BaseTag
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from appliance.conformance import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    SOPClass,
)
from appliance.dicom.dicomio import Element
from appliance.errors import MediaError

#: The File-set ID of the sets we create (PS3.3 F.5: CS, at most 16 characters).
FILE_SET_ID = "APPLIANCE"

#: Record keys of VR DA and TM (PS3.3 F.5-2, F.5-26, F.5-27): Study Date and Time are Type 1,
#: the RT objects' dates and times Type 2 (an unreadable one is left empty, never invented).
_DATES = ("StudyDate", "StructureSetDate", "RTPlanDate")
_TIMES = ("StudyTime", "StructureSetTime", "RTPlanTime")
#: Where an empty Study Date or Time is taken from, first found first (DCMTK's dcmmkdir takes
#: Series, Acquisition and Content; the RT objects and Instance Creation date the object too).
_DATE_SOURCES = ("SeriesDate", "AcquisitionDate", "ContentDate", "StructureSetDate", "RTPlanDate",
                 "InstanceCreationDate")  # fmt: skip
_TIME_SOURCES = ("SeriesTime", "AcquisitionTime", "ContentTime", "StructureSetTime", "RTPlanTime",
                 "InstanceCreationTime")  # fmt: skip
#: Type 1 keys that are Type 1 in the objects too (any object, then by SOP class): the value
#: for an object that lacks one all the same.
_LAST_RESORT: dict[str, dict[str, str]] = {
    "*": {"Modality": "OT"},
    SOPClass.RT_STRUCTURE_SET: {"StructureSetLabel": "UNKNOWN"},
    SOPClass.RT_PLAN: {"RTPlanLabel": "UNKNOWN"},
    SOPClass.RT_DOSE: {"DoseSummationType": "UNKNOWN"},
}
_STUDY_KEYS = ("PatientID", "StudyDate", "StudyTime", "StudyID")
#: Every key :meth:`Keys.complete` may change, in the records and in the copy.
COMPLETED_KEYS = tuple(dict.fromkeys(_DATES + _TIMES + _STUDY_KEYS + (
    "SeriesNumber", "InstanceNumber", "Modality", "StructureSetLabel", "RTPlanLabel", "DoseSummationType")))
#: What the records use of an object: what pydicom's PATIENT, STUDY, SERIES, IMAGE and RT
#: record creators read (the record types are picked from them).
_RECORD_KEYWORDS = (
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "PatientName", "PatientID", "StudyDate",
    "StudyTime", "StudyDescription", "StudyInstanceUID", "StudyID", "AccessionNumber", "Modality",
    "SeriesInstanceUID", "SeriesNumber", "InstanceNumber", "StructureSetLabel", "StructureSetDate",
    "StructureSetTime", "RTPlanLabel", "RTPlanDate", "RTPlanTime", "DoseSummationType",
)  # fmt: skip
#: The record keys whose values a character set affects (VRs PN, LO, SH).
_TEXT_KEYS = ("PatientName", "PatientID", "StudyDescription", "StudyID", "AccessionNumber",
              "StructureSetLabel", "RTPlanLabel")  # fmt: skip
#: The levels above an instance's record (PS3.3 F.4), whose records pydicom finds by key.
_LEVELS = ("PATIENT", "STUDY", "SERIES")


def _tag(keyword: str) -> BaseTag:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ValueError(f"no DICOM keyword {keyword}")
    return BaseTag(tag)


_RECORD_TAGS = tuple(_tag(kw) for kw in _RECORD_KEYWORDS)
#: A UID of one value: digits and dots, at most one NUL of padding.
_UID_VALUE = re.compile(rb"[0-9.]*\x00?")
#: One value of printable ASCII (no backslash, no control character): pydicom gives it back as
#: a str of these characters, stripped of its spaces (a NUL it strips too, but not str.strip()).
_PLAIN = re.compile(rb"[\x20-\x5b\x5d-\x7e]*")
#: What :func:`header` keeps of an object: what Keys and Records read.
_HEADER_TAGS = tuple(sorted({_tag(kw) for kw in (*_RECORD_KEYWORDS, *COMPLETED_KEYS, *_DATE_SOURCES, *_TIME_SOURCES,
                                                   "EncapsulatedDocument")}))
#: Each tag :func:`header` keeps, its keyword, and whether :func:`_text` of its plain ASCII
#: value is that value stripped: True always, False unless a character set that is not
#: ASCII in its printable range is declared (LO, SH), None never (PN, and VRs pydicom gives as numbers).
#: The pattern of such a value: of printable ASCII (_PLAIN), or for a UID, of digits and dots
#: padded with a NUL (_UID_VALUE).
_HEADER_KEYS = tuple(
    (tag, keyword_for_tag(tag), {"SH": False, "LO": False}.get(dictionary_VR(tag), True)
     if dictionary_VR(tag) in ("AE", "CS", "DA", "DT", "IS", "LO", "SH", "TM", "UI") else None,
     _UID_VALUE if dictionary_VR(tag) == "UI" else _PLAIN)
    for tag in _HEADER_TAGS)
#: Specific Character Sets whose printable ASCII range is ASCII (ISO_IR 13 is not: 0x5C is a Yen sign).
_ASCII_CHARSETS = {b"", b"ISO_IR 6", b"ISO_IR 100", b"ISO_IR 101", b"ISO_IR 109", b"ISO_IR 110", b"ISO_IR 144",
                   b"ISO_IR 127", b"ISO_IR 126", b"ISO_IR 138", b"ISO_IR 148", b"ISO_IR 166", b"ISO_IR 192"}
_SPECIFIC_CHARACTER_SET = BaseTag(0x00080005)
_TEXT_TAGS = tuple(_tag(kw) for kw in _TEXT_KEYS)
_NOT_ASCII = re.compile(rb"[\x80-\xff\x1b]")
_SOP_CLASS_UID = BaseTag(0x00080016)
_SOP_INSTANCE_UID = BaseTag(0x00080018)
_INSTANCE_NUMBER = 0x00200013
_ENCAPSULATED_DOCUMENT = BaseTag(0x00420011)
_RT_PLAN_LABEL = BaseTag(0x300A0002)
_IMPLICIT_LE = ImplicitVRLittleEndian.encode("ascii")
_IMPLICIT_LE_VALUE = _IMPLICIT_LE + b"\0" * (len(_IMPLICIT_LE) & 1)
_MEDIA_SOP_CLASS = BaseTag(0x00020002)
_MEDIA_SOP_INSTANCE = BaseTag(0x00020003)
_TRANSFER_SYNTAX = BaseTag(0x00020010)
_SHORT_HEADER = struct.Struct("<HH2sH")
#: The DICOMDIR's offset elements (PS3.10 F.3) and the Directory Record Sequence.
_FIRST_OFFSET = 0x00041200
_LAST_OFFSET = 0x00041202
_RECORD_SEQUENCE = 0x00041220
_NEXT_OFFSET_TAG = 0x00041400
_LOWER_OFFSET_TAG = 0x00041420
_ITEM = struct.Struct("<HHL")
_SEQUENCE_HEADER = struct.Struct("<HH2sHL")
#: Explicit VRs with a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
#: An IMAGE record's elements before its key, as pydicom writes them (Explicit VR LE): the
#: offsets (0, set by encode), Record In-use Flag FFFFH, Directory Record Type.
_IMAGE_RECORD_HEAD = (struct.pack("<HH2sHL", 0x0004, 0x1400, b"UL", 4, 0) + struct.pack("<HH2sHH", 0x0004, 0x1410, b"US", 2, 0xFFFF)
                      + struct.pack("<HH2sHL", 0x0004, 0x1420, b"UL", 4, 0)
                      + struct.pack("<HH2sH", 0x0004, 0x1430, b"CS", 6) + b"IMAGE ")
#: A UID pydicom writes as it reads it (its text), and an Integer String (its original string).
_UID_TEXT = re.compile(r"[0-9.]+")
_IS_TEXT = re.compile(r"[+-]?[0-9]{1,12}")
_DA = re.compile(r"(\d{4})(\.?)(\d{2})\2(\d{2})")
_TM = re.compile(r"(\d{2})(?:(:?)(\d{2})(?:\2(\d{2})(?:\.(\d+))?)?)?")


def load(root: Path) -> FileSet:
    """The file-set whose DICOMDIR is at ``root`` (a new empty one if there is none)."""
    path = root / "DICOMDIR"
    if not path.exists():
        fs = FileSet()
        fs.ID = FILE_SET_ID
        return fs
    try:
        return FileSet(path)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for a damaged DICOMDIR
        raise MediaError(f"the stick holds a DICOMDIR that cannot be read ({exc}); nothing was written. "
                         "Move it away or use another stick") from None


class Header(Dataset):
    """What :func:`header` gives: a Dataset of raw elements, and ``texts``, the value of each
    key that :func:`_text` reads, worked out once from its bytes where that gives what pydicom
    would (plain ASCII, one value, no leading space: ``str()`` of pydicom's value, and stripped
    too): pydicom converts an element each time it is read."""

    texts: dict[str, str]


def header(body: bytes, elements: Mapping[int, Element], sop_class_uid: str, sop_instance_uid: str) -> Header:
    """What :class:`Keys` and :class:`Records` read of an object, from its Implicit VR LE
    data set ``body`` laid out as ``elements`` (``dicomio.walk``): its record keys and what
    completes them, left raw until read (as pydicom reads a file), with a file meta that
    says Implicit VR LE. Cheaper than pydicom reading every element of the file."""
    raw: dict[BaseTag, RawDataElement | DataElement] = {}
    texts: dict[str, str] = {}
    charset = elements.get(_SPECIFIC_CHARACTER_SET)
    ascii_texts = charset is None or body[charset.value_offset:charset.end].strip(b" \0") in _ASCII_CHARSETS
    for tag, keyword, plain, pattern in _HEADER_KEYS:
        elem = elements.get(tag)
        if elem is None or elem.length is None:
            texts[keyword] = ""
            continue
        value = body[elem.value_offset:elem.end]
        raw[tag] = RawDataElement(tag, None, elem.length, value, elem.value_offset, True, True)
        # Not with a leading space (pydicom keeps it): a text is then also str() of pydicom's value.
        if plain is not None and (plain or ascii_texts) and pattern.fullmatch(value) and value[:1] != b" ":
            texts[keyword] = value.rstrip(b"\0").decode("ascii").strip()
    ds = Header(raw)
    ds.texts = texts
    # Raw as the elements: pydicom converts them only if they are read (a few times per export).
    ds.file_meta = FileMetaDataset({tag: RawDataElement(tag, "UI", len(value), value, 0, False, True)
                                    for tag, value in ((_MEDIA_SOP_CLASS, _ui(sop_class_uid)),
                                                       (_MEDIA_SOP_INSTANCE, _ui(sop_instance_uid)),
                                                       (_TRANSFER_SYNTAX, _IMPLICIT_LE_VALUE))})
    return ds


def _ui(uid: str) -> bytes:
    """A UID's value: ASCII, padded with a NUL to an even length."""
    value = uid.encode("ascii")
    return value + b"\0" * (len(value) & 1)


def record_source(header: Dataset, values: dict[str, str]) -> Header:
    """What the records of an object are made from: its header's record keys, with ``values``
    (from :meth:`Keys.complete`).

    Specific Character Set is kept only if a key needs it (PS3.3 F.5: Type 1C, "if an
    extended or replacement character set is used in one of the keys"): pydicom copies it
    into all four records, so a study whose objects differ only in the character set of
    other attributes would get records that disagree with some of its files."""
    elements = header._dict  # raw as they are: pydicom converts only what a record reads
    ds = Header({tag: elements[tag] for tag in _RECORD_TAGS if tag in elements})  # only what the records use
    ds.texts = dict(getattr(header, "texts", {}))
    ds.file_meta = header.file_meta
    for keyword, value in values.items():
        setattr(ds, keyword, value)
        ds.texts[keyword] = value
    if _SPECIFIC_CHARACTER_SET in ds._dict and not any(_extended(elements.get(tag)) for tag in _TEXT_TAGS):  # noqa: SLF001
        del ds[_SPECIFIC_CHARACTER_SET]
        ds.texts.pop("SpecificCharacterSet", None)
    return ds


def _extended(elem: DataElement | RawDataElement | None) -> bool:
    """True if the value of ``elem`` (raw bytes, or what pydicom converted them to: str,
    PersonName) is not plain ASCII, or holds an escape."""
    if elem is None or elem.value is None:
        return False
    value = elem.value if isinstance(elem.value, bytes) else str(elem.value).encode("utf-8")
    return _NOT_ASCII.search(value) is not None


class Records:
    """Adds the records of new instances to ``fs``, each referring to the file the exporter
    writes itself, in a time that does not grow with the set.

    What pydicom's ``FileSet.add`` makes of an instance, byte for byte in the DICOMDIR, but
    without what costs there: it compares each new instance with every one the set holds,
    finds its place by scanning each level's records, makes all four records even when the
    patient, study and series are listed already, and copies each instance to a staging
    folder (0.6 s for 200 instances, 1.8 s for 400; here 0.04 and 0.08 s). Here the listed
    PATIENT, STUDY and SERIES records are found by their keys (pydicom's: Patient ID, Study
    and Series Instance UID, under their parent), and only the missing ones are made, as
    pydicom's ``_recordify`` makes them; an IMAGE record in bytes (:func:`_image_record`).
    Those are only encoded: the set does not list their instances (``fs`` is not iterated
    for them again)."""

    def __init__(self, fs: FileSet) -> None:
        self._fs = fs
        #: (Patient ID,), (.., Study Instance UID), (.., Series Instance UID) -> its record's node.
        self._nodes: dict[tuple[str, ...], RecordNode] = {}
        self._instances = {str(i.SOPInstanceUID) for i in fs}
        for node in fs._tree.children:  # noqa: SLF001
            self._index(node, ())

    def _index(self, node: RecordNode, parent: tuple[str, ...]) -> None:
        if len(parent) == len(_LEVELS) or node.record_type != _LEVELS[len(parent)]:
            return
        try:
            path = (*parent, str(node.key))
        except AttributeError:  # a damaged record; pydicom would not find it either
            return
        self._nodes.setdefault(path, node)
        for child in node.children:
            self._index(child, path)

    def add(self, record_source: Dataset, file_id: str) -> None:
        """Add the records of one instance (``record_source``: its header) to the set,
        referring to the file ``file_id`` (``DICOM/ST.../SE.../IM...``); an instance the set
        lists already is left as it is."""
        uid = _exact(record_source, "SOPInstanceUID")
        if uid in self._instances:
            return
        sop_class = _exact(record_source, "SOPClassUID") if type(record_source) is Header else None
        if (sop_class in _SINGLE_LEVEL_SOP_CLASSES if sop_class is not None
                else _single_level_record_type(record_source) != "PATIENT"):  # no SOP class of Tables 10, 11
            self._fs.add(record_source).node._record.ReferencedFileID = file_id.split("/")  # noqa: SLF001
            self._instances.add(uid)
            return
        path = tuple(_exact(record_source, kw) for kw in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID"))
        listed = 0
        while listed < len(_LEVELS) and path[: listed + 1] in self._nodes:
            listed += 1
        parent: RecordNode = self._nodes[path[:listed]] if listed else self._fs._tree  # noqa: SLF001
        encoded = _image_record(record_source, file_id)
        if encoded is not None:  # the instance's record in bytes; pydicom makes those above it
            for depth in range(listed, len(_LEVELS)):
                node = RecordNode(_record(_LEVELS[depth], record_source))
                node.parent = parent
                parent = node
                self._nodes[path[: depth + 1]] = node
            _EncodedNode(encoded).parent = parent
            self._instances.add(uid)
            return
        records = [_record(t, record_source) for t in (*_LEVELS, _four_level_record_type(record_source))[listed:]]
        leaf = records[-1]
        leaf.ReferencedFileID = file_id.split("/")
        leaf.ReferencedSOPClassUIDInFile = record_source.SOPClassUID
        leaf.ReferencedSOPInstanceUIDInFile = record_source.SOPInstanceUID
        leaf.ReferencedTransferSyntaxUIDInFile = record_source.file_meta.TransferSyntaxUID
        for depth, record in enumerate(records, listed):
            node = RecordNode(record)
            node.parent = parent
            parent = node
            if depth < len(_LEVELS):
                self._nodes[path[: depth + 1]] = node
        instance = _Instance(node, uid)
        node.instance = instance
        # Keyed as pydicom keys it (instance.SOPInstanceUID, read through its records: slower).
        self._fs._stage["+"][leaf.ReferencedSOPInstanceUIDInFile] = instance  # noqa: SLF001
        self._fs._instances.append(instance)  # noqa: SLF001
        instance._apply_stage("+")  # noqa: SLF001
        self._instances.add(uid)


def _exact(source: Dataset, keyword: str) -> str:
    """``str(source.get(keyword, ""))`` of a key of VR LO or UI (Patient ID, the UIDs): from a
    Header's texts where it has one, which is the same (for an empty IS pydicom gives None)."""
    if type(source) is Header:
        texts: dict[str, str] = getattr(source, "texts", {})
        text = texts.get(keyword)
        if text is not None:
            return text
    return str(source.get(keyword, ""))


class _EncodedNode(RecordNode):
    """An IMAGE record made by :func:`_image_record`: its bytes, which :func:`encode` writes
    as they are (but for its offsets). It has no Dataset and no FileInstance: what the
    export adds is only ever encoded, never looked up in the set again."""

    def __init__(self, encoded: bytes) -> None:
        super().__init__()
        self.encoded = encoded


def _image_record(source: Dataset, file_id: str) -> bytes | None:
    """The IMAGE record of an instance (``source``: its :func:`record_source`) with the
    File ID ``file_id``, in Explicit VR LE with both offsets 0: what pydicom's record creator
    (``_define_image``, then :func:`_record` and the references of :meth:`Records.add`) makes
    and ``write_dataset`` writes, byte for byte. None unless it knows it gives those bytes:
    an IMAGE record (by SOP class and Modality), no Specific Character Set, one plain UID
    each and an Instance Number pydicom writes as it reads it; pydicom makes that record."""
    if type(source) is not Header or "SpecificCharacterSet" in source:
        return None
    texts: dict[str, str] = getattr(source, "texts", {})
    elements = source._dict  # raw as they are, or DataElements of completed keys  # noqa: SLF001
    uids = []
    for tag in (_SOP_CLASS_UID, _SOP_INSTANCE_UID):
        elem = elements.get(tag)
        value = getattr(elem, "value", None)
        if type(elem) is RawDataElement and isinstance(value, bytes) and _UID_VALUE.fullmatch(value) and value[:1] != b"\0":
            uids.append(value.rstrip(b"\0"))
        elif type(elem) is DataElement and isinstance(value, str) and _UID_TEXT.fullmatch(value):
            uids.append(value.encode("ascii"))  # read by pydicom already: written as it is
        else:
            return None
    number, modality = texts.get("InstanceNumber"), texts.get("Modality")
    if number is None or modality is None or not _IS_TEXT.fullmatch(number):
        return None
    if (uids[0].decode() in _SINGLE_LEVEL_SOP_CLASSES or uids[0].decode() in _FOUR_LEVEL_SOP_CLASSES
            or modality in ("RTINTENT", "RTSEGANN", "RTRAD", "PLAN")
            or _ENCAPSULATED_DOCUMENT in elements or _RT_PLAN_LABEL in elements):
        return None
    file_id_value = file_id.replace("/", "\\").encode("ascii")
    parts = [_IMAGE_RECORD_HEAD]
    for key, vr, value, pad in ((0x00041500, b"CS", file_id_value, b" "), (0x00041510, b"UI", uids[0], b"\0"),
                                (0x00041511, b"UI", uids[1], b"\0"), (0x00041512, b"UI", _IMPLICIT_LE, b"\0"),
                                (_INSTANCE_NUMBER, b"IS", number.encode("ascii"), b" ")):
        value += pad * (len(value) & 1)
        parts.append(_SHORT_HEADER.pack(key >> 16, key & 0xFFFF, vr, len(value)) + value)
    return b"".join(parts)


class _Flags:
    """FileInstance's staging flags (pydicom makes this class anew for every instance)."""

    add: bool
    remove: bool


class _Instance(FileInstance):
    """pydicom's FileInstance, but for the name pydicom would stage a copy of its file under
    (never: the exporter writes the files itself), which is derived from the SOP Instance UID
    instead of drawn at random (uuid4 asks the kernel, per instance), and its flags' class,
    made once."""

    def __init__(self, node: RecordNode, sop_instance_uid: str) -> None:
        self._uuid = uuid.uuid5(uuid.NAMESPACE_OID, sop_instance_uid)
        self._flags = _Flags()  # type: ignore[assignment]
        self._apply_stage("x")
        self._stage_path: Path | None = None
        self.node = node


def _record(record_type: str, ds: Dataset) -> Dataset:
    """One directory record of a four-level instance, as pydicom's ``FileSet._recordify`` makes it."""
    try:
        record = DIRECTORY_RECORDERS[record_type](ds)
    except ValueError as exc:
        raise ValueError(f"Unable to use the default '{record_type}' record creator: {exc}. See DICOM "
                         "PS3.3 Section F.5") from exc
    record.OffsetOfTheNextDirectoryRecord = 0
    record.RecordInUseFlag = 0xFFFF
    record.OffsetOfReferencedLowerLevelDirectoryEntity = 0
    record.DirectoryRecordType = record_type
    if "SpecificCharacterSet" in ds:
        record.SpecificCharacterSet = ds.SpecificCharacterSet
    return record


def encode(fs: FileSet) -> bytes:
    """The DICOMDIR of ``fs``: what pydicom's own encoder writes (a private method: the public
    ``write()`` would also copy the files, see the module docstring), byte for byte, but
    each record encoded once, not twice.

    Its file meta names the appliance as the implementation that wrote it, as the meta of
    every file on the stick does (pydicom would name itself, ``PYDICOM 3.0.2``); a new set's
    DICOMDIR data set is made here for that, as pydicom would make it while writing.

    pydicom's ``_write_dicomdir`` encodes every record to learn its length (for the offsets),
    then the whole sequence again; here each record is encoded once, as the sequence encodes
    it (``write_dataset``), and its two offsets, fixed-size UL values, are set in its bytes.
    Unlike pydicom, the records' offset elements in ``fs`` are left as they were."""
    if not fs._ds:  # noqa: SLF001
        fs._ds = fs._create_dicomdir()  # noqa: SLF001
    ds = fs._ds  # noqa: SLF001
    meta = ds.file_meta
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = False, True
    first, last = ds[_FIRST_OFFSET], ds[_LAST_OFFSET]
    first.value = last.value = 0
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    write_dataset(fp, ds[:_FIRST_OFFSET])
    at_first = fp.tell()
    write_dataset(fp, ds[_FIRST_OFFSET:_RECORD_SEQUENCE])
    encodings = ds.get("SpecificCharacterSet", default_encoding)  # what write_sequence_item gets
    # Each record (depth first, as pydicom orders them), its bytes and where its item starts.
    nodes = list(fs._tree)  # noqa: SLF001
    items: list[tuple[bytes, bool]] = []
    offset = fp.tell() + 12  # after the sequence's tag, VR, reserved bytes and length
    start: dict[int, int] = {}
    for node in nodes:
        start[id(node)] = offset
        if type(node) is _EncodedNode:
            items.append((node.encoded, False))
            offset += 8 + len(node.encoded)
            continue
        record = node._record  # noqa: SLF001
        rb = DicomBytesIO()
        rb.is_implicit_VR, rb.is_little_endian = False, True
        write_dataset(rb, record, parent_encoding=encodings)
        undefined = bool(getattr(record, "is_undefined_length_sequence_item", False))
        items.append((rb.getvalue(), undefined))
        offset += 8 + len(items[-1][0]) + (8 if undefined else 0)
    # Where each record's next sibling starts (pydicom's RecordNode.next looks its index up:
    # a time that grows with the square of a series' size).
    following: dict[int, int] = {}
    for parent in (fs._tree, *nodes):  # noqa: SLF001
        for child, after in itertools.pairwise(parent.children):
            following[id(child)] = start[id(after)]
    body = bytearray()
    for node, (data, undefined) in zip(nodes, items, strict=True):
        lower = start[id(node.children[0])] if node.children else 0
        encoded = bytearray(data)
        _set_offset(encoded, _NEXT_OFFSET_TAG, following.get(id(node), 0))
        _set_offset(encoded, _LOWER_OFFSET_TAG, lower)
        body += _ITEM.pack(0xFFFE, 0xE000, 0xFFFFFFFF if undefined else len(encoded))
        body += encoded
        if undefined:
            body += _ITEM.pack(0xFFFE, 0xE00D, 0)
    fp.write(_SEQUENCE_HEADER.pack(0x0004, 0x1220, b"SQ", 0, len(body)))
    fp.write(bytes(body))
    write_dataset(fp, ds[_RECORD_SEQUENCE + 1:])
    roots = fs._tree.children  # noqa: SLF001
    if roots:
        first.value, last.value = start[id(roots[0])], start[id(roots[-1])]
        end = fp.tell()
        fp.seek(at_first)
        write_data_element(fp, first)
        write_data_element(fp, last)
        fp.seek(end)
    return bytes(fp.getvalue())


def _set_offset(record: bytearray, tag: int, value: int) -> None:
    """Set the UL value of ``tag`` (an offset, among a record's first elements) in its
    encoding (Explicit VR LE)."""
    pos = 0
    while pos + 8 <= len(record):
        group, element, vr = struct.unpack_from("<HH2s", record, pos)
        this = group << 16 | element
        if this == tag:
            if vr != b"UL":
                raise MediaError(f"a DICOMDIR record holds ({group:04X},{element:04X}) as {vr!r}, not UL")
            struct.pack_into("<L", record, pos + 8, value)
            return
        if this > tag:
            break
        if vr in _LONG_VRS:
            pos += 12 + struct.unpack_from("<L", record, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", record, pos + 6)[0]
    raise MediaError(f"a DICOMDIR record lacks ({tag >> 16:04X},{tag & 0xFFFF:04X})")


# -- the values of the record keys ------------------------------------------------------------


@functools.lru_cache(maxsize=1024)  # the objects of a series share their dates and times
def dicom_date(value: str) -> str:
    """``value`` as a DA (``YYYYMMDD``), converting the ACR-NEMA ``YYYY.MM.DD``; "" if it is no date."""
    m = _DA.fullmatch(value.strip())
    if m is None:
        return ""
    text = m[1] + m[3] + m[4]
    try:
        datetime.strptime(text, "%Y%m%d")
    except ValueError:
        return ""
    return text


@functools.lru_cache(maxsize=1024)  # the objects of a series share their dates and times
def dicom_time(value: str) -> str:
    """``value`` as a TM (``HH[MM[SS[.F{1,6}]]]``), converting the ACR-NEMA ``HH:MM:SS.F``
    and cutting a fraction to 6 digits; "" if it is no time."""
    m = _TM.fullmatch(value.strip())
    if m is None:
        return ""
    hh, _, mm, ss, frac = m.groups()
    if int(hh) > 23 or (mm is not None and int(mm) > 59) or (ss is not None and int(ss) > 60):
        return ""
    return hh + (mm or "") + (ss or "") + (f".{frac[:6]}" if frac else "")


def generated_id(kind: str, study_uid: str) -> str:
    """The ID (``kind``: "patient" or "study") the records and the copy get for a study
    whose objects have none: ``NOID-`` and 11 characters of a hash of the Study Instance UID,
    so two studies without IDs stay apart, and the same study gets the same ID on every
    export (an LO and an SH, at most 16 characters)."""
    digest = hashlib.sha256(f"{kind}:{study_uid}".encode()).digest()
    return "NOID-" + base64.b32encode(digest).decode()[:11]


def _text(source: Dataset | FileInstance, keyword: str) -> str:
    if type(source) is Header:
        texts: dict[str, str] = getattr(source, "texts", {})  # none in a copy pydicom made
        text = texts.get(keyword)
        if text is not None:
            return text
    try:
        value = source[keyword].value
    except KeyError:
        return ""
    return "" if value is None else str(value).strip()


def _number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0


class Keys:
    """The record key values of the instances of one file-set, study by study.

    A study's PATIENT and STUDY records and a series' SERIES record are made from the first
    of their objects added (pydicom keeps the first); a later object that leaves one of their
    Type 1 keys empty takes the listed value, so its copy agrees with the records above it."""

    def __init__(self, fs: FileSet) -> None:
        #: Study Instance UID -> Patient ID, Study Date, Study Time, Study ID as listed.
        self._studies: dict[str, dict[str, str]] = {}
        #: Series Instance UID -> Series Number as listed.
        self._series: dict[str, str] = {}
        #: Study Instance UID -> its highest Series Number; Series Instance UID -> its highest Instance Number.
        self._top_series: dict[str, int] = {}
        self._top_instance: dict[str, int] = {}
        for instance in fs:
            self.listed(instance)

    def complete(self, ds: Dataset, received_at: str) -> dict[str, str]:
        """The record keys of ``ds`` (an object's header, received by the box at the ISO time
        ``received_at``) whose values must change for valid records: ``{keyword: value}``.

        A legacy or unreadable date or time is converted (or emptied); an empty Type 1 key
        is taken from the records already listed for its study or series, else from the
        object (a Study Date from its Series, Acquisition, Content or Instance Creation Date),
        else generated: Patient and Study ID from the Study Instance UID (:func:`generated_id`),
        a Series or Instance Number as the next in its study or series, a Study Date and Time
        from ``received_at``."""
        out: dict[str, str] = {}
        for keywords, convert in ((_DATES, dicom_date), (_TIMES, dicom_time)):
            for kw in keywords:
                value = _text(ds, kw)
                if value and convert(value) != value:
                    out[kw] = convert(value)

        def empty(kw: str) -> bool:
            return not out.get(kw, _text(ds, kw))

        study, series = _text(ds, "StudyInstanceUID"), _text(ds, "SeriesInstanceUID")
        listed = self._studies.get(study, {})
        if empty("PatientID"):
            out["PatientID"] = listed.get("PatientID") or generated_id("patient", study)
        if empty("StudyDate"):
            out["StudyDate"] = listed.get("StudyDate") or _first(ds, _DATE_SOURCES, dicom_date) or (
                dicom_date(received_at[:10].replace("-", "")))
        if empty("StudyTime"):
            out["StudyTime"] = listed.get("StudyTime") or _first(ds, _TIME_SOURCES, dicom_time) or (
                dicom_time(received_at[11:19].replace(":", "")))
        if empty("StudyID"):
            out["StudyID"] = listed.get("StudyID") or generated_id("study", study)
        if empty("SeriesNumber"):
            out["SeriesNumber"] = self._series.get(series) or str(self._top_series.get(study, 0) + 1)
        if empty("InstanceNumber"):
            out["InstanceNumber"] = str(self._top_instance.get(series, 0) + 1)
        for kw, value in (_LAST_RESORT["*"] | _LAST_RESORT.get(_text(ds, "SOPClassUID"), {})).items():
            if empty(kw):
                out[kw] = value
        return out

    def listed(self, source: Dataset | FileInstance) -> None:
        """Note the keys of an instance just listed (its record source, or a record read)."""
        study, series = _text(source, "StudyInstanceUID"), _text(source, "SeriesInstanceUID")
        if study:
            self._studies.setdefault(study, {kw: _text(source, kw) for kw in _STUDY_KEYS})
            self._top_series[study] = max(self._top_series.get(study, 0), _number(_text(source, "SeriesNumber")))
        if series:
            self._series.setdefault(series, _text(source, "SeriesNumber"))
            self._top_instance[series] = max(self._top_instance.get(series, 0),
                                             _number(_text(source, "InstanceNumber")))


def _first(ds: Dataset, keywords: tuple[str, ...], convert: Callable[[str], str]) -> str:
    """The first of ``keywords`` that ``ds`` has a readable value of, converted; else ""."""
    for kw in keywords:
        value = convert(_text(ds, kw))
        if value:
            return value
    return ""
