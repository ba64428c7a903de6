"""The client AE's side of an association (PS3.8 as requestor), on the upper layer and the
DIMSE code the Storage SCP speaks (:mod:`appliance.net.ul`, :mod:`appliance.net.dimse`).

:func:`associate` opens the TCP connection (wrapped in DICOM TLS when the destination says
so) within the configured timeout, sends an A-ASSOCIATE-RQ with our calling AE title, the
presentation contexts the caller proposes, our maximum PDU length (0: no limit) and our
implementation class UID and version name, and reads the answer under the same deadlines
the SCP keeps (:class:`~appliance.net.ul.PduReader`). What goes wrong is a
:class:`~appliance.errors.NetworkError` in words: unknown host, connection refused, timed
out, unreachable, a TLS handshake that failed, the association rejected (with the decoded
reason), aborted, or not answered.

The :class:`Association` it returns sends C-ECHO and C-STORE requests and reads their
responses through a :class:`~appliance.net.dimse.Link`: a C-STORE's data set goes out as
the bytes it is given (a stored file's data set as stored, from :func:`stored_data_set`;
nothing is decoded into a pydicom Dataset), fragmented to the peer's maximum PDU length.
An association that breaks (an A-ABORT, the connection lost, no response within the
timeout, a protocol error) is aborted and closed, and the request raises
:class:`AssociationLost`; :meth:`Association.release` ends it in order.

Every limit is the caller's one timeout (``ClientSettings.timeout``): the connect, the
association answer, each response, silence on the line, and the release.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import ssl
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC
from pynetdicom.pdu_primitives import MaximumLengthNotification

from appliance import tls
from appliance.config import Destination, TlsConfig
from appliance.conformance import SOPClass
from appliance.dicom import dicomio
from appliance.errors import NetworkError
from appliance.net.dimse import (
    DATA_SET_FOLLOWS,
    NO_DATA_SET,
    PRIORITY_MEDIUM,
    CommandField,
    Incoming,
    Link,
    Tag,
    encode_command,
    text,
    uid,
    us,
)
from appliance.net.ul import (
    A_ABORT_PDU,
    A_ASSOCIATE_AC_PDU,
    A_ASSOCIATE_RJ_PDU,
    A_RELEASE_RP_PDU,
    ABORT_SERVICE_USER,
    P_DATA_TF_PDU,
    PDU_HEADER_BYTES,
    PDV_COMMAND,
    PDV_HEADER_BYTES,
    PDV_LAST,
    RELEASE_RQ,
    DeadlineExpired,
    PduReader,
    ProtocolError,
    abort_pdu,
    associate_rq_pdu,
    clock,
    close,
    p_data_tf_pdu,
    send_quietly,
)
from appliance.reports import sop_class_label

log = logging.getLogger(__name__)

#: The largest PDU length a PDU header can carry (PS3.8 9.3.1): what "no limit" (0) means
#: when we check a PDU the peer sends.
MAX_PDU_LENGTH = 0xFFFFFFFF
#: The most presentation contexts one A-ASSOCIATE-RQ can propose (odd IDs 1 to 255).
MAX_CONTEXTS = 128
#: The longest A-ASSOCIATE-AC/RJ we read (a real one is a few hundred bytes per context).
MAX_ASSOCIATE_ANSWER = 1 << 20
#: The longest DIMSE command set we read in a response (a real one is a few hundred bytes).
MAX_COMMAND_BYTES = 1 << 16

#: (result source, reason) of an A-ASSOCIATE-RJ (PS3.8 9.3.4), in words.
REJECT_REASONS: dict[tuple[int, int], str] = {
    (1, 1): "no reason given by the peer",
    (1, 2): "the peer does not support the DICOM application context",
    (1, 3): "the peer does not accept our calling AE title '{calling}'; add it to the peer's list of "
            "known AE titles, or use -aet",
    (1, 7): "the peer does not answer to the called AE title '{called}'; check the peer's AE title (-aec)",
    (2, 1): "no reason given by the peer's DICOM stack",
    (2, 2): "the peer does not support the DICOM protocol version",
    (3, 1): "the peer is temporarily congested; try again later",
    (3, 2): "the peer has too many associations open (local limit exceeded); try again later",
}


class Settings(Protocol):
    """How the client AE associates (``appliance.net.sender.ClientSettings``)."""

    @property
    def calling_ae(self) -> str: ...

    @property
    def max_pdu(self) -> int: ...

    @property
    def timeout(self) -> float: ...

    @property
    def tls(self) -> TlsConfig: ...


class AssociationLost(NetworkError):
    """The association ended while a request waited for its response (aborted by the
    peer, the connection lost, a timeout, or the peer broke the protocol); it was aborted
    and closed, and the request may or may not have been carried out."""


@dataclass(frozen=True)
class Response:
    """A DIMSE response: its Status and Error Comment (empty if none)."""

    status: int
    comment: str = ""


def peer_name(peer: Destination) -> str:
    """``AE@host:port``, and the TLS mode when there is one: how messages name a peer."""
    return f"{peer.ae_title}@{peer.host}:{peer.port}" + (f" ({peer.tls})" if peer.tls != "plain" else "")


def rejection_words(result: int, source: int, reason: int, peer: Destination, calling: str) -> str:
    """An A-ASSOCIATE-RJ in words, as the client AE reports it."""
    kind = {1: "permanently", 2: "transiently"}.get(result, "")
    words = REJECT_REASONS.get((source, reason))
    if words is None:
        words = f"result {result}, source {source}, reason {reason}"
    return f"association rejected {kind} by {peer_name(peer)}: " + words.format(calling=calling, called=peer.ae_title)


# -- associating ------------------------------------------------------------------------


def associate(peer: Destination, settings: Settings, contexts: Sequence[tuple[str, Sequence[str]]]) -> Association:
    """Open an association with ``peer`` proposing ``contexts`` (abstract syntax, transfer
    syntaxes), one presentation context each; raise NetworkError saying why it failed, or
    if the peer accepted none of them."""
    if not 0 < len(contexts) <= MAX_CONTEXTS:
        raise ValueError(f"{len(contexts)} presentation contexts; one association proposes 1 to {MAX_CONTEXTS}")
    proposed = [(2 * i + 1, str(a), [str(t) for t in ts]) for i, (a, ts) in enumerate(contexts)]
    conn, context = _connect(peer, settings)
    started = clock()
    try:
        reader = PduReader(conn, network_timeout=settings.timeout, pdu_timeout=settings.timeout,
                           idle_timeout=settings.timeout)
        conn.sendall(associate_rq_pdu(settings.calling_ae, peer.ae_title, proposed, settings.max_pdu))
        pdu_type, body = _read_answer(conn, reader, peer, settings.timeout)
    except (NetworkError, OSError) as exc:
        close(conn)
        if isinstance(exc, ssl.SSLError):
            words = f"TLS handshake with {peer.host}:{peer.port} failed: {tls.describe(exc)}"
        elif isinstance(exc, NetworkError):
            words = str(exc)
        else:
            words = (f"{peer_name(peer)} aborted the association request (A-ABORT or connection closed): "
                     f"{exc.strerror or exc}")
        if context is not None and (not isinstance(exc, NetworkError) or "aborted the association request" in words):
            # Over TLS 1.3 a server refuses our certificate after the handshake, with an alert
            # that the A-ASSOCIATE-RQ we sent meanwhile may have made us miss: look again.
            words = _tls_refusal(peer, context, settings.timeout - (clock() - started)) or words
        raise NetworkError(words) from None
    if pdu_type == A_ASSOCIATE_RJ_PDU:
        close(conn)
        result, source, reason = (body[1], body[2], body[3]) if len(body) >= 4 else (0, 0, 0)
        raise NetworkError(rejection_words(result, source, reason, peer, settings.calling_ae))
    try:
        ac = A_ASSOCIATE_AC()
        ac.decode(body)
        primitive = ac.to_primitive()
    except Exception as exc:  # noqa: BLE001 - pynetdicom raises many kinds on malformed items
        send_quietly(conn, abort_pdu(ABORT_SERVICE_USER))
        close(conn)
        raise NetworkError(f"{peer_name(peer)} answered the association request with a malformed "
                           f"A-ASSOCIATE-AC ({type(exc).__name__}); aborted") from None
    by_id = {cx_id: (abstract, syntaxes) for cx_id, abstract, syntaxes in proposed}
    accepted: dict[int, tuple[str, str]] = {}
    for cx in primitive.presentation_context_definition_results_list:
        cx_id = int(cx.context_id or 0)
        if cx.result == 0x00 and cx_id in by_id and cx.transfer_syntax \
                and str(cx.transfer_syntax[0]) in by_id[cx_id][1]:
            accepted[cx_id] = (by_id[cx_id][0], str(cx.transfer_syntax[0]))
    peer_max = 0
    for item in primitive.user_information:
        if isinstance(item, MaximumLengthNotification):
            peer_max = int(item.maximum_length_received or 0)
    assoc = Association(conn, reader, peer, settings, accepted, peer_max)
    if not accepted:
        assoc.abort()
        refused = ", ".join(sorted({sop_class_label(a) for _, a, _ in proposed}))
        syntaxes = ", ".join(sorted({UID(t).name for _, _, ts in proposed for t in ts}))
        raise NetworkError(f"{peer_name(peer)} accepted the association but none of the proposed services "
                           f"({refused}, {syntaxes}); configure the peer to accept them")
    log.debug("association with %s established, %d of %d context(s) accepted, max PDU %d", peer_name(peer),
              len(accepted), len(proposed), peer_max)
    return assoc


def _connect(peer: Destination, settings: Settings) -> tuple[socket.socket, ssl.SSLContext | None]:
    """The TCP connection to ``peer`` (TLS too if it says so, with its context), within
    ``settings.timeout``."""
    where = f"{peer.host}:{peer.port}"
    context = tls.client_context(settings.tls, mutual=peer.tls == "mutual") if peer.tls != "plain" else None
    try:
        socket.getaddrinfo(peer.host, peer.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise NetworkError(f"cannot resolve host name '{peer.host}'; check the name or use an IP address") from None
    started = clock()
    try:
        raw = socket.create_connection((peer.host, peer.port), timeout=settings.timeout)
    except ConnectionRefusedError:
        raise NetworkError(f"connection refused by {where}: nothing listens on port {peer.port} "
                           "(is the DICOM service running, is the port right?)") from None
    except TimeoutError:
        raise NetworkError(f"connection to {where} timed out after {settings.timeout:g} s: the host does not "
                           "answer (check the address, the network and firewalls)") from None
    except OSError as exc:
        if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            raise NetworkError(f"{where} is unreachable: {exc.strerror} (check the address, the network cable "
                               "and the routes)") from None
        raise NetworkError(f"cannot connect to {where}: {exc.strerror or exc}") from None
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each PDU at once, not after a delayed ACK
    if context is None:
        return raw, None
    try:
        raw.settimeout(max(settings.timeout - (clock() - started), 0.1))
        return context.wrap_socket(raw, server_hostname=peer.host), context
    except (ssl.SSLError, OSError) as exc:
        close(raw)
        raise NetworkError(f"TLS handshake with {where} failed: {tls.describe(exc)}") from None


#: Seconds a look at a TLS peer that closed on us waits for its alert after the handshake.
TLS_ALERT_WAIT = 2.0


def _tls_refusal(peer: Destination, context: ssl.SSLContext | None, left: float) -> str | None:
    """Why a TLS ``peer`` closed the connection, if it says: a new connection, the
    handshake, and a moment's wait for the alert a TLS 1.3 server sends after it when it
    refuses our certificate (within ``left`` seconds). None if it finds nothing wrong."""
    if context is None or left <= 0.1:
        return None
    where = f"{peer.host}:{peer.port}"
    try:
        with socket.create_connection((peer.host, peer.port), timeout=left) as raw:
            with context.wrap_socket(raw, server_hostname=peer.host) as conn:
                conn.settimeout(min(TLS_ALERT_WAIT, left))
                try:
                    conn.recv(1)
                except TimeoutError:
                    pass
    except ssl.SSLError as exc:
        return f"TLS handshake with {where} failed: {tls.describe(exc)}"
    except OSError:
        return None
    return None


def _read_answer(conn: socket.socket, reader: PduReader, peer: Destination, timeout: float) -> tuple[int, bytes]:
    """The peer's A-ASSOCIATE-AC or -RJ: (PDU type, the whole PDU); NetworkError otherwise."""
    header = bytearray(PDU_HEADER_BYTES)
    deadline = clock() + timeout
    try:
        reader.pdu(memoryview(header), PDU_HEADER_BYTES, deadline, first=True)
        pdu_type = header[0]
        (length,) = struct.unpack_from(">L", header, 2)
        if pdu_type not in (A_ASSOCIATE_AC_PDU, A_ASSOCIATE_RJ_PDU, A_ABORT_PDU) or length > MAX_ASSOCIATE_ANSWER:
            send_quietly(conn, abort_pdu(ABORT_SERVICE_USER))
            raise NetworkError(f"{peer_name(peer)} answered the association request with PDU type "
                               f"0x{pdu_type:02X} of {length} bytes; aborted (is it a DICOM service?)")
        body = bytearray(length)
        reader.pdu(memoryview(body), length, deadline)
    except DeadlineExpired:
        send_quietly(conn, abort_pdu(ABORT_SERVICE_USER))
        raise NetworkError(f"{peer_name(peer)} accepted the connection but did not answer the association request "
                           f"within {timeout:g} s (is it a DICOM service?)") from None
    except ConnectionError:
        raise NetworkError(f"{peer_name(peer)} aborted the association request (A-ABORT or connection "
                           "closed)") from None
    if pdu_type == A_ABORT_PDU:
        raise NetworkError(f"{peer_name(peer)} aborted the association request (A-ABORT or connection closed)")
    if pdu_type == A_ASSOCIATE_RJ_PDU:
        return pdu_type, bytes(body)
    return pdu_type, bytes(header) + bytes(body)


# -- the association ---------------------------------------------------------------------


class Association:
    """An established association of the client AE: C-ECHO and C-STORE requests, one at a
    time, then :meth:`release` (or :meth:`abort`). Owns the connection: once the
    association has ended, the socket is closed."""

    def __init__(self, conn: socket.socket, reader: PduReader, peer: Destination, settings: Settings,
                 accepted: dict[int, tuple[str, str]], peer_max_pdu: int) -> None:
        self.conn = conn
        self.reader = reader
        self.peer = peer
        self.timeout = settings.timeout
        #: Accepted presentation contexts: ID -> (abstract syntax, transfer syntax).
        self.accepted = accepted
        #: The peer's maximum PDU length (0: no limit).
        self.peer_max_pdu = peer_max_pdu
        self.link = Link(conn, reader, contexts=accepted, peer_max_pdu=peer_max_pdu,
                         max_pdu=settings.max_pdu or MAX_PDU_LENGTH, max_command_bytes=MAX_COMMAND_BYTES)
        self._by_syntax = {pair: cx_id for cx_id, pair in sorted(accepted.items(), reverse=True)}
        self.established = True

    def context_for(self, abstract_syntax: str, transfer_syntax: str) -> int | None:
        """The accepted context of ``abstract_syntax`` in ``transfer_syntax``, or None."""
        return self._by_syntax.get((str(abstract_syntax), str(transfer_syntax)))

    def accepts(self, abstract_syntax: str) -> bool:
        """Whether some context of ``abstract_syntax`` was accepted."""
        return any(a == abstract_syntax for a, _ in self.accepted.values())

    def echo(self) -> Response:
        """Send a C-ECHO-RQ on the Verification context and return the response."""
        cx_id = next((i for i, (a, _) in self.accepted.items() if a == SOPClass.VERIFICATION), None)
        if cx_id is None:
            raise NetworkError(f"{peer_name(self.peer)} did not accept the Verification service")
        message_id = self.link.message_id()
        command = encode_command([
            (Tag.AFFECTED_SOP_CLASS_UID, uid(SOPClass.VERIFICATION)),
            (Tag.COMMAND_FIELD, us(CommandField.C_ECHO_RQ)),
            (Tag.MESSAGE_ID, us(message_id)),
            (Tag.COMMAND_DATA_SET_TYPE, us(NO_DATA_SET)),
        ])
        return self._request(cx_id, command, None, CommandField.C_ECHO_RSP, message_id)

    def store(self, cx_id: int, sop_instance_uid: str, data_set: bytes | memoryview | FramedDataSet, *,
              move_originator: tuple[str, int] | None = None,
              meanwhile: Callable[[], None] | None = None) -> Response:
        """Send a C-STORE-RQ on context ``cx_id`` with ``data_set`` (encoded in the context's
        transfer syntax, no file meta; or a stored file as :meth:`read_stored` laid it out)
        and return the response. ``move_originator``: the AE title and Message ID of the
        C-MOVE this is a sub-operation of. ``meanwhile`` runs once the request has gone out,
        before its response is read (the caller reads its next file while the peer works); an
        error it raises is its own (the association stays as it is)."""
        abstract, _ = self.accepted[cx_id]
        message_id = self.link.message_id()
        elements = [
            (Tag.AFFECTED_SOP_CLASS_UID, uid(abstract)),
            (Tag.COMMAND_FIELD, us(CommandField.C_STORE_RQ)),
            (Tag.MESSAGE_ID, us(message_id)),
            (Tag.PRIORITY, us(PRIORITY_MEDIUM)),
            (Tag.COMMAND_DATA_SET_TYPE, us(DATA_SET_FOLLOWS)),
            (Tag.AFFECTED_SOP_INSTANCE_UID, uid(sop_instance_uid)),
        ]
        if move_originator is not None:
            ae, originator_id = move_originator
            title = ae.encode("ascii", "replace")
            elements += [(Tag.MOVE_ORIGINATOR_APPLICATION_ENTITY_TITLE, title + b" " * (len(title) & 1)),
                         (Tag.MOVE_ORIGINATOR_MESSAGE_ID, us(originator_id))]
        return self._request(cx_id, encode_command(elements), data_set, CommandField.C_STORE_RSP, message_id,
                             meanwhile)

    def _request(self, cx_id: int, command: bytes, data_set: bytes | memoryview | FramedDataSet | None,
                 expected: CommandField, message_id: int, meanwhile: Callable[[], None] | None = None) -> Response:
        if not self.established:
            raise AssociationLost(f"the association with {peer_name(self.peer)} has ended")
        with self._lost_on_error():
            if isinstance(data_set, FramedDataSet):
                self._send_framed(cx_id, command, data_set)
            else:
                self.link.send(cx_id, command, data_set)
        if meanwhile is not None:
            meanwhile()
        with self._lost_on_error():
            incoming = self.link.receive()
            return _response(incoming, expected, message_id)

    @contextlib.contextmanager
    def _lost_on_error(self) -> Iterator[None]:
        """Turn what breaks the association into AssociationLost, the association aborted."""
        try:
            yield
        except DeadlineExpired as exc:
            self.abort()
            raise AssociationLost(f"{peer_name(self.peer)} did not answer within {self.timeout:g} s ({exc}); "
                                  "the association was aborted") from None
        except ProtocolError as exc:
            self.abort()
            raise AssociationLost(f"{peer_name(self.peer)} broke the DICOM protocol ({exc}); the association "
                                  "was aborted") from None
        except OSError as exc:  # ConnectionError (an A-ABORT, the connection closed), a send timeout, TLS
            self.abort()
            raise AssociationLost(f"the association with {peer_name(self.peer)} ended: "
                                  f"{_os_words(exc)}") from None

    def read_stored(self, path: Path, buffer: bytearray) -> FramedDataSet:
        """Read the stored Part 10 file at ``path`` for :meth:`store`: its data set goes into
        ``buffer`` (grown if need be, else reused) already cut into the P-DATA-TF PDUs this
        association sends (the peer's maximum PDU length), with room for the command before
        them, so that a C-STORE-RQ is one write and no byte of the file is copied again.
        Raises OSError if it cannot be read, ValueError if it is not Part 10."""
        fragment = self.link.fragment
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            offset, ts = _data_set_start(fd, size, path)
            n = size - offset
            count = max(1, -(-n // fragment))  # an empty data set is still one (last) PDV
            end = COMMAND_ROOM + count * _PDU_PDV_HEADERS + n
            if len(buffer) < end:
                buffer.extend(bytes(end - len(buffer)))
            views = []
            with memoryview(buffer) as mv:
                pos, left = COMMAND_ROOM, n
                for i in range(count):
                    k = min(fragment, left)
                    struct.pack_into(">BBLLBB", buffer, pos, P_DATA_TF_PDU, 0, k + PDV_HEADER_BYTES, k + 2, 0,
                                     PDV_LAST if i == count - 1 else 0)
                    views.append(mv[pos + _PDU_PDV_HEADERS : pos + _PDU_PDV_HEADERS + k])
                    pos += _PDU_PDV_HEADERS + k
                    left -= k
                got = 0
                for first in range(0, count, _IOV_BATCH):
                    part = views[first : first + _IOV_BATCH]
                    r = os.preadv(fd, part, offset + got)
                    got += r
                    if r < sum(len(v) for v in part):
                        break
                for v in views:
                    v.release()
            if got != n:
                raise ValueError(f"{path} became shorter while it was read ({offset + got} of {size} bytes)")
        finally:
            os.close(fd)
        return FramedDataSet(ts, buffer, end, n, fragment)

    def _send_framed(self, cx_id: int, command: bytes, framed: FramedDataSet) -> None:
        """Send a command and ``framed``'s data set, their PDVs on context ``cx_id``, in one write."""
        if framed.fragment != self.link.fragment:
            raise ValueError("a data set read for another association")
        buffer = framed.buffer
        for pos in range(COMMAND_ROOM + 10, framed.end, framed.fragment + _PDU_PDV_HEADERS):
            buffer[pos] = cx_id  # each PDV's presentation context ID
        pdu = p_data_tf_pdu(cx_id, PDV_COMMAND | PDV_LAST, command)
        start = COMMAND_ROOM - len(pdu)
        with memoryview(buffer) as mv:
            if start >= 0:
                mv[start:COMMAND_ROOM] = pdu
                self.conn.sendall(mv[start : framed.end])
            else:  # a command longer than the room left for it: on its own
                self.conn.sendall(pdu)
                self.conn.sendall(mv[COMMAND_ROOM : framed.end])

    def still_open(self) -> bool:
        """Whether the association, idle since its last response, can take a request: the
        peer has neither closed the connection nor sent anything meanwhile (an A-ABORT, an
        A-RELEASE-RQ, or over TLS perhaps only a record of its own). If it has, the
        association is aborted here and False returned."""
        if not self.established:
            return False
        poller = select.poll()
        poller.register(self.conn, select.POLLIN)
        pending = isinstance(self.conn, ssl.SSLSocket) and self.conn.pending() > 0  # read, not yet taken
        if pending or poller.poll(0):  # data, the connection closed, or an error
            log.debug("%s ended or spoke while the association was idle; it is aborted", peer_name(self.peer))
            self.abort()
            return False
        return True

    def release(self) -> None:
        """Release the association (A-RELEASE-RQ, then the peer's A-RELEASE-RP, within the
        timeout) and close the connection; a peer that does not answer is aborted."""
        if not self.established:
            return
        self.established = False
        try:
            self.conn.sendall(RELEASE_RQ)
            self.reader.last_byte = clock()
            deadline = clock() + self.timeout
            header = bytearray(PDU_HEADER_BYTES)
            while True:
                self.reader.pdu(memoryview(header), PDU_HEADER_BYTES, deadline, first=True)
                (length,) = struct.unpack_from(">L", header, 2)
                if header[0] == A_ABORT_PDU or length > MAX_ASSOCIATE_ANSWER:
                    break
                body = bytearray(length)
                self.reader.pdu(memoryview(body), length, deadline)
                if header[0] == A_RELEASE_RP_PDU:
                    break
        except DeadlineExpired:
            log.debug("%s did not answer the A-RELEASE-RQ within %g s; aborted", peer_name(self.peer), self.timeout)
            send_quietly(self.conn, abort_pdu(ABORT_SERVICE_USER))
        except OSError as exc:  # the peer closed the connection instead of answering: released all the same
            log.debug("releasing the association with %s: %s", peer_name(self.peer), _os_words(exc))
        finally:
            close(self.conn)

    def abort(self) -> None:
        """Abort the association (A-ABORT, service user) and close the connection."""
        if self.established:
            self.established = False
            send_quietly(self.conn, abort_pdu(ABORT_SERVICE_USER))
        close(self.conn)


def _response(incoming: Incoming, expected: CommandField, message_id: int) -> Response:
    if incoming.command_field != expected:
        raise ProtocolError(f"DIMSE command 0x{incoming.command_field:04X} where the response "
                            f"0x{int(expected):04X} was due")
    if incoming.us(Tag.MESSAGE_ID_BEING_RESPONDED_TO) != message_id:
        raise ProtocolError(f"a response to message {incoming.us(Tag.MESSAGE_ID_BEING_RESPONDED_TO)} where the "
                            f"one to message {message_id} was due")
    return Response(incoming.us(Tag.STATUS), text(incoming.elements.get(Tag.ERROR_COMMENT)).strip())


def _os_words(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        return tls.describe(exc)
    if isinstance(exc, BlockingIOError):
        return "the peer stopped reading (send timeout)"
    return exc.strerror or str(exc) or type(exc).__name__


# -- data sets ---------------------------------------------------------------------------


#: Room left before a framed data set's first PDU for the C-STORE-RQ command's PDU (a
#: command is a few hundred bytes; a longer one is sent on its own).
COMMAND_ROOM = 1024
#: A P-DATA-TF's header and its one PDV item's header, before each fragment of a data set.
_PDU_PDV_HEADERS = PDU_HEADER_BYTES + PDV_HEADER_BYTES
#: Fragments read by one preadv (the system allows 1024 buffers per call).
_IOV_BATCH = 512
#: Bytes read first from a stored file to find where its data set starts (more if its file
#: meta group is longer).
META_PREFIX = 4096


@dataclass(frozen=True)
class FramedDataSet:
    """A stored file's data set as :meth:`Association.read_stored` laid it out in
    ``buffer``: the P-DATA-TF PDUs of ``fragment`` bytes of data each, from
    :data:`COMMAND_ROOM` to ``end``, their context IDs set when it is sent."""

    transfer_syntax: str
    buffer: bytearray
    end: int
    #: The data set's length.
    length: int
    fragment: int


def _data_set_start(fd: int, size: int, path: Path) -> tuple[int, str]:
    """(offset of the data set, transfer syntax) of the Part 10 file open as ``fd``."""
    want = META_PREFIX
    while True:
        head = os.pread(fd, want, 0)
        whole = len(head) >= size
        try:
            offset, ts = dicomio.split_part10(head)
        except dicomio.EncodingError as exc:
            if whole or len(head) < want:
                raise ValueError(f"{path} is not a DICOM Part 10 file: {exc}") from None
            want *= 4
            continue
        if whole or offset + 8 <= len(head):  # the element after the file meta group was seen
            return offset, ts
        want *= 4


@dataclass(frozen=True)
class StoredDataSet:
    """A stored Part 10 file's data set, as stored (the preamble and File Meta left out)."""

    transfer_syntax: str
    body: memoryview


def stored_data_set(path: Path) -> StoredDataSet:
    """Read the stored Part 10 file at ``path``: its transfer syntax and its data set as
    stored. Raises OSError if it cannot be read, ValueError if it is not Part 10."""
    data = path.read_bytes()
    try:
        offset, ts = dicomio.split_part10(data)
    except dicomio.EncodingError as exc:
        raise ValueError(f"{path} is not a DICOM Part 10 file: {exc}") from None
    return StoredDataSet(ts, memoryview(data)[offset:])
