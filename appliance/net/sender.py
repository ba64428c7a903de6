"""The client AE (section 3.2, Tables 4-8): the echo utility and sending with C-STORE.

* :func:`echo` sends one C-ECHO over the Verification context (Table 8, Implicit VR LE
  only) and returns the round-trip time, or raises :class:`NetworkError` saying in words
  what went wrong: unknown host, connection refused, timed out, unreachable, association
  rejected (with the decoded reason) or aborted.
* :func:`plan_send` turns ``--study``/``--series`` requests into the objects to send.
  Objects travel with their image series (section 2.2): a series goes with the RT objects
  that reference it; only 3D volumes go (the Storage Server's 3D verdict); XA and SC are
  not in Table 6 and are refused with that reason.
* :func:`send` sends a plan over one association that proposes only the contexts of
  Tables 6 and 7 the plan needs, each with Implicit VR LE only: an object stored in Implicit
  VR LE goes out as stored (its data set read from the file, never decoded), any other is
  re-encoded once with :mod:`appliance.dicom.transcode`. One send runs at a time per store,
  across processes (an exclusive ``flock`` on ``export.lock`` in the data directory); others
  wait their turn.

Associations are :mod:`appliance.net.requester`'s (our own upper layer and DIMSE code, as
the Storage SCP's); callers get frozen dataclasses.
"""

from __future__ import annotations

import enum
import fcntl
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom.status import code_to_category

from appliance import audit, config
from appliance.config import Destination, TlsConfig
from appliance.conformance import (
    CLIENT_AE_TITLE,
    DEFAULT_CLIENT_PDU,
    IMAGE_OBJECTS,
    MIN_PDU,
    RT_OBJECTS,
    SCU_STORAGE_CONTEXTS,
    TABLE_6,
    TABLE_8,
    PresentationContextRow,
    SOPClass,
    Status,
    TransferSyntax,
)
from appliance.dicom.transcode import Transcoded, TranscodeError, to_implicit_le
from appliance.errors import ApplianceError, ConfigError, NetworkError
from appliance.net.requester import (
    Association,
    AssociationLost,
    associate,
    peer_name,
    stored_data_set,
)
from appliance.reports import Item, Progress, Report, sop_class_label
from appliance.store.index import InstanceRow
from appliance.store.marks import now as delivery_time
from appliance.store.store import Store

log = logging.getLogger(__name__)

#: DCMTK's default called AE title, used when HOST PORT is given without -aec.
DEFAULT_CALLED_AE = "ANY-SCP"
DEFAULT_ECHO_TIMEOUT = 10.0
DEFAULT_SEND_TIMEOUT = 60.0
#: The largest PDU length a PDU header can carry (PS3.8 9.3.1).
MAX_PDU = 0xFFFFFFFF
#: The lock file keeps its earlier name, so an older process and a newer one still take turns.
_LOCK_NAME = "export.lock"


class SendRefused(ApplianceError):
    """Nothing of what was asked can be sent; the message says why for each request."""


_peer = peer_name


# -- settings ------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientSettings:
    """How the client AE associates: our AE title, the max PDU we receive, a timeout."""

    calling_ae: str = CLIENT_AE_TITLE
    max_pdu: int = DEFAULT_CLIENT_PDU
    #: Seconds for the TCP connect, the association answer, and each DIMSE response.
    timeout: float = DEFAULT_SEND_TIMEOUT
    #: For destinations with ``tls``: the CA bundle that verifies them, and for "mutual" our
    #: certificate and key (``[tls]`` after :func:`appliance.tls.credentials`).
    tls: TlsConfig = TlsConfig()

    def check(self) -> None:
        """Raise ConfigError listing every invalid setting."""
        problems = config.validate_ae_title(self.calling_ae, "calling AE title (-aet)")
        pdu_problem = max_pdu_problem(self.max_pdu)
        if pdu_problem:
            problems.append(pdu_problem)
        if not 0 < self.timeout <= 3600:
            problems.append(f"timeout {self.timeout} s is out of range; use 1 to 3600 seconds")
        if problems:
            raise ConfigError("; ".join(problems))


def max_pdu_problem(max_pdu: int) -> str | None:
    """Why ``max_pdu`` cannot be the client's max PDU, or None: 0 (no limit, PS3.8 D.1.1) or
    :data:`MIN_PDU` up to :data:`MAX_PDU` bytes."""
    if max_pdu == 0 or MIN_PDU <= max_pdu <= MAX_PDU:
        return None
    return (f"max PDU {max_pdu} bytes is out of range; the client AE needs {MIN_PDU} to {MAX_PDU} bytes, "
            f"or 0 for no limit (default {DEFAULT_CLIENT_PDU})")


def check_peer(peer: Destination) -> None:
    """Raise ConfigError if ``peer`` cannot be a called AE title, host and port."""
    problems = config.validate_ae_title(peer.ae_title, "called AE title (-aec)")
    if not peer.host.strip():
        problems.append("the peer's host is empty")
    if not 1 <= peer.port <= 65535:
        problems.append(f"port {peer.port} is out of range; use 1 to 65535")
    if problems:
        raise ConfigError("; ".join(problems))


def proposed(rows: Sequence[PresentationContextRow]) -> list[tuple[str, Sequence[str]]]:
    """The presentation contexts of ``rows`` (conformance table rows) as :func:`associate` takes them."""
    return [(str(r.abstract_syntax), [str(ts) for ts in r.transfer_syntaxes]) for r in rows]


# -- echo ----------------------------------------------------------------------------


@dataclass(frozen=True)
class EchoResult:
    """A successful C-ECHO."""

    peer: Destination
    calling_ae: str
    #: Round trip of the C-ECHO request and response, in milliseconds.
    rtt_ms: float
    #: Time to open the association, in milliseconds.
    associate_ms: float

    def __str__(self) -> str:
        return (f"C-ECHO to {_peer(self.peer)} (as {self.calling_ae}) succeeded: round trip "
                f"{self.rtt_ms:.1f} ms, association {self.associate_ms:.1f} ms")


def echo(peer: Destination, settings: ClientSettings | None = None) -> EchoResult:
    """Send one C-ECHO to ``peer``; raise NetworkError (or ConfigError) saying what went wrong."""
    settings = settings or ClientSettings(timeout=DEFAULT_ECHO_TIMEOUT)
    settings.check()
    check_peer(peer)
    t0 = time.perf_counter()
    assoc = associate(peer, settings, proposed(TABLE_8))
    t1 = time.perf_counter()
    try:
        rsp = assoc.echo()
        t2 = time.perf_counter()
    except AssociationLost:
        raise NetworkError(
            f"{_peer(peer)} did not answer the C-ECHO within {settings.timeout:g} s, or aborted the association"
        ) from None
    finally:
        assoc.release()
    if rsp.status != Status.SUCCESS:
        raise NetworkError(f"{_peer(peer)} answered the C-ECHO with failure status 0x{rsp.status:04X}")
    return EchoResult(peer, settings.calling_ae, (t2 - t1) * 1000, (t1 - t0) * 1000)


# -- planning a send ---------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """A requested study or series that is not sent, and why."""

    level: str  # "study" or "series"
    uid: str
    reason: str

    def __str__(self) -> str:
        return f"{self.level} {self.uid}: {self.reason}"


@dataclass(frozen=True)
class SendPlan:
    """What one send sends, in order: each image series, then the RT objects referencing it."""

    objects: tuple[InstanceRow, ...]
    #: The image series that are sent.
    series: tuple[str, ...]
    refused: tuple[Refusal, ...]

    @property
    def contexts(self) -> tuple[PresentationContextRow, ...]:
        """The rows of Tables 6 and 7 this plan needs, nothing more."""
        needed = {o.sop_class_uid for o in self.objects}
        return tuple(r for r in SCU_STORAGE_CONTEXTS if r.abstract_syntax in needed)


_NETWORK_CLASSES = frozenset(r.abstract_syntax for r in SCU_STORAGE_CONTEXTS)
_TABLE_6_IMAGES = frozenset(r.abstract_syntax for r in TABLE_6) & IMAGE_OBJECTS


def plan_send(store: Store, *, studies: Sequence[str] = (), series: Sequence[str] = ()) -> SendPlan:
    """Work out what sending ``studies`` and ``series`` sends, and what is refused and why.

    Recomputes stale 3D verdicts first (an index write)."""
    store.update_verdicts()
    refused: list[Refusal] = []
    wanted: list[str] = []  # image series, in request order
    rt_by_study: dict[str, list[tuple[InstanceRow, _References]]] = {}

    def rt_objects(study_uid: str) -> list[tuple[InstanceRow, _References]]:
        if study_uid not in rt_by_study:
            rows = [r for r in store.study_instances(study_uid) if r.sop_class_uid in RT_OBJECTS]
            rt_by_study[study_uid] = [(r, _references(store, r)) for r in rows]
        return rt_by_study[study_uid]

    def consider(series_uid: str, level: str, uid: str, explicit: bool) -> None:
        rows = store.instances(series_uid)
        if not rows:
            refused.append(Refusal(level, uid, f"series {series_uid} is not stored on this box"))
            return
        classes = {r.sop_class_uid for r in rows}
        if classes <= RT_OBJECTS:
            if not explicit:
                return  # RT objects travel with the image series they reference
            refs = set().union(*(_references(store, r).series for r in rows))
            stored = [s for s in refs if store.instances(s)]
            if not stored:
                refused.append(Refusal(level, uid, (
                    f"its {', '.join(sorted(sop_class_label(c) for c in classes))} references no image series stored "
                    "here; RT objects are only exported together with their image series")))
            for s in stored:
                consider(s, level, uid, True)
            return
        problem = _series_problem(store, series_uid, classes)
        if problem:
            refused.append(Refusal(level, uid, problem if level == "series" else f"series {series_uid} {problem}"))
        elif series_uid not in wanted:
            wanted.append(series_uid)

    for study_uid in dict.fromkeys(studies):
        series_uids = store.series_in_study(study_uid)
        if not series_uids:
            refused.append(Refusal("study", study_uid, "is not stored on this box"))
            continue
        for s in series_uids:
            consider(s, "study", study_uid, False)
    for series_uid in dict.fromkeys(series):
        consider(series_uid, "series", series_uid, True)

    objects: list[InstanceRow] = []
    for series_uid in wanted:
        images = store.ordered_instances(series_uid)
        objects += images
        frame = _frame_of_reference(store, series_uid)
        for row, refs in rt_objects(images[0].study_uid):
            if (series_uid in refs.series or (not refs.series and frame in refs.frames)) and row not in objects:
                objects.append(row)
    return SendPlan(tuple(objects), tuple(wanted), tuple(refused))


def _series_problem(store: Store, series_uid: str, classes: set[str]) -> str | None:
    """Return why an image series cannot be sent, or None."""
    not_networked = sorted(c for c in classes if c not in _NETWORK_CLASSES)
    if not_networked:
        labels = ", ".join(sop_class_label(c) for c in not_networked)
        if set(not_networked) <= {SOPClass.XA_IMAGE, SOPClass.SC_IMAGE}:
            return (f"holds {labels} objects; XA and SC are not in Table 6 of the conformance statement, "
                    "so they are not sent over the network (they can be written to a USB drive)")
        return f"holds {labels} objects, which the client AE does not send (Tables 6 and 7)"
    if not classes <= _TABLE_6_IMAGES:
        return "mixes images with other objects; only image series and the RT objects referencing them are sent"
    row = store.series(series_uid)
    if row is None or not row.volume_ok:
        reason = (row.volume_reason if row is not None else None) or "no 3D verdict"
        return f"is not a 3D volume ({reason}); only 3D volumes can be exported"
    return None


def _frame_of_reference(store: Store, series_uid: str) -> str | None:
    row = store.series(series_uid)
    return row.frame_of_reference_uid if row is not None else None


@dataclass(frozen=True)
class _References:
    """The image series and frames of reference an RT object refers to."""

    series: frozenset[str]
    frames: frozenset[str]


def _references(store: Store, row: InstanceRow) -> _References:
    """Read what an RT object references (RT Referenced Series, Frame of Reference)."""
    try:
        ds = dcmread(store.data_dir / row.path, stop_before_pixels=True,
                     specific_tags=["ReferencedFrameOfReferenceSequence", "FrameOfReferenceUID"])
    except (OSError, InvalidDicomError, ValueError) as exc:
        log.warning("cannot read the references of stored RT object %s: %s", row.sop_instance_uid, exc)
        return _References(frozenset(), frozenset())
    series: set[str] = set()
    frames: set[str] = {str(ds.FrameOfReferenceUID)} if ds.get("FrameOfReferenceUID") else set()
    for fr in ds.get("ReferencedFrameOfReferenceSequence", []):
        if fr.get("FrameOfReferenceUID"):
            frames.add(str(fr.FrameOfReferenceUID))
        for st in fr.get("RTReferencedStudySequence", []):
            for se in st.get("RTReferencedSeriesSequence", []):
                if se.get("SeriesInstanceUID"):
                    series.add(str(se.SeriesInstanceUID))
    return _References(frozenset(series), frozenset(frames))


# -- sending -------------------------------------------------------------------------


class SendOutcome(enum.StrEnum):
    """What became of one object."""

    SENT = "sent"
    WARNING = "warning"
    FAILED = "failed"
    NOT_SENT = "not sent"


@dataclass(frozen=True, kw_only=True)
class ObjectResult(Item[SendOutcome]):
    """The result of sending one object: the peer's status and Error Comment (``reason``), or why not sent."""

    status: int | None = None

    def line(self) -> str:
        text = f"{self.column}  {self.sop_instance_uid}  {sop_class_label(self.sop_class_uid)}"
        if self.status is not None and self.outcome is not SendOutcome.SENT:
            text += f"  status 0x{self.status:04X}"
        if self.reason:
            text += f": {self.reason}"
        return text


@dataclass(frozen=True, kw_only=True)
class SendReport(Report[ObjectResult], outcomes=SendOutcome, failures=(SendOutcome.FAILED, SendOutcome.NOT_SENT)):
    """Everything one send did: per-object results, refusals and a network failure, if any."""

    peer: Destination
    calling_ae: str
    refused: tuple[Refusal, ...] = ()
    #: Set when the association failed part-way (what was not sent is NOT_SENT).
    network_error: str | None = None

    @property
    def ok(self) -> bool:
        """True when every object was stored (warnings included) and nothing was refused."""
        return not self.refused and self.network_error is None and super().ok

    def summary(self) -> str:
        n = len(self.items)
        text = (f"{self.count(SendOutcome.SENT) + self.count(SendOutcome.WARNING)} of {n} object(s) stored by "
                f"{_peer(self.peer)} (as {self.calling_ae}, one association): {self.count(SendOutcome.SENT)} "
                f"succeeded, {self.count(SendOutcome.WARNING)} with a warning, "
                f"{self.count(SendOutcome.FAILED)} failed, {self.count(SendOutcome.NOT_SENT)} not sent")
        if self.refused:
            text += f"; {len(self.refused)} request(s) refused"
        if self.network_error:
            text += (f"\nthe export stopped: {self.network_error}. Run the same command again to send the "
                     "rest (objects already stored are sent again; the peer keeps one copy)")
        return text

    def render(self) -> str:
        """The refusals, one line per object, then the summary (the order ``appliance send`` prints them)."""
        return "\n".join([*(f"refused   {r}" for r in self.refused), *(i.line() for i in self.items), self.summary()])


@contextmanager
def send_lock(data_dir: Path) -> Iterator[None]:
    """Hold the store's send lock: one association at a time, across threads and processes."""
    path = data_dir / _LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
    except OSError as exc:
        raise ApplianceError(f"cannot open the export lock {path}: {exc.strerror}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("another export is running; waiting for it to finish")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def send(
    store: Store,
    plan: SendPlan,
    peer: Destination,
    settings: ClientSettings | None = None,
    progress: Callable[[Progress], None] | None = None,
    extra: Sequence[Transcoded] = (),
) -> SendReport:
    """Send ``plan`` to ``peer`` over one association and report each object.

    ``extra`` are generated objects (not in the store, e.g. RT Dose and RT Plan) sent after
    the plan's objects over the same association, with their Table 6/7 contexts.
    Raises SendRefused when the plan holds nothing, NetworkError when no association can be
    opened (nothing was sent). A failure part-way is reported in the returned report."""
    settings = settings or ClientSettings()
    settings.check()
    check_peer(peer)
    if not plan.objects and not extra:
        reasons = "; ".join(str(r) for r in plan.refused) or "no study or series was given"
        raise SendRefused(f"nothing to send: {reasons}")
    results: list[ObjectResult] = []
    items: list[InstanceRow | Transcoded] = [*plan.objects, *extra]
    t0 = time.monotonic()

    def record(r: ObjectResult) -> None:
        results.append(r)
        if progress is not None:
            progress(Progress(len(results), len(items), seconds=time.monotonic() - t0, item=r))

    needed = {o.sop_class_uid for o in items}
    started_at = delivery_time()
    # While it is being sent, no deletion takes a study (see appliance.store.marks.busy).
    with send_lock(store.data_dir), store.busy(sorted({o.study_uid for o in plan.objects})):
        assoc = associate(peer, settings, proposed([r for r in SCU_STORAGE_CONTEXTS if r.abstract_syntax in needed]))
        error: str | None = None
        try:
            for item in items:
                if error is not None:
                    record(_result(item.sop_instance_uid, item.sop_class_uid, SendOutcome.NOT_SENT))
                    continue
                cx_id = assoc.context_for(item.sop_class_uid, TransferSyntax.IMPLICIT_LE)
                if cx_id is None:
                    record(_result(item.sop_instance_uid, item.sop_class_uid, SendOutcome.FAILED, None,
                                   f"{_peer(peer)} refused {sop_class_label(item.sop_class_uid)} in Implicit VR LE"))
                    continue
                result, answered = _send_one(assoc, cx_id, store, item)
                record(result)
                if not answered:
                    error = (f"the association with {_peer(peer)} ended after {len(results)} of "
                             f"{len(items)} object(s) (aborted by the peer, the network, or a timeout "
                             f"of {settings.timeout:g} s)")
        finally:
            assoc.release()
    report = SendReport(peer=peer, calling_ae=settings.calling_ae, items=tuple(results), refused=plan.refused,
                        network_error=error)
    _record_delivery(store, results, _peer(peer), started_at)
    _audit(store, report, peer, settings.calling_ae)
    log.info("export to %s: %s", _peer(peer), report.summary().splitlines()[0])
    return report


def _audit(store: Store, report: SendReport, peer: Destination, calling_ae: str) -> None:
    """The send in the audit trail: to whom, which studies, how many objects each, the outcome."""
    taken = [(r.study_uid, r.sop_instance_uid) for i in report.items
             if i.outcome in (SendOutcome.SENT, SendOutcome.WARNING) and (r := store.index.instance(i.sop_instance_uid))]
    failed = len(report.items) - len(taken)
    audit.record(store.data_dir, audit.Event(
        "transfer", "R",
        outcome=audit.SUCCESS if report.ok else audit.SERIOUS if not taken else audit.MINOR,
        outcome_text="" if report.ok else (report.network_error or f"{failed} object(s) not stored by the peer"),
        participants=(audit.Participant("source", ae=calling_ae, requestor=True),
                      audit.Participant("destination", ae=peer.ae_title, address=f"{peer.host}:{peer.port}")),
        studies=audit.studies_of(taken), detail=report.summary().splitlines()[0]))


def _record_delivery(store: Store, results: list[ObjectResult], to: str, started_at: str) -> None:
    """Record the studies every object of which the peer took (retention may delete them)."""
    taken = {r.sop_instance_uid for r in results if r.outcome in (SendOutcome.SENT, SendOutcome.WARNING)}
    done = store.record_delivery(taken, to, started_at)
    if done:
        log.debug("delivered to %s: %s", to, ", ".join(done))


def _send_one(assoc: Association, cx_id: int, store: Store, item: InstanceRow | Transcoded) -> tuple[ObjectResult, bool]:
    """Send one object (stored, or generated) in Implicit VR LE; return its result and
    whether the peer answered."""
    uid, cls = item.sop_instance_uid, item.sop_class_uid
    try:
        body = item.body if isinstance(item, Transcoded) else implicit_le_body(store.data_dir / item.path)
    except TranscodeError as exc:
        log.error("cannot export %s: %s", uid, exc)
        return _result(uid, cls, SendOutcome.FAILED, None, str(exc)), True
    try:
        rsp = assoc.store(cx_id, uid, body)
    except AssociationLost as exc:
        log.warning("%s: %s", uid, exc)
        return _result(uid, cls, SendOutcome.FAILED, None,
                       "no response: the association was aborted or timed out; it may not be stored"), False
    code, comment = rsp.status, rsp.comment
    category = code_to_category(code)
    if category == "Success":
        return _result(uid, cls, SendOutcome.SENT, code, comment), True
    if category == "Warning":
        log.warning("%s stored by the peer with warning 0x%04X %s", uid, code, comment)
        return _result(uid, cls, SendOutcome.WARNING, code, comment), True
    log.error("%s refused by the peer with status 0x%04X %s", uid, code, comment)
    return _result(uid, cls, SendOutcome.FAILED, code, comment), True


def implicit_le_body(path: Path) -> bytes | memoryview:
    """The data set of the stored object at ``path`` in Implicit VR LE: as stored when it is
    stored so (never decoded), else re-encoded by :func:`to_implicit_le`. Raises TranscodeError."""
    try:
        stored = stored_data_set(path)
    except (OSError, ValueError):
        stored = None  # to_implicit_le says what is wrong with it
    if stored is not None and stored.transfer_syntax == TransferSyntax.IMPLICIT_LE:
        return stored.body
    return to_implicit_le(path).body


def _result(uid: str, cls: str, outcome: SendOutcome, status: int | None = None, comment: str = "") -> ObjectResult:
    return ObjectResult(outcome=outcome, reason=comment, sop_instance_uid=uid, sop_class_uid=cls, status=status)
