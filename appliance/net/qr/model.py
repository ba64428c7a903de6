"""The Query/Retrieve information models (PS3.4 C.6.1 Patient Root, C.6.2 Study Root) as
data, and the translations at their edges: a request's Identifier into a :class:`Query`
(the index's matches, the keys to return), and a match into a response Identifier.

Each key (:data:`KEYS`) names where its value comes from: a column of the index
(:data:`appliance.store.find.FIND_COLUMNS`), or, for the few the index does not hold
(Accession Number, Study ID, descriptions, birth date and sex), one stored file of the
matched entity, read only when a query asks for them. Text is compared as Unicode: a query
is decoded in its own Specific Character Set and the index holds names decoded in theirs,
so a name stored in ISO_IR 192 or ISO_IR 144 matches a query in ISO_IR 100 or the default
repertoire. Section 7's character sets are accepted for queries (the default repertoire and
the single-byte sets and UTF-8 it lists; no code extensions), and a response is encoded in
the query's own set when that can hold its values, else ISO_IR 100, else ISO_IR 192.
"""

from __future__ import annotations

import logging
import re
import struct
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, Mapping, Sequence

from pydicom import dcmread
from pydicom.charset import convert_encodings
from pydicom.datadict import tag_for_keyword
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue

from appliance.conformance import DEFAULT_CHARACTER_SET, RT_CHARACTER_SETS, Status, TransferSyntax
from appliance.store.find import FIND_LEVELS, Match, MatchKind

log = logging.getLogger(__name__)

#: The levels of each information model, top down (Query/Retrieve Level values).
MODEL_LEVELS: Mapping[str, tuple[str, ...]] = {
    "PATIENT": ("PATIENT", "STUDY", "SERIES", "IMAGE"),
    "STUDY": ("STUDY", "SERIES", "IMAGE"),
}
#: The character sets a query may come in: section 7's (the default repertoire, and for RT
#: objects the single-byte sets and ISO_IR 192, which include the images' ISO_IR 100).
QUERY_CHARACTER_SETS = frozenset({"", DEFAULT_CHARACTER_SET}) | RT_CHARACTER_SETS
#: The sets a response falls back to when the query's cannot hold its values.
_FALLBACK_CHARACTER_SETS = ("ISO_IR 100", "ISO_IR 192")
#: VRs whose values are text in the query's character set (the others are ASCII).
_TEXT_VRS = frozenset({"PN", "LO", "SH", "LT", "ST", "UT", "UC"})
#: VRs whose values may hold the wildcards * and ? (PS3.4 C.2.2.2.4).
_WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})


@dataclass(frozen=True)
class Key:
    """A key of the information models: its keyword and VR, its level (in the Patient Root
    model; Study Root counts the patient's keys as the study's), where its value comes from
    (an index column, or None: a stored file), whether it is the level's unique key, and
    whether it can be matched (counts are returned only)."""

    keyword: str
    vr: str
    level: str
    column: str | None
    unique: bool = False
    matched: bool = True

    @property
    def tag(self) -> int:
        tag = tag_for_keyword(self.keyword)
        assert tag is not None, self.keyword
        return int(tag)


#: The keys the SCP matches and returns: PS3.4 C.6.1.1 and C.6.2.1's required (R) and unique
#: (U) keys of each level, and a few optional ones it can answer.
KEYS: tuple[Key, ...] = (
    Key("PatientName", "PN", "patient", "patient_name"),
    Key("PatientID", "LO", "patient", "patient_id", unique=True),
    Key("PatientBirthDate", "DA", "patient", None),
    Key("PatientSex", "CS", "patient", None),
    Key("NumberOfPatientRelatedStudies", "IS", "patient", "patient_related_studies", matched=False),
    Key("NumberOfPatientRelatedSeries", "IS", "patient", "patient_related_series", matched=False),
    Key("NumberOfPatientRelatedInstances", "IS", "patient", "patient_related_instances", matched=False),
    Key("StudyDate", "DA", "study", "study_date"),
    Key("StudyTime", "TM", "study", "study_time"),
    Key("AccessionNumber", "SH", "study", None),
    Key("StudyID", "SH", "study", None),
    Key("StudyInstanceUID", "UI", "study", "study_uid", unique=True),
    Key("StudyDescription", "LO", "study", None),
    Key("ReferringPhysicianName", "PN", "study", None),
    Key("ModalitiesInStudy", "CS", "study", "modalities_in_study"),
    Key("NumberOfStudyRelatedSeries", "IS", "study", "study_related_series", matched=False),
    Key("NumberOfStudyRelatedInstances", "IS", "study", "study_related_instances", matched=False),
    Key("Modality", "CS", "series", "modality"),
    Key("SeriesNumber", "IS", "series", "series_number"),
    Key("SeriesInstanceUID", "UI", "series", "series_uid", unique=True),
    Key("SeriesDescription", "LO", "series", None),
    Key("NumberOfSeriesRelatedInstances", "IS", "series", "series_related_instances", matched=False),
    Key("SOPClassUID", "UI", "image", "sop_class_uid"),
    Key("SOPInstanceUID", "UI", "image", "sop_instance_uid", unique=True),
    Key("InstanceNumber", "IS", "image", "instance_number"),
)
_BY_TAG = {k.tag: k for k in KEYS}
#: Keys answered at every level with a value of the SCP's own (matching on them is ignored).
_RETRIEVE_AE_TITLE = 0x00080054
_INSTANCE_AVAILABILITY = 0x00080056
_QUERY_RETRIEVE_LEVEL = 0x00080052
_SPECIFIC_CHARACTER_SET = 0x00080005


class QueryError(Exception):
    """An Identifier the SCP cannot answer: the failure status and its Error Comment."""

    def __init__(self, status: Status, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


@dataclass(frozen=True)
class FileMatch:
    """A matching key on a value the index does not hold, checked on a stored file."""

    key: Key
    kind: MatchKind
    values: tuple[str, ...]


@dataclass(frozen=True)
class Query:
    """An Identifier, as the SCP answers it."""

    #: "PATIENT" or "STUDY" (root).
    model: str
    #: Query/Retrieve Level: "PATIENT", "STUDY", "SERIES" or "IMAGE".
    level: str
    #: What the index matches.
    matches: tuple[Match, ...]
    #: What is matched on stored files, after the index.
    file_matches: tuple[FileMatch, ...]
    #: The keys answered, in tag order.
    returned: tuple[Key, ...]
    #: Retrieve AE Title and Instance Availability were asked for.
    retrieve_ae: bool
    availability: bool
    #: Keywords (or tags) of the keys the SCP does not support (answered Pending with a warning).
    unsupported: tuple[str, ...]
    #: The query's Specific Character Set terms (empty: the default repertoire).
    charset: tuple[str, ...]

    @property
    def index_level(self) -> str:
        """The level as the index names it."""
        return self.level.lower()

    @property
    def columns(self) -> tuple[str, ...]:
        """The index columns of the keys answered."""
        return tuple(k.column for k in self.returned if k.column is not None)

    @property
    def file_keys(self) -> tuple[Key, ...]:
        """The keys answered or matched from a stored file."""
        keys = {k.keyword: k for k in self.returned if k.column is None}
        keys.update((m.key.keyword, m.key) for m in self.file_matches)
        return tuple(keys.values())

    def unique_matches(self) -> tuple[Match, ...]:
        """The matches on unique keys (what a C-MOVE or C-GET selects by, PS3.4 C.4.2.2.1)."""
        unique = {k.column for k in KEYS if k.unique}
        return tuple(m for m in self.matches if m.column in unique)


def _level_of(key: Key, model: str) -> str:
    """``key``'s level in ``model`` (Study Root has no patient level: the study holds it)."""
    return "study" if model == "STUDY" and key.level == "patient" else key.level


def _text(value: Any) -> str:
    if isinstance(value, (MultiValue, list, tuple)):
        return "\\".join(str(v) for v in value)
    return "" if value is None else str(value)


def _time_bound(value: str, high: bool) -> str:
    """A TM range bound, completed to HHMMSS (and a fraction, for an upper bound)."""
    value = value.strip()
    if not value:
        return ""
    whole, _, fraction = value.partition(".")
    if high:
        whole += "5959"[: max(0, 6 - len(whole))]
        return f"{whole}.{fraction or '999999'}"
    whole += "0000"[: max(0, 6 - len(whole))]
    return whole + (f".{fraction}" if fraction else "")


def _matching(key: Key, raw: str) -> tuple[MatchKind, tuple[str, ...]] | None:
    """How ``raw`` (a key's value) matches; None: universal matching (PS3.4 C.2.2.2.3)."""
    value = raw.strip(" \x00")
    if value == "" or (key.vr in _WILDCARD_VRS | {"UI", "DA", "TM", "DT"} and value.strip("*") == ""):
        return None
    if key.vr == "UI":
        uids = tuple(u.strip(" \x00") for u in value.split("\\") if u.strip(" \x00"))
        return (MatchKind.LIST, uids) if len(uids) > 1 else (MatchKind.SINGLE, uids)
    if key.vr in ("DA", "TM"):
        if "-" in value:
            low, _, high = value.partition("-")
            if key.vr == "TM":
                low, high = _time_bound(low, False), _time_bound(high, True)
            return MatchKind.RANGE, (low.strip(), high.strip())
        return MatchKind.SINGLE, (value,)
    if key.vr == "IS":
        try:
            return MatchKind.SINGLE, (str(int(value)),)
        except ValueError:
            raise QueryError(Status.IDENTIFIER_DOES_NOT_MATCH,
                             f"{key.keyword} '{value}' is not a number") from None
    if key.vr in _WILDCARD_VRS and ("*" in value or "?" in value):
        return MatchKind.WILDCARD, (value,)
    if "\\" in value and key.vr == "CS":  # e.g. ModalitiesInStudy CT\MR: any of them
        return MatchKind.LIST, tuple(v.strip() for v in value.split("\\") if v.strip())
    return MatchKind.SINGLE, (value,)


def parse(identifier: bytes, transfer_syntax: str, model: str) -> Query:
    """Read a C-FIND, C-MOVE or C-GET Identifier of ``model`` ("PATIENT" or "STUDY" root);
    raise :class:`QueryError` with the status to answer if it cannot be answered."""
    syntax = TransferSyntax(transfer_syntax)
    try:
        ds = read_dataset(BytesIO(identifier), syntax.is_implicit_vr, syntax.is_little_endian)
        terms = tuple(t.strip() for t in _text(ds.get("SpecificCharacterSet", "")).split("\\"))
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on a malformed data set
        raise QueryError(Status.UNABLE_TO_PROCESS, f"the identifier does not decode: {exc}") from None
    charset = () if all(t in ("", DEFAULT_CHARACTER_SET) for t in terms) else terms
    if len(charset) > 1 or (charset and charset[0] not in QUERY_CHARACTER_SETS):
        named = "\\".join(terms)
        raise QueryError(Status.UNABLE_TO_PROCESS,
                         f"Specific Character Set {named} is not supported (statement section 7)")
    level = _text(ds.get("QueryRetrieveLevel", "")).strip().upper()
    levels = MODEL_LEVELS[model]
    if level not in levels:
        raise QueryError(Status.IDENTIFIER_DOES_NOT_MATCH,
                         f"Query/Retrieve Level '{level}' is not one of {', '.join(levels)}")
    depth = FIND_LEVELS.index(level.lower())
    matches: list[Match] = []
    file_matches: list[FileMatch] = []
    returned: list[Key] = []
    unsupported: list[str] = []
    retrieve_ae = availability = False
    try:
        for elem in ds:
            tag = int(elem.tag)
            if tag >> 16 in (0x0000, 0x0002) or tag in (_QUERY_RETRIEVE_LEVEL, _SPECIFIC_CHARACTER_SET):
                continue
            if tag == _RETRIEVE_AE_TITLE:
                retrieve_ae = True
                continue
            if tag == _INSTANCE_AVAILABILITY:
                availability = True
                continue
            key = _BY_TAG.get(tag)
            if key is None:
                unsupported.append(elem.keyword or f"({tag >> 16:04X},{tag & 0xFFFF:04X})")
                continue
            if FIND_LEVELS.index(_level_of(key, model)) > depth:
                continue  # below the query level: not answered (PS3.4 C.4.1.2.1)
            returned.append(key)
            how = None if not key.matched or elem.is_empty else _matching(key, _text(elem.value))
            if how is None:
                continue
            if key.column is None:
                file_matches.append(FileMatch(key, *how))
            else:
                matches.append(Match(key.column, *how))
    except QueryError:
        raise
    except Exception as exc:  # noqa: BLE001 - a value pydicom cannot decode
        raise QueryError(Status.UNABLE_TO_PROCESS, f"the identifier does not decode: {exc}") from None
    # The unique keys of the levels above come along, so that the answer names its place
    # in the hierarchy (and can be retrieved) even if the query did not ask for them.
    for key in KEYS:
        above = _level_of(key, model).upper()
        if key.unique and key not in returned and levels.index(above) < levels.index(level):
            returned.append(key)
    return Query(model, level, tuple(matches), tuple(file_matches), tuple(sorted(returned, key=lambda k: k.tag)),
                 retrieve_ae, availability, tuple(unsupported), charset)


# -- matching on stored files ----------------------------------------------------------


def _pattern(value: str) -> re.Pattern[str]:
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in value),
                      re.DOTALL)


def file_value_matches(m: FileMatch, value: str | None) -> bool:
    """Whether a value read from a stored file matches ``m`` (as the index matches its
    columns: PN case-insensitively, with its first component group alone too)."""
    if not value:
        return False
    candidates = [value] + ([value.split("=", 1)[0]] if m.key.vr == "PN" and "=" in value else [])
    fold = m.key.vr == "PN"
    for v in candidates:
        v = v.casefold() if fold else v
        wanted = tuple(x.casefold() for x in m.values) if fold else m.values
        if m.kind is MatchKind.SINGLE and v == wanted[0]:
            return True
        if m.kind is MatchKind.LIST and v in wanted:
            return True
        if m.kind is MatchKind.WILDCARD and _pattern(wanted[0]).fullmatch(v):
            return True
        if m.kind is MatchKind.RANGE and (not wanted[0] or v >= wanted[0]) and (not wanted[1] or v <= wanted[1]):
            return True
    return False


def read_file_values(path: Path, keys: Sequence[Key]) -> dict[str, str]:
    """The values of ``keys`` in the stored file at ``path``, as text (empty when absent or
    unreadable: the index is a cache of the files, and a file may have just been deleted)."""
    try:
        ds = dcmread(path, stop_before_pixels=True,
                     specific_tags=[_SPECIFIC_CHARACTER_SET, *(k.tag for k in keys)])
        return {k.keyword: _text(ds.get(k.keyword, "")).strip() for k in keys}
    except Exception as exc:  # noqa: BLE001 - an unreadable file answers empty values
        log.debug("cannot read %s for a query: %s", path, exc)
        return {k.keyword: "" for k in keys}


# -- responses ---------------------------------------------------------------------------


def _codecs(terms: tuple[str, ...]) -> list[str]:
    return convert_encodings(list(terms)) if terms else ["ascii"]


def _fits(texts: list[str], terms: tuple[str, ...]) -> bool:
    codec = _codecs(terms)[0]
    try:
        for t in texts:
            t.encode(codec)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def response_charset(texts: list[str], query_charset: tuple[str, ...]) -> tuple[str, ...]:
    """The Specific Character Set a response holding ``texts`` is encoded in: the query's if
    it can hold them, else ISO_IR 100, else ISO_IR 192."""
    for terms in (query_charset, *((t,) for t in _FALLBACK_CHARACTER_SETS)):
        if _fits(texts, terms):
            return terms
    return (_FALLBACK_CHARACTER_SETS[-1],)


@dataclass(frozen=True)
class Identifier:
    """A response Identifier: flat, text-valued elements (multiple values joined by ``\\``)
    in a character set, encoded by hand (pydicom's writer costs ten times as much per
    response, and a query may have thousands of them)."""

    charset: tuple[str, ...]
    #: (tag, VR, value); the VRs are all short-form ones (AE CS DA IS LO PN SH TM UI).
    elements: tuple[tuple[int, str, str], ...]

    def get(self, keyword: str) -> str | None:
        tag = tag_for_keyword(keyword)
        return next((v for t, _, v in self.elements if t == tag), None)

    def encode(self, transfer_syntax: str) -> bytes:
        """The Identifier encoded in ``transfer_syntax``."""
        syntax = TransferSyntax(transfer_syntax)
        codec = _codecs(self.charset)[0]
        elements = list(self.elements)
        if self.charset:
            elements.append((_SPECIFIC_CHARACTER_SET, "CS", "\\".join(self.charset)))
        out = bytearray()
        for tag, vr, value in sorted(elements):
            raw = value.encode(codec if vr in _TEXT_VRS else "ascii", "replace")
            if len(raw) & 1:
                raw += b"\0" if vr == "UI" else b" "
            if len(raw) > 0xFFFE:
                raise ValueError(f"a value of {len(raw)} bytes does not fit a {vr} element")
            group, elem = tag >> 16, tag & 0xFFFF
            if syntax.is_implicit_vr:
                out += struct.pack("<HHL", group, elem, len(raw))
            else:
                out += struct.pack("<HH2sH" if syntax.is_little_endian else ">HH2sH", group, elem, vr.encode(),
                                   len(raw))
            out += raw
        return bytes(out)


def identifier(query: Query, values: Mapping[str, Any], file_values: Mapping[str, str], *,
               ae_title: str) -> Identifier:
    """The response Identifier of one match: the keys asked for, with the index's ``values``
    (by column) and ``file_values`` (by keyword), and the Query/Retrieve Level."""
    elements: list[tuple[int, str, str]] = [(_QUERY_RETRIEVE_LEVEL, "CS", query.level)]
    texts: list[str] = []
    for key in query.returned:
        raw = values.get(key.column) if key.column is not None else file_values.get(key.keyword)
        if raw is None:
            value = ""
        elif key.column == "modalities_in_study":
            value = str(raw).replace(",", "\\")
        else:
            value = str(raw)
        if key.vr in _TEXT_VRS:
            texts.append(value)
        elements.append((key.tag, key.vr, value))
    if query.retrieve_ae:
        elements.append((_RETRIEVE_AE_TITLE, "AE", ae_title))
    if query.availability:
        elements.append((_INSTANCE_AVAILABILITY, "CS", "ONLINE"))
    return Identifier(response_charset(texts, query.charset), tuple(elements))


def uid_list(tag: int, uids: Sequence[str]) -> Identifier:
    """An Identifier of one UID list element (Failed SOP Instance UID List), as many UIDs
    as a short-form element holds."""
    kept: list[str] = []
    size = -1
    for u in uids:
        size += len(u) + 1
        if size > 0xFFFE:
            break
        kept.append(u)
    return Identifier((), ((tag, "UI", "\\".join(kept)),))
