"""The SQL of Query/Retrieve: what a C-FIND key matches (PS3.4 C.2.2.2) and on which
column, what a query at each level selects from, and the statements :meth:`Index.find
<appliance.store.index.Index.find>` and :meth:`Index.find_instances
<appliance.store.index.Index.find_instances>` run. Kept apart from the index's other named
queries; like them, it lives in the store (the only place SQL may live)."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class MatchKind(enum.StrEnum):
    """How a C-FIND key's value matches (PS3.4 C.2.2.2)."""

    #: Exactly this value (PN: case-insensitively).
    SINGLE = "single"
    #: ``*`` any run of characters, ``?`` any one (PN: case-insensitively).
    WILDCARD = "wildcard"
    #: From ``values[0]`` to ``values[1]``, inclusive; an empty bound is open.
    RANGE = "range"
    #: Any of the values (a list of UIDs).
    LIST = "list"


@dataclass(frozen=True)
class Match:
    """One matching key of a query on a column of :data:`FIND_COLUMNS`."""

    column: str
    kind: MatchKind
    values: tuple[str, ...]


#: The levels of a query, top down.
FIND_LEVELS = ("patient", "study", "series", "image")


@dataclass(frozen=True)
class FindColumn:
    """A value a query can match on or return: the level it belongs to, its SQL, and how
    it matches (``text`` case-sensitively, ``pn`` case-insensitively, ``date``/``time`` with
    ranges, ``uid`` with lists, ``int`` numerically, ``modalities`` against any series of
    the study; ``value`` columns are returned only)."""

    level: str
    sql: str
    kind: str


_PATH_OF = {  # one stored file of the entity, for the attributes the index does not hold
    "patient": "(SELECT y.path FROM studies x JOIN series z ON z.study_uid = x.study_uid"
               " JOIN instances y ON y.series_uid = z.series_uid WHERE x.patient = p.id LIMIT 1)",
    "study": "(SELECT y.path FROM series z JOIN instances y ON y.series_uid = z.series_uid"
             " WHERE z.study_uid = st.study_uid LIMIT 1)",
    "series": "(SELECT y.path FROM instances y WHERE y.series_uid = s.series_uid LIMIT 1)",
    "image": "i.path",
}

#: What a query can match on and return, by name.
FIND_COLUMNS: Mapping[str, FindColumn] = {
    "patient_id": FindColumn("patient", "p.patient_id", "text"),
    "patient_name": FindColumn("patient", "p.patient_name", "pn"),
    "patient_related_studies": FindColumn("patient", "(SELECT count(*) FROM studies x WHERE x.patient = p.id)",
                                          "value"),
    "patient_related_series": FindColumn(
        "patient", "(SELECT count(*) FROM studies x JOIN series z ON z.study_uid = x.study_uid"
                   " WHERE x.patient = p.id)", "value"),
    "patient_related_instances": FindColumn(
        "patient", "(SELECT count(*) FROM studies x JOIN series z ON z.study_uid = x.study_uid"
                   " JOIN instances y ON y.series_uid = z.series_uid WHERE x.patient = p.id)", "value"),
    "study_uid": FindColumn("study", "st.study_uid", "uid"),
    "study_date": FindColumn("study", "st.study_date", "date"),
    "study_time": FindColumn("study", "st.study_time", "time"),
    "modalities_in_study": FindColumn(
        "study", "(SELECT group_concat(DISTINCT z.modality) FROM series z WHERE z.study_uid = st.study_uid)",
        "modalities"),
    "study_related_series": FindColumn("study", "(SELECT count(*) FROM series z WHERE z.study_uid = st.study_uid)",
                                       "value"),
    "study_related_instances": FindColumn(
        "study", "(SELECT count(*) FROM series z JOIN instances y ON y.series_uid = z.series_uid"
                 " WHERE z.study_uid = st.study_uid)", "value"),
    "series_uid": FindColumn("series", "s.series_uid", "uid"),
    "modality": FindColumn("series", "s.modality", "text"),
    "series_number": FindColumn("series", "s.series_number", "int"),
    "series_related_instances": FindColumn(
        "series", "(SELECT count(*) FROM instances y WHERE y.series_uid = s.series_uid)", "value"),
    "sop_instance_uid": FindColumn("image", "i.sop_instance_uid", "uid"),
    "sop_class_uid": FindColumn("image", "i.sop_class_uid", "uid"),
    "instance_number": FindColumn("image", "i.instance_number", "int"),
    "transfer_syntax": FindColumn("image", "i.transfer_syntax", "value"),
    "size": FindColumn("image", "i.size", "value"),
}

_FIND_FROM = {
    "patient": ("patients p", "p.id"),
    "study": ("studies st JOIN patients p ON p.id = st.patient", "st.rowid"),
    "series": ("series s JOIN studies st ON st.study_uid = s.study_uid JOIN patients p ON p.id = st.patient",
               "s.rowid"),
    "image": ("instances i JOIN series s ON s.series_uid = i.series_uid JOIN studies st ON st.study_uid = s.study_uid"
              " JOIN patients p ON p.id = st.patient", "i.rowid"),
}


@dataclass(frozen=True)
class Found:
    """One entity a query matched: ``key`` pages on (pass the last one as ``after``), the
    values asked for by column name, and one stored file of it (``path``, relative to the
    data folder; None if it holds none)."""

    key: int
    values: Mapping[str, Any]
    path: str | None


def _like(pattern: str, wildcards: bool) -> str:
    """A LIKE pattern (ESCAPE '\\') for a DICOM value, its ``*`` and ``?`` as wildcards if asked."""
    out = []
    for ch in pattern:
        if ch in "%_\\":
            out.append("\\" + ch)
        elif wildcards and ch == "*":
            out.append("%")
        elif wildcards and ch == "?":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


def _glob(pattern: str) -> str:
    """A GLOB pattern for a DICOM wildcard value (``*`` and ``?`` are GLOB's own)."""
    return pattern.replace("[", "[[]")


def _match_sql(m: Match, level: str) -> tuple[str, list[Any]]:
    """The SQL condition and its arguments for one matching key."""
    col = FIND_COLUMNS.get(m.column)
    if col is None or FIND_LEVELS.index(col.level) > FIND_LEVELS.index(level):
        raise ValueError(f"no column {m.column!r} at the {level} level")
    expr, kind, v = col.sql, col.kind, m.values
    if kind == "modalities":  # ModalitiesInStudy: any series of the study
        inner = _match_sql(Match("modality", m.kind, v), "series")
        # By the study's series, never by the modality index: that would visit every series
        # of the modality for each candidate study.
        return ("EXISTS (SELECT 1 FROM series s INDEXED BY series_study WHERE s.study_uid = st.study_uid AND "
                + inner[0] + ")", inner[1])
    if kind == "pn" and m.kind in (MatchKind.SINGLE, MatchKind.WILDCARD):
        # The whole name, or its first (alphabetic) component group before any '='.
        pattern = _like(v[0], m.kind is MatchKind.WILDCARD)
        return f"({expr} LIKE ? ESCAPE '\\' OR {expr} LIKE ? ESCAPE '\\')", [pattern, pattern + "=%"]
    if m.kind is MatchKind.SINGLE:
        return f"{expr} = ?", [int(v[0]) if kind == "int" else v[0]]
    if m.kind is MatchKind.WILDCARD:
        return f"{expr} GLOB ?", [_glob(v[0])]
    if m.kind is MatchKind.LIST:
        return f"{expr} IN ({', '.join('?' * len(v))})", list(v)
    low, high = v
    conds, args = [f"{expr} <> ''"], []
    if low:
        conds.append(f"{expr} >= ?")
        args.append(low)
    if high:
        conds.append(f"{expr} <= ?")
        args.append(high)
    return " AND ".join(conds), args


def find_sql(level: str, matches: Sequence[Match], columns: Sequence[str], after: int,
             limit: int) -> tuple[str, list[Any]]:
    """The statement (and its arguments) of :meth:`Index.find`: up to ``limit`` entities of
    ``level`` past the key ``after`` that every match holds, with the values of ``columns``
    (``key_`` and ``path_`` besides). ValueError for a column the level does not have."""
    source, key = _FIND_FROM[level]
    for c in columns:
        col = FIND_COLUMNS.get(c)
        if col is None or FIND_LEVELS.index(col.level) > FIND_LEVELS.index(level):
            raise ValueError(f"no column {c!r} at the {level} level")
    select = [f"{key} AS key_", f"{_PATH_OF[level]} AS path_"] + [
        f"{FIND_COLUMNS[c].sql} AS {c}" for c in columns]
    conds, args = [f"{key} > ?"], [after]
    for m in matches:
        cond, more = _match_sql(m, level)
        conds.append(cond)
        args += more
    sql = (f"SELECT {', '.join(select)} FROM {source} WHERE {' AND '.join(conds)}"
           f" ORDER BY {key} LIMIT ?")
    return sql, [*args, limit]


def instances_sql(level: str, matches: Sequence[Match]) -> tuple[str, list[Any]]:
    """The statement (and its arguments) of :meth:`Index.find_instances`: every instance of
    the ``level`` entities that ``matches`` select, by study, series, instance number, UID."""
    source, _ = _FIND_FROM["image"]
    conds: list[str] = []
    args: list[Any] = []
    for m in matches:
        cond, more = _match_sql(m, level)
        conds.append(cond)
        args += more
    sql = (f"SELECT i.*, s.study_uid FROM {source} WHERE {' AND '.join(conds) or '1'}"
           " ORDER BY s.study_uid, i.series_uid, i.instance_number, i.sop_instance_uid")
    return sql, args
