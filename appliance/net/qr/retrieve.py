"""C-MOVE and C-GET SCP (PS3.4 C.4.2, C.4.3): the stored objects of the entities an
Identifier names by their unique keys, sent as C-STORE sub-operations.

* **C-MOVE** sends them to the Move Destination, which must be the AE title of a configured
  destination (``[destinations.NAME]``; any other gets 0xA801), over one association of the
  client AE (:mod:`appliance.net.requester`, with :mod:`appliance.net.sender`'s settings, as
  ELEKTA_CLIENT): each object proposed in its stored transfer syntax and in Implicit VR
  Little Endian, sent as stored (byte for byte, never decoded) if the destination accepts
  that, else converted to Implicit VR LE as the client AE does. The sub-operation C-STORE-RQs
  name the move's originator (AE title and Message ID).
* **C-GET** sends them back over the requester's own association, on the storage contexts
  for which the requester took the SCP role (SCP/SCU Role Selection): as stored (byte for
  byte, read through a memory map) when such a context has the stored transfer syntax, else
  in Implicit VR LE.

After each sub-operation a Pending response carries the remaining, completed, failed and
warning counts, and a C-CANCEL-RQ is looked for; the final response counts them (0x0000 all
completed, 0xB000 some failed or warned, 0xA702 none could be sent, 0xFE00 cancelled) and,
when some failed, lists their SOP Instance UIDs. While objects are sent their studies are
marked busy, so no deletion or retention takes them; a C-MOVE that delivered every object of
a study records it as delivered, as a send does.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import mmap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

from appliance import audit
from appliance.config import Destination
from appliance.conformance import (
    QR_MODELS,
    PresentationContextRow,
    SOPClass,
    Status,
    TransferSyntax,
)
from appliance.dicom import dicomio
from appliance.dicom.transcode import TranscodeError, to_implicit_le
from appliance.errors import ApplianceError, StoreError
from appliance.net.dimse import (
    DATA_SET_FOLLOWS,
    PRIORITY_MEDIUM,
    CommandField,
    Message,
    StorageContext,
    Tag,
    encode_command,
    text,
    uid,
    us,
)
from appliance.net.qr.exchange import cancelled, gather
from appliance.net.qr.model import QueryError, parse, uid_list
from appliance.net.requester import Association, associate, stored_data_set
from appliance.net.requester import AssociationLost as DestinationLost
from appliance.net.sender import ClientSettings, proposed
from appliance.net.ul import DataSetSink, ProtocolError
from appliance.store.index import InstanceRow
from appliance.store.marks import now as delivery_time
from appliance.store.store import Store

log = logging.getLogger(__name__)

_FAILED_SOP_INSTANCE_UID_LIST = 0x00080058
_UNIQUE_COLUMN = {"PATIENT": "patient_id", "STUDY": "study_uid", "SERIES": "series_uid", "IMAGE": "sop_instance_uid"}
_UNIQUE_NAME = {"PATIENT": "Patient ID", "STUDY": "Study Instance UID", "SERIES": "Series Instance UID",
                "IMAGE": "SOP Instance UID"}


class Outcome(enum.Enum):
    """What became of one sub-operation."""

    COMPLETED = "completed"
    WARNING = "warning"
    FAILED = "failed"


def outcome_of(status: int) -> Outcome:
    """The sub-operation outcome of a C-STORE-RSP status (PS3.4 B.2.3)."""
    if status == Status.SUCCESS:
        return Outcome.COMPLETED
    if (status & 0xF000) == 0xB000 or status in (0x0107, 0x0116):
        return Outcome.WARNING
    return Outcome.FAILED


@dataclass
class Tally:
    """The sub-operations of one C-MOVE or C-GET, counted."""

    total: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)
    cancelled: bool = False

    @property
    def remaining(self) -> int:
        return self.total - self.completed - self.failed - self.warning

    def add(self, sop_instance_uid: str, outcome: Outcome) -> None:
        if outcome is Outcome.COMPLETED:
            self.completed += 1
        elif outcome is Outcome.WARNING:
            self.warning += 1
        else:
            self.failed += 1
            self.failed_uids.append(sop_instance_uid)

    def elements(self, *, remaining: bool) -> list[tuple[int, bytes]]:
        """The counts as response command elements (Remaining only when ``remaining``)."""
        out: list[tuple[int, bytes]] = [(Tag.NUMBER_OF_REMAINING_SUBOPERATIONS, us(self.remaining))] if remaining else []
        return out + [(Tag.NUMBER_OF_COMPLETED_SUBOPERATIONS, us(min(self.completed, 0xFFFF))),
                      (Tag.NUMBER_OF_FAILED_SUBOPERATIONS, us(min(self.failed, 0xFFFF))),
                      (Tag.NUMBER_OF_WARNING_SUBOPERATIONS, us(min(self.warning, 0xFFFF)))]

    def words(self) -> str:
        return (f"{self.completed} of {self.total} completed, {self.warning} with a warning, {self.failed} failed"
                + (", cancelled" if self.cancelled else ""))


class AssociationLost(Exception):
    """The association the sub-operations go over has ended."""


#: send(row) -> the outcome of one sub-operation, and whether a C-CANCEL-RQ came meanwhile.
Send = Callable[[InstanceRow], tuple[Outcome, bool]]


class Retriever:
    """The C-MOVE and C-GET handlers of a Storage Server: objects from ``store``, moved to
    the ``destinations`` (by AE title) as the client AE (``client``)."""

    def __init__(self, store: Store, destinations: Mapping[str, Destination], client: ClientSettings) -> None:
        self.store = store
        self.destinations = destinations
        self.client = client

    def move(self, msg: Message) -> DataSetSink:
        """C-MOVE: gather the Identifier, then send (see the module)."""
        return gather(msg, self._move)

    def get(self, msg: Message) -> DataSetSink:
        """C-GET: gather the Identifier, then send back (see the module)."""
        return gather(msg, self._get)

    # -- C-MOVE ---------------------------------------------------------------------------

    def _move(self, msg: Message, data: bytes) -> None:
        field_ = CommandField.C_MOVE_RSP
        destination = text(msg.request.elements.get(Tag.MOVE_DESTINATION)).strip()
        named = [(n, d) for n, d in self.destinations.items() if d.ae_title == destination]
        if not named:
            why = f"move destination '{destination}' is not a configured destination"
            log.warning("C-MOVE from %s refused (0xA801): %s", msg.calling_ae, why)
            audit.record(self.store.data_dir, audit.Event(
                "security", "E", outcome=audit.MINOR, outcome_text=f"C-MOVE refused (0xA801): {why}",
                participants=(audit.Participant("source", ae=msg.calling_ae, requestor=True),)))
            msg.respond(field_, Status.MOVE_DESTINATION_UNKNOWN, error_comment=why)
            return
        name, peer = named[0]
        selected = self._matches(msg, data, field_)
        if selected is None:
            return
        rows, tally = selected
        t0 = time.monotonic()
        started_at = delivery_time()
        with contextlib.ExitStack() as stack:
            if not self._hold(stack, msg, field_, rows):
                return
            try:
                assoc = associate(peer, self.client, proposed(_contexts(rows)))
            except ApplianceError as exc:
                tally.failed, tally.failed_uids = len(rows), [r.sop_instance_uid for r in rows]
                log.error("C-MOVE from %s to %s: no association: %s", msg.calling_ae, name, exc)
                self._audit(msg, "C-MOVE", rows, tally, peer, str(exc))
                self._final(msg, field_, tally, f"no association with {destination}: {exc}",
                            status=Status.OUT_OF_RESOURCES_SUBOPERATIONS)
                return
            try:
                comment = self._run(msg, field_, rows, tally, self._mover(msg, assoc))
            finally:
                assoc.release()
        taken = {r.sop_instance_uid for r in rows} - set(tally.failed_uids)
        self.store.record_delivery(taken, f"{name} (C-MOVE)", started_at)
        log.info("C-MOVE from %s to %s (%s@%s:%d): %s in %.1f s", msg.calling_ae, name, peer.ae_title, peer.host,
                 peer.port, tally.words(), time.monotonic() - t0)
        self._audit(msg, "C-MOVE", rows, tally, peer, comment)
        self._final(msg, field_, tally, comment)

    def _mover(self, msg: Message, assoc: Association) -> Send:
        def send(row: InstanceRow) -> tuple[Outcome, bool]:
            cls = row.sop_class_uid
            path = self.store.data_dir / row.path
            try:
                stored = stored_data_set(path)  # sent as stored: never decoded
                body: bytes | memoryview = stored.body
                cx_id = assoc.context_for(cls, stored.transfer_syntax)
                if cx_id is None:
                    cx_id = assoc.context_for(cls, TransferSyntax.IMPLICIT_LE)
                    if cx_id is None:
                        log.warning("C-MOVE: the destination accepts no context for %s %s", cls, row.sop_instance_uid)
                        return Outcome.FAILED, False
                    body = to_implicit_le(path).body
            except (OSError, ValueError, TranscodeError) as exc:
                log.error("C-MOVE: cannot read stored object %s: %s", row.sop_instance_uid, exc)
                return Outcome.FAILED, False
            try:
                rsp = assoc.store(cx_id, row.sop_instance_uid, body,
                                  move_originator=(msg.calling_ae, msg.request.message_id))
            except DestinationLost as exc:
                log.warning("C-MOVE: %s", exc)
                raise AssociationLost("the move destination did not answer a C-STORE (aborted, or a timeout)") \
                    from None
            return outcome_of(rsp.status), False

        return send

    # -- C-GET ----------------------------------------------------------------------------

    def _get(self, msg: Message, data: bytes) -> None:
        field_ = CommandField.C_GET_RSP
        selected = self._matches(msg, data, field_)
        if selected is None:
            return
        rows, tally = selected
        t0 = time.monotonic()
        with contextlib.ExitStack() as stack:
            if not self._hold(stack, msg, field_, rows):
                return
            comment = self._run(msg, field_, rows, tally, self._getter(msg))
        log.info("C-GET from %s: %s in %.1f s", msg.calling_ae, tally.words(), time.monotonic() - t0)
        self._audit(msg, "C-GET", rows, tally, None, comment)
        self._final(msg, field_, tally, comment)

    def _getter(self, msg: Message) -> Send:
        link = msg.link
        assert link is not None
        by_class: dict[str, list[StorageContext]] = {}
        for cx in link.storage:
            by_class.setdefault(cx.abstract_syntax, []).append(cx)

        def send(row: InstanceRow) -> tuple[Outcome, bool]:
            contexts = by_class.get(row.sop_class_uid, [])
            cx = next((c for c in contexts if c.transfer_syntax == row.transfer_syntax), None) or next(
                (c for c in contexts if c.transfer_syntax == TransferSyntax.IMPLICIT_LE), None)
            if cx is None:
                log.warning("C-GET from %s: no storage context with the SCP role for %s (%s)", msg.calling_ae,
                            row.sop_class_uid, row.sop_instance_uid)
                return Outcome.FAILED, False
            message_id = link.message_id()
            command = encode_command([
                (Tag.AFFECTED_SOP_CLASS_UID, uid(row.sop_class_uid)),
                (Tag.COMMAND_FIELD, us(CommandField.C_STORE_RQ)),
                (Tag.MESSAGE_ID, us(message_id)),
                (Tag.PRIORITY, us(PRIORITY_MEDIUM)),
                (Tag.COMMAND_DATA_SET_TYPE, us(DATA_SET_FOLLOWS)),
                (Tag.AFFECTED_SOP_INSTANCE_UID, uid(row.sop_instance_uid)),
            ])
            path = self.store.data_dir / row.path
            with contextlib.ExitStack() as stack:
                try:
                    body = stack.enter_context(_stored_body(path)) if cx.transfer_syntax == row.transfer_syntax \
                        else to_implicit_le(path).body
                except (OSError, ValueError, TranscodeError) as exc:
                    log.error("C-GET: cannot read stored object %s: %s", row.sop_instance_uid, exc)
                    return Outcome.FAILED, False
                link.send(cx.cx_id, command, body)
            cancel = False
            while True:  # the C-STORE-RSP; a C-CANCEL-RQ may come first
                incoming = link.receive()
                if incoming.command_field == CommandField.C_CANCEL_RQ:
                    cancel = cancel or incoming.us(Tag.MESSAGE_ID_BEING_RESPONDED_TO) == msg.request.message_id
                    continue
                if (incoming.command_field != CommandField.C_STORE_RSP
                        or incoming.us(Tag.MESSAGE_ID_BEING_RESPONDED_TO) != message_id):
                    raise ProtocolError(f"DIMSE command 0x{incoming.command_field:04X} where the C-STORE-RSP "
                                        f"to message {message_id} was due")
                return outcome_of(incoming.us(Tag.STATUS)), cancel

        return send

    # -- shared -----------------------------------------------------------------------------

    def _matches(self, msg: Message, data: bytes, field_: CommandField) -> tuple[list[InstanceRow], Tally] | None:
        """The instances to send with their tally; None once the request is answered (it was
        refused, or nothing matched: then the final response says so)."""
        rows = self._select(msg, data, field_)
        if rows is None:
            return None
        tally = Tally(len(rows))
        if not rows:
            msg.respond(field_, Status.SUCCESS, extra=tally.elements(remaining=False))
            return None
        return rows, tally

    def _select(self, msg: Message, data: bytes, field_: CommandField) -> list[InstanceRow] | None:
        """The stored instances the Identifier names by unique keys; None if it was refused (answered)."""
        what = "C-MOVE" if field_ == CommandField.C_MOVE_RSP else "C-GET"
        try:
            query = parse(data, msg.transfer_syntax, QR_MODELS[SOPClass(msg.abstract_syntax)])
            matches = query.unique_matches()
            if not any(m.column == _UNIQUE_COLUMN[query.level] for m in matches):
                raise QueryError(Status.IDENTIFIER_DOES_NOT_MATCH,
                                 f"a {what} at the {query.level} level needs the {_UNIQUE_NAME[query.level]}")
            return self.store.index.find_instances(query.index_level, matches)
        except QueryError as exc:
            log.warning("%s from %s refused (0x%04X): %s", what, msg.calling_ae, exc.status, exc.comment)
            msg.respond(field_, exc.status, error_comment=exc.comment)
        except StoreError as exc:
            log.error("%s from %s failed: %s", what, msg.calling_ae, exc)
            msg.respond(field_, Status.UNABLE_TO_PROCESS, error_comment=str(exc))
        return None

    def _hold(self, stack: contextlib.ExitStack[bool | None], msg: Message, field_: CommandField,
              rows: list[InstanceRow]) -> bool:
        """Mark the studies of ``rows`` busy for the rest of ``stack``; answer and return
        False if they cannot be."""
        try:
            stack.enter_context(self.store.busy(sorted({r.study_uid for r in rows})))
        except StoreError as exc:
            log.error("%s from %s failed: %s", "C-MOVE" if field_ == CommandField.C_MOVE_RSP else "C-GET",
                      msg.calling_ae, exc)
            msg.respond(field_, Status.UNABLE_TO_PROCESS, error_comment=str(exc))
            return False
        return True

    def _run(self, msg: Message, field_: CommandField, rows: list[InstanceRow], tally: Tally, send: Send) -> str | None:
        """Run the sub-operations, a Pending response after each; return why they stopped
        early (the association went away), or None."""
        for row in rows:
            try:
                outcome, cancel = send(row)
            except AssociationLost as exc:
                for r in rows[tally.total - tally.remaining:]:
                    tally.add(r.sop_instance_uid, Outcome.FAILED)
                return str(exc)
            tally.add(row.sop_instance_uid, outcome)
            if cancel or cancelled(msg):
                tally.cancelled = True
                return None
            if tally.remaining:
                msg.respond(field_, Status.PENDING, extra=tally.elements(remaining=True))
        return None

    def _audit(self, msg: Message, what: str, rows: list[InstanceRow], tally: Tally, peer: Destination | None,
               comment: str | None) -> None:
        """A retrieval in the audit trail: who asked, where the objects went, which studies."""
        failed = set(tally.failed_uids)
        sent = [(r.study_uid, r.sop_instance_uid) for r in rows if r.sop_instance_uid not in failed][
            :tally.completed + tally.warning]
        participants = [audit.Participant("destination" if peer is None else "requestor", ae=msg.calling_ae,
                                          requestor=True)]
        if peer is not None:
            participants.append(audit.Participant("destination", ae=peer.ae_title, address=f"{peer.host}:{peer.port}"))
        bad = tally.failed or tally.cancelled or comment
        audit.record(self.store.data_dir, audit.Event(
            "transfer", "R", outcome=audit.SUCCESS if not bad else audit.MINOR if sent else audit.SERIOUS,
            outcome_text="" if not bad else f"{tally.words()}" + (f": {comment}" if comment else ""),
            participants=tuple(participants), studies=audit.studies_of(sent), detail=f"{what}: {tally.words()}"))

    def _final(self, msg: Message, field_: CommandField, tally: Tally, comment: str | None, *,
               status: Status | None = None) -> None:
        if status is None:
            if tally.cancelled:
                status = Status.CANCEL
            elif tally.failed and not tally.completed and not tally.warning:
                status = Status.OUT_OF_RESOURCES_SUBOPERATIONS
            elif tally.failed or tally.warning:
                status = Status.SUBOPERATIONS_FAILED
            else:
                status = Status.SUCCESS
        data = uid_list(_FAILED_SOP_INSTANCE_UID_LIST, tally.failed_uids).encode(msg.transfer_syntax) \
            if tally.failed_uids else None
        msg.respond(field_, status, error_comment=comment, data_set=data,
                    extra=tally.elements(remaining=tally.cancelled))


@contextlib.contextmanager
def _stored_body(path: Path) -> Iterator[memoryview]:
    """The data set of the stored Part 10 file at ``path``, as stored, through a memory map
    (so a large object is sent without being read into memory)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:
            offset, _ = dicomio.split_part10(view)
            body = view[offset:]
            try:
                yield body
            finally:
                body.release()
        finally:
            view.release()


def _contexts(rows: list[InstanceRow]) -> list[PresentationContextRow]:
    """The contexts a move proposes: each SOP class in each stored syntax, and in Implicit VR LE."""
    pairs: dict[tuple[str, str], None] = {}
    for r in rows:
        for ts in (r.transfer_syntax, str(TransferSyntax.IMPLICIT_LE)):
            pairs[(r.sop_class_uid, ts)] = None
    out = []
    for cls, ts in pairs:
        try:
            out.append(PresentationContextRow(SOPClass(cls), (TransferSyntax(ts),), "SCU"))
        except ValueError:  # a class or syntax the statement does not name: its objects fail
            log.warning("C-MOVE: %s in %s cannot be proposed", cls, ts)
    return out
