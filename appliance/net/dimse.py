"""DIMSE (PS3.7): command sets by name (:class:`Tag`, :class:`CommandField`), their
encoding (Implicit VR Little Endian, group 0000), and the services of the Storage SCP as a
table, :data:`SERVICES`: command field -> :class:`Service` (its name, the abstract syntaxes
it may arrive on, its handler). The acceptor decodes each request, looks its command field
up in its table (A-ABORT for one not in it), checks the presentation context against the
row and calls the handler with a :class:`Message`.

A handler answers through :meth:`Message.respond` and returns ``None`` when the message is
complete (C-ECHO answers at once), or a :class:`~appliance.net.ul.DataSetSink` when a data
set follows: its fragments are written as they arrive and ``complete`` answers (C-STORE
streams into :meth:`Ingest.open_stream` and responds from ``finish``).

**Query/Retrieve** (:mod:`appliance.net.qr`, beyond the statement) is rows of the same
kind: C-FIND, C-MOVE, C-GET and C-CANCEL, in a table of their own that the Storage Server
joins to :data:`SERVICES` when ``[qr] enabled`` (so that switching Q/R off removes the rows
as well as the contexts). Their handlers are bound to the store and the destinations they
answer from, as pynetdicom binds handlers per event; and since they answer more than once
(Pending responses with data sets) and, for C-GET, send C-STORE requests of their own and
read the responses, a handler talks to the peer through :attr:`Message.link`, a
:class:`Link`: whole messages out, fragmented to the peer's maximum PDU length, and the
peer's next command in (a C-CANCEL-RQ between two Pending responses, a C-STORE-RSP).

A command set is a few hundred bytes and arrives once per message, so decoding it into a
dict and a :class:`Request` costs nothing next to the data set behind it.
"""

from __future__ import annotations

import collections
import enum
import socket
import struct
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Protocol

from appliance.conformance import QR_MODELS, SCP_STORAGE_CLASSES, SOPClass, Status
from appliance.net.ul import (
    A_ABORT_PDU,
    A_RELEASE_RQ_PDU,
    P_DATA_TF_PDU,
    PDU_HEADER_BYTES,
    PDV_COMMAND,
    PDV_HEADER_BYTES,
    PDV_LAST,
    DataSetSink,
    PduReader,
    ProtocolError,
    clock,
    p_data_tf_pdu,
)


class Tag(enum.IntEnum):
    """Command elements (PS3.7 E.1-1 and E.2-1), group 0000."""

    COMMAND_GROUP_LENGTH = 0x00000000
    AFFECTED_SOP_CLASS_UID = 0x00000002
    REQUESTED_SOP_CLASS_UID = 0x00000003
    COMMAND_FIELD = 0x00000100
    MESSAGE_ID = 0x00000110
    MESSAGE_ID_BEING_RESPONDED_TO = 0x00000120
    MOVE_DESTINATION = 0x00000600
    PRIORITY = 0x00000700
    COMMAND_DATA_SET_TYPE = 0x00000800
    STATUS = 0x00000900
    OFFENDING_ELEMENT = 0x00000901
    ERROR_COMMENT = 0x00000902
    ERROR_ID = 0x00000903
    AFFECTED_SOP_INSTANCE_UID = 0x00001000
    REQUESTED_SOP_INSTANCE_UID = 0x00001001
    EVENT_TYPE_ID = 0x00001002
    ATTRIBUTE_IDENTIFIER_LIST = 0x00001005
    ACTION_TYPE_ID = 0x00001008
    NUMBER_OF_REMAINING_SUBOPERATIONS = 0x00001020
    NUMBER_OF_COMPLETED_SUBOPERATIONS = 0x00001021
    NUMBER_OF_FAILED_SUBOPERATIONS = 0x00001022
    NUMBER_OF_WARNING_SUBOPERATIONS = 0x00001023
    MOVE_ORIGINATOR_APPLICATION_ENTITY_TITLE = 0x00001030
    MOVE_ORIGINATOR_MESSAGE_ID = 0x00001031


class CommandField(enum.IntEnum):
    """Command Field (0000,0100) values (PS3.7 E.1-1 and E.2-1)."""

    C_STORE_RQ = 0x0001
    C_STORE_RSP = 0x8001
    C_GET_RQ = 0x0010
    C_GET_RSP = 0x8010
    C_FIND_RQ = 0x0020
    C_FIND_RSP = 0x8020
    C_MOVE_RQ = 0x0021
    C_MOVE_RSP = 0x8021
    C_ECHO_RQ = 0x0030
    C_ECHO_RSP = 0x8030
    N_EVENT_REPORT_RQ = 0x0100
    N_EVENT_REPORT_RSP = 0x8100
    N_GET_RQ = 0x0110
    N_GET_RSP = 0x8110
    N_SET_RQ = 0x0120
    N_SET_RSP = 0x8120
    N_ACTION_RQ = 0x0130
    N_ACTION_RSP = 0x8130
    N_CREATE_RQ = 0x0140
    N_CREATE_RSP = 0x8140
    N_DELETE_RQ = 0x0150
    N_DELETE_RSP = 0x8150
    C_CANCEL_RQ = 0x0FFF


#: Command Data Set Type (0000,0800) of a message without a data set; any other value
#: means one follows (PS3.7 E.1-1).
NO_DATA_SET = 0x0101
#: The Command Data Set Type we send when a data set follows.
DATA_SET_FOLLOWS = 0x0000
#: Priority (0000,0700) of the requests we send: MEDIUM.
PRIORITY_MEDIUM = 0x0000
#: The longest Error Comment (0000,0902) we send: its VR is LO.
ERROR_COMMENT_MAX = 64


def _element(tag: int, value: bytes) -> bytes:
    if len(value) & 1:
        value += b"\x00"
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value


def uid(value: str) -> bytes:
    """A UI value: the UID's ASCII bytes (padded to even length by :func:`encode_command`)."""
    return value.encode("ascii")


def us(value: int) -> bytes:
    """A US value."""
    return struct.pack("<H", value)


def comment(text: str) -> bytes:
    """An Error Comment: ``text`` on one line, cut to :data:`ERROR_COMMENT_MAX` characters."""
    text = " ".join(text.split())
    if len(text) > ERROR_COMMENT_MAX:
        text = text[: ERROR_COMMENT_MAX - 3] + "..."
    return text.encode("ascii", "replace")


def encode_command(elements: Iterable[tuple[int, bytes]]) -> bytes:
    """Encode a command set: (tag, value) pairs in ascending order, with its group length."""
    body = b"".join(_element(tag, value) for tag, value in elements)
    return _element(Tag.COMMAND_GROUP_LENGTH, struct.pack("<L", len(body))) + body


def decode_command(data: bytes) -> dict[int, bytes]:
    """Decode a command set into {tag: raw value}; raise ProtocolError if malformed."""
    out: dict[int, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        if pos + 8 > end:
            raise ProtocolError("truncated DIMSE command set")
        group, elem, length = struct.unpack_from("<HHL", data, pos)
        pos += 8
        if group != 0 or pos + length > end:
            raise ProtocolError("malformed DIMSE command set")
        out[group << 16 | elem] = data[pos : pos + length]
        pos += length
    return out


def encode_response(field: CommandField, sop_class_uid: str, message_id: int, status: int, *,
                    error_comment: str | None = None, sop_instance_uid: bytes | None = None,
                    data_set: bool = False, extra: Iterable[tuple[int, bytes]] = ()) -> bytes:
    """A response command set: ``error_comment``, the Affected SOP Instance UID (raw bytes,
    the request's own) and the ``extra`` elements (e.g. the sub-operation counts) are sent
    only when given; ``data_set`` says whether a data set follows."""
    elements = [
        (Tag.AFFECTED_SOP_CLASS_UID, uid(sop_class_uid)),
        (Tag.COMMAND_FIELD, us(field)),
        (Tag.MESSAGE_ID_BEING_RESPONDED_TO, us(message_id)),
        (Tag.COMMAND_DATA_SET_TYPE, us(DATA_SET_FOLLOWS if data_set else NO_DATA_SET)),
        (Tag.STATUS, us(status)),
        *extra,
    ]
    if error_comment is not None:
        elements.append((Tag.ERROR_COMMENT, comment(error_comment)))
    if sop_instance_uid is not None:
        elements.append((Tag.AFFECTED_SOP_INSTANCE_UID, sop_instance_uid))
    return encode_command(sorted(elements))  # by tag: the tags are distinct, values never compared


def required_us(elements: Mapping[int, bytes], tag: Tag) -> int:
    """The US value of ``tag``; raise ProtocolError if it is missing or not 2 bytes."""
    value = elements.get(tag)
    if value is None or len(value) != 2:
        raise ProtocolError("a required DIMSE command element is missing")
    return int(struct.unpack("<H", value)[0])


def text(value: bytes | None) -> str:
    """A UI/LO/AE value as text: padding stripped, bytes that are not ASCII replaced."""
    return (value or b"").rstrip(b"\x00 ").decode("ascii", "replace")


@dataclass(frozen=True)
class Request:
    """A DIMSE request's command set: the fields every service reads, and all elements raw."""

    command_field: int
    message_id: int
    elements: Mapping[int, bytes]

    @classmethod
    def decode(cls, data: bytes) -> Request:
        """Decode a request's command set; raise ProtocolError if it is malformed or lacks
        its Command Field or Message ID (a C-CANCEL-RQ has none: its Message ID is the one
        it cancels, the Message ID Being Responded To)."""
        elements = decode_command(data)
        field = required_us(elements, Tag.COMMAND_FIELD)
        if field == CommandField.C_CANCEL_RQ:
            return cls(field, required_us(elements, Tag.MESSAGE_ID_BEING_RESPONDED_TO), elements)
        return cls(field, required_us(elements, Tag.MESSAGE_ID), elements)

    @property
    def has_data_set(self) -> bool:
        """Whether a data set follows; ProtocolError if Command Data Set Type is missing."""
        return required_us(self.elements, Tag.COMMAND_DATA_SET_TYPE) != NO_DATA_SET

    @property
    def affected_sop_class_uid(self) -> str:
        return text(self.elements.get(Tag.AFFECTED_SOP_CLASS_UID))

    @property
    def affected_sop_class_uid_raw(self) -> bytes:
        return (self.elements.get(Tag.AFFECTED_SOP_CLASS_UID) or b"").rstrip(b"\x00")

    @property
    def affected_sop_instance_uid(self) -> str:
        return text(self.elements.get(Tag.AFFECTED_SOP_INSTANCE_UID))

    @property
    def affected_sop_instance_uid_raw(self) -> bytes:
        """The peer's own bytes, whatever they hold (trailing NULs dropped): a response
        must name what the peer sent."""
        return (self.elements.get(Tag.AFFECTED_SOP_INSTANCE_UID) or b"").rstrip(b"\x00")


@dataclass(frozen=True)
class Incoming:
    """A command that arrived while a handler was running: a C-CANCEL-RQ, or the response
    to a request the handler sent (C-STORE-RSP)."""

    cx_id: int
    command_field: int
    elements: Mapping[int, bytes]

    def us(self, tag: Tag) -> int:
        """The US value of ``tag``; ProtocolError if it is missing."""
        return required_us(self.elements, tag)


@dataclass(frozen=True)
class StorageContext:
    """An accepted storage context on which we may send C-STORE requests (the requestor
    took the SCP role for it in SCP/SCU Role Selection, for C-GET)."""

    cx_id: int
    abstract_syntax: str
    transfer_syntax: str


class Link:
    """One association, as a handler that answers more than once or sends requests of its
    own uses it (Query/Retrieve). It runs in the association's thread while the acceptor's
    read loop waits for the handler, so what it reads is consumed here: only commands
    without a data set may arrive (C-CANCEL-RQ, responses); a new request, a data set, an
    A-RELEASE-RQ raise ProtocolError, an A-ABORT ConnectionError. Reading keeps the
    association's limits: ``network_timeout`` of silence from when waiting starts, the PDU
    and command-set sizes."""

    def __init__(self, conn: socket.socket, reader: PduReader, *, contexts: Iterable[int], peer_max_pdu: int,
                 max_pdu: int, max_command_bytes: int, storage: Iterable[StorageContext] = ()) -> None:
        self.conn = conn
        self.reader = reader
        self.contexts = frozenset(contexts)
        self.peer_max_pdu = peer_max_pdu
        self.max_pdu = max_pdu
        self.max_command_bytes = max_command_bytes
        #: The contexts on which we may send C-STORE requests (C-GET).
        self.storage = tuple(storage)
        #: The largest PDV value we send: the peer's maximum PDU length minus a PDV
        #: header; a peer without a limit (0) gets fragments of a bounded size all the same.
        self.fragment = (peer_max_pdu if 0 < peer_max_pdu < _MAX_FRAGMENT else _MAX_FRAGMENT) - PDV_HEADER_BYTES
        self._next_id = 0
        self._command = bytearray()
        #: Commands read whole but not yet returned (two in one PDU).
        self._read: collections.deque[Incoming] = collections.deque()

    def message_id(self) -> int:
        """A Message ID for a request of ours (1 to 65535, then again from 1)."""
        self._next_id = self._next_id % 0xFFFF + 1
        return self._next_id

    def send(self, cx_id: int, command: bytes, data_set: bytes | memoryview | None = None) -> None:
        """Send a message: the command set in one PDV, then the data set, if any, in
        fragments that fit the peer's maximum PDU length."""
        self.conn.sendall(p_data_tf_pdu(cx_id, PDV_COMMAND | PDV_LAST, command))
        if data_set is None:
            return
        view = memoryview(data_set)
        n = len(view)
        pos = 0
        while True:
            chunk = view[pos : pos + self.fragment]
            pos += len(chunk)
            self.conn.sendall(p_data_tf_pdu(cx_id, PDV_LAST if pos >= n else 0, bytes(chunk)))
            if pos >= n:
                return

    def poll(self) -> Incoming | None:
        """The peer's next command if one has started to arrive (read whole), else None at once."""
        if self._read:
            return self._read.popleft()
        try:
            if not self.conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                raise ConnectionError("the peer closed the connection")
        except (BlockingIOError, InterruptedError):
            return None
        return self.receive()

    def receive(self) -> Incoming:
        """Wait for the peer's next command and return it."""
        self.reader.last_byte = clock()  # silence counts from when we start to wait
        header = bytearray(PDU_HEADER_BYTES)
        while not self._read:
            idle = clock() + self.reader.idle_timeout
            self.reader.pdu(memoryview(header), PDU_HEADER_BYTES, idle, first=True)
            pdu_type = header[0]
            (length,) = struct.unpack_from(">L", header, 2)
            if pdu_type == A_ABORT_PDU:
                raise ConnectionError("the peer aborted the association")
            if pdu_type == A_RELEASE_RQ_PDU:
                raise ProtocolError("A-RELEASE-RQ while a request was being answered")
            if pdu_type != P_DATA_TF_PDU:
                raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X}")
            if length > self.max_pdu + PDU_HEADER_BYTES or length < PDV_HEADER_BYTES:
                raise ProtocolError(f"P-DATA-TF of {length} bytes (our maximum is {self.max_pdu})")
            body = bytearray(length)
            self.reader.pdu(memoryview(body), length, idle)
            self._pdvs(body)
        return self._read.popleft()

    def _pdvs(self, body: bytearray) -> None:
        """Take the PDV items of a P-DATA-TF: command fragments only."""
        pos, length = 0, len(body)
        while pos < length:
            if pos + PDV_HEADER_BYTES > length:
                raise ProtocolError("truncated PDV item")
            (item_len,) = struct.unpack_from(">L", body, pos)
            if item_len < 2 or pos + 4 + item_len > length:
                raise ProtocolError("PDV item length exceeds its PDU")
            cx_id, control = body[pos + 4], body[pos + 5]
            data = body[pos + PDV_HEADER_BYTES : pos + 4 + item_len]
            pos += 4 + item_len
            if cx_id not in self.contexts:
                raise ProtocolError(f"PDV on presentation context {cx_id}, which was not accepted")
            if not control & PDV_COMMAND:
                raise ProtocolError("a new request arrived while one was being answered "
                                    "(asynchronous operations were not negotiated)")
            if len(self._command) + len(data) > self.max_command_bytes:
                raise ProtocolError(f"a DIMSE command set of more than {self.max_command_bytes} bytes "
                                    "(a real one is a few hundred)")
            self._command += data
            if control & PDV_LAST:
                elements = decode_command(bytes(self._command))
                self._command.clear()
                if required_us(elements, Tag.COMMAND_DATA_SET_TYPE) != NO_DATA_SET:
                    raise ProtocolError("a new request arrived while one was being answered "
                                        "(asynchronous operations were not negotiated)")
                self._read.append(Incoming(cx_id, required_us(elements, Tag.COMMAND_FIELD), elements))


#: The largest PDU we send to a peer that sets no limit.
_MAX_FRAGMENT = 1 << 20


# -- the services ------------------------------------------------------------------------


class StoreStream(Protocol):
    """Where a C-STORE data set goes while it arrives (see :meth:`Ingest.open_stream`)."""

    def write(self, data: memoryview) -> None: ...

    def finish(self) -> StoreResult: ...

    def settle(self) -> None: ...

    def discard(self) -> None: ...


class StoreResult(Protocol):
    """What :meth:`StoreStream.finish` answers (an :class:`appliance.store.ingest.Outcome`)."""

    @property
    def status(self) -> Status: ...

    @property
    def comment(self) -> str: ...

    @property
    def series_uid(self) -> str | None: ...

    @property
    def ok(self) -> bool: ...


#: open_stream(transfer_syntax, sop_class_uid, sop_instance_uid, calling_ae) -> StoreStream
OpenStream = Callable[[str, str, str, str], StoreStream]


@dataclass(frozen=True)
class Message:
    """One DIMSE request as its service's handler sees it, and the way to answer it."""

    request: Request
    conn: socket.socket
    cx_id: int
    abstract_syntax: str
    transfer_syntax: str
    calling_ae: str
    #: The store's door (C-STORE).
    open_stream: OpenStream
    #: The acceptor's bookkeeping of a finished C-STORE (the series it touched, its state).
    stored: Callable[[StoreResult], None]
    #: The association, for handlers that answer more than once or send requests (Q/R).
    link: Link | None = field(default=None, compare=False)

    def respond(self, field: CommandField, status: int, *, error_comment: str | None = None,
                sop_instance_uid: bytes | None = None, data_set: bytes | None = None,
                extra: Iterable[tuple[int, bytes]] = ()) -> None:
        """Send a response on the request's presentation context, with ``data_set`` (encoded
        in the context's transfer syntax) if given."""
        command = encode_response(field, self.abstract_syntax, self.request.message_id, status,
                                  error_comment=error_comment, sop_instance_uid=sop_instance_uid,
                                  data_set=data_set is not None, extra=extra)
        if data_set is not None and self.link is not None:
            self.link.send(self.cx_id, command, data_set)
            return
        # A command set is a few hundred bytes: one PDV fits any negotiated PDU size.
        self.conn.sendall(p_data_tf_pdu(self.cx_id, PDV_COMMAND | PDV_LAST, command))
        if data_set is not None:  # no link (a test's Message): one PDV, whatever the PDU size
            self.conn.sendall(p_data_tf_pdu(self.cx_id, PDV_LAST, data_set))


#: A service's handler: answer now (None) or say where the data set goes.
Handler = Callable[[Message], "DataSetSink | None"]


@dataclass(frozen=True)
class Service:
    """A row of :data:`SERVICES`: a DIMSE service the acceptor provides."""

    name: str
    #: The abstract syntaxes (SOP classes) of the presentation contexts it may arrive on.
    contexts: frozenset[str]
    handler: Handler

    def check_context(self, abstract_syntax: str) -> None:
        """Raise ProtocolError if this service may not arrive on ``abstract_syntax``."""
        if abstract_syntax not in self.contexts:
            raise ProtocolError(f"{self.name} on {_context_words(abstract_syntax)}")


def _context_words(abstract_syntax: str) -> str:
    if abstract_syntax == SOPClass.VERIFICATION:
        return "the verification context"
    if abstract_syntax in SCP_STORAGE_CLASSES:
        return "a storage context"
    if abstract_syntax in QR_MODELS:
        return f"a {SOPClass(abstract_syntax).label} context"
    return f"the context of {abstract_syntax}"


def echo(msg: Message) -> None:
    """C-ECHO (PS3.7 9.1.5): Success, at once."""
    msg.respond(CommandField.C_ECHO_RSP, Status.SUCCESS)


def store(msg: Message) -> DataSetSink:
    """C-STORE (PS3.7 9.1.1): stream the data set into the store; once it is whole, store
    it (or refuse it) and answer with the store's status, naming the peer's own UID bytes."""
    request = msg.request
    if not request.has_data_set:
        raise ProtocolError("C-STORE request without a data set")
    incoming = msg.open_stream(msg.transfer_syntax, msg.abstract_syntax,
                               request.affected_sop_instance_uid, msg.calling_ae)

    def complete() -> None:
        result = incoming.finish()  # durable (or refused) when it returns
        try:
            msg.stored(result)
            msg.respond(CommandField.C_STORE_RSP, int(result.status),
                        error_comment=None if result.ok else result.comment,
                        sop_instance_uid=request.affected_sop_instance_uid_raw)
        finally:
            incoming.settle()  # the index row, off the sender's path (see IncomingObject.settle)

    return DataSetSink(incoming.write, complete, incoming.discard)


#: The services of the Storage SCP, by the command field of their request (CommandField
#: keys; looked up with the request's plain int).
SERVICES: Mapping[int, Service] = {
    CommandField.C_ECHO_RQ: Service("C-ECHO", frozenset({SOPClass.VERIFICATION}), echo),
    CommandField.C_STORE_RQ: Service("C-STORE", SCP_STORAGE_CLASSES, store),
}


def service_for(request: Request, services: Mapping[int, Service] = SERVICES) -> Service:
    """The row of ``services`` serving ``request``; ProtocolError (the association is
    aborted) if none does."""
    service = services.get(request.command_field)
    if service is None:
        raise ProtocolError(f"unsupported DIMSE command 0x{request.command_field:04X}")
    return service
