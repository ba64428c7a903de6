"""The DICOM upper layer (PS3.8) as the acceptor speaks it: PDU types, the PDUs we send
(A-ASSOCIATE-AC/RJ, A-RELEASE-RP, A-ABORT, a command's P-DATA-TF), reading whole PDUs
under deadlines (:class:`PduReader`), and the socket helpers that never block the caller
on a peer that went away.

Nothing here logs on its own: what goes wrong is raised (:class:`ProtocolError`,
:class:`DeadlineExpired`) and the acceptor says it once, in its own words, through its
logger (:class:`RateLimitedLog` writes to the logger it is given).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Container, Iterator

from pynetdicom._globals import APPLICATION_CONTEXT_NAME
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext, build_context

from appliance.conformance import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

# PDU types (PS3.8 9.3)
A_ASSOCIATE_RQ_PDU = 0x01
A_ASSOCIATE_AC_PDU = 0x02
A_ASSOCIATE_RJ_PDU = 0x03
P_DATA_TF_PDU = 0x04
A_RELEASE_RQ_PDU = 0x05
A_RELEASE_RP_PDU = 0x06
A_ABORT_PDU = 0x07

#: A PDU's header: type, reserved, 4-byte length (PS3.8 9.3.1).
PDU_HEADER_BYTES = 6
#: The smallest A-ASSOCIATE-RQ (PS3.8 9.3.2: the fixed fields alone are 68 bytes).
MIN_ASSOCIATE_RQ = 68
#: An A-RELEASE-RQ's length (PS3.8 9.3.6).
RELEASE_RQ_LENGTH = 4
#: A PDV item's header: 4-byte length, presentation context ID, control header (PS3.8 9.3.5.1).
PDV_HEADER_BYTES = 6
#: Bits of a PDV's message control header (PS3.8 E.2).
PDV_COMMAND = 0x01
PDV_LAST = 0x02

#: A-ABORT sources (PS3.8 9.3.8): we abort as the service user when the peer was too slow,
#: as the service provider when it broke the protocol.
ABORT_SERVICE_USER = 0
ABORT_SERVICE_PROVIDER = 2

#: A-ASSOCIATE-RJ (result, source, reason/diag.) (PS3.8 9.3.4).
REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # permanent, service user, called AE not recognised
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service user, calling AE not recognised
REJECT_APPLICATION_CONTEXT = (0x01, 0x01, 0x02)  # application context name not supported
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)  # transient, provider (presentation), local limit
REJECT_PROTOCOL_VERSION = (0x01, 0x02, 0x02)  # permanent, provider (ACSE), version not supported

#: What each rejection means, in the words the log uses.
REJECT_REASONS = {
    REJECT_CALLED_AE: "called AE title not recognised",
    REJECT_CALLING_AE: "calling AE title not allowed",
    REJECT_APPLICATION_CONTEXT: "application context name not supported",
    REJECT_LOCAL_LIMIT: "local limit of simultaneous associations reached",
    REJECT_PROTOCOL_VERSION: "protocol version not supported",
}


class ProtocolError(Exception):
    """The peer broke the upper-layer or DIMSE protocol; the association is aborted."""


class DeadlineExpired(Exception):
    """A peer was too slow (silence, a PDU, or no DIMSE message completed); aborted."""


class PduReader:
    """Reads whole PDUs of one association under its deadlines.

    The kernel enforces a receive timeout (SO_RCVTIMEO) of the shortest limit, so the data
    path makes one ``recv_into`` per PDU header and one per body, and no extra system call.
    Only when a read comes back short or empty (a slow peer, a timeout) are the deadlines
    checked here, and the receive timeout is shortened to wake up in time for the nearest:
    ``network_timeout`` of silence, ``pdu_timeout`` for a PDU from its first byte, and the
    caller's ``idle`` deadline for completing a DIMSE message (``idle_timeout`` long).
    Taking the connection makes it blocking, without Nagle, with TCP keepalive.

    Over DICOM TLS the connection is an :class:`appliance.tls.DicomTlsSocket`, on which
    neither SO_RCVTIMEO nor MSG_WAITALL reach the data (OpenSSL reads the records): it turns
    the receive timeout set here into the socket's own timeout, whose expiry it raises as
    BlockingIOError like the kernel's, and returns short reads, which the loop below takes
    as it takes a slow peer's. The deadlines are therefore the same on both ports."""

    def __init__(self, conn: socket.socket, *, network_timeout: float, pdu_timeout: float,
                 idle_timeout: float) -> None:
        conn.setblocking(True)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A peer that vanishes without a FIN is noticed in about a minute.
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        self.conn = conn
        #: Acknowledge what arrives at once (TCP_QUICKACK, set again before every read: the
        #: kernel drops it by itself). A sender that keeps Nagle's algorithm on (storescu
        #: without TCP_NODELAY in its environment, many modalities) holds back the short tail
        #: of an object until the previous segment is acknowledged, and a delayed
        #: acknowledgement waits 40 ms: about one MR image in ten stalled that long.
        self._quickack = True
        self.network_timeout = network_timeout
        self.pdu_timeout = pdu_timeout
        self.idle_timeout = idle_timeout
        self.tick = min(network_timeout, pdu_timeout, idle_timeout)
        self.last_byte = clock()
        self.pdu_deadline = 0.0
        self._timeout = self.tick
        kernel_timeout(conn, self.tick)

    def pdu(self, view: memoryview, n: int, idle: float, *, first: bool = False) -> None:
        """Fill ``view[:n]``; ``first``: these are the first bytes of a PDU, whose deadline
        starts with the first byte that arrives (so that read does not wait for all ``n``)."""
        got = 0
        flags = 0 if first else socket.MSG_WAITALL
        while True:
            if self._quickack:
                try:
                    self.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
                except OSError:
                    self._quickack = False  # not TCP (a test's socket pair)
            try:
                r = self.conn.recv_into(view[got:n], n - got, flags)
            except BlockingIOError:  # SO_RCVTIMEO expired with nothing read
                r = -1
            if r == 0:
                raise ConnectionError("the peer closed the connection")
            now = clock()
            if r > 0:
                if first and got == 0:
                    self.pdu_deadline = now + self.pdu_timeout
                got += r
                self.last_byte = now
                flags = socket.MSG_WAITALL
                if got == n:
                    break
            in_pdu = got > 0 or not first
            if now - self.last_byte >= self.network_timeout:
                raise DeadlineExpired(f"silent for {self.network_timeout:.0f} s")
            if in_pdu and now >= self.pdu_deadline:
                raise DeadlineExpired(f"a PDU took longer than {self.pdu_timeout:.0f} s to arrive")
            if now >= idle:
                raise DeadlineExpired(f"no DIMSE message completed in {self.idle_timeout:.0f} s")
            nearest = min(self.last_byte + self.network_timeout, idle,
                          self.pdu_deadline if in_pdu else idle)
            self._set_timeout(max(0.01, min(self.tick, nearest - now)))
        if self._timeout != self.tick:
            self._set_timeout(self.tick)

    def _set_timeout(self, seconds: float) -> None:
        if seconds != self._timeout:
            self._timeout = seconds
            self.conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))


@dataclass(frozen=True)
class DataSetSink:
    """Where a request's data set goes while it arrives: ``write`` gets each fragment (on
    the data path: give it the store's own ``write``, not a wrapper around it), ``complete``
    is called after the last fragment and answers the request, ``discard`` if the
    association ends first."""

    write: Callable[[memoryview], None]
    complete: Callable[[], None]
    discard: Callable[[], None]


#: on_command(presentation context ID, whole command set) -> where the message's data set
#: goes, or None when the message is complete (and answered) without one.
OnCommand = Callable[[int, bytes], "DataSetSink | None"]


def serve_p_data(conn: socket.socket, reader: PduReader, contexts: Container[int], on_command: OnCommand,
                 *, max_pdu: int, max_command_bytes: int) -> bool:
    """Read PDUs and reassemble DIMSE messages (PS3.8 9.3.5, E) until the peer releases
    (answered with A-RELEASE-RP: True) or aborts (False). A whole command set goes to
    ``on_command``, each data set fragment to the sink it returned. Raise ProtocolError, or
    DeadlineExpired from ``reader``, whose idle deadline restarts with every message
    completed; a data set still arriving when this ends is discarded."""
    limit = max_pdu + PDU_HEADER_BYTES
    command = bytearray()
    command_cx: int | None = None
    sink: DataSetSink | None = None
    header = bytearray(PDU_HEADER_BYTES)
    buf = bytearray(min(max_pdu, 1 << 20) + 64)
    idle_timeout = reader.idle_timeout
    idle_deadline = clock() + idle_timeout
    try:
        while True:
            reader.pdu(memoryview(header), PDU_HEADER_BYTES, idle_deadline, first=True)
            if clock() >= idle_deadline:
                raise DeadlineExpired(f"no DIMSE message completed in {idle_timeout:.0f} s")
            pdu_type = header[0]
            (length,) = struct.unpack_from(">L", header, 2)
            if pdu_type == A_RELEASE_RQ_PDU:
                if length != RELEASE_RQ_LENGTH:
                    raise ProtocolError(f"A-RELEASE-RQ of {length} bytes (it has 4)")
                reader.pdu(memoryview(buf), length, idle_deadline)
                if sink is not None or command:
                    raise ProtocolError("A-RELEASE-RQ in the middle of a message")
                conn.sendall(RELEASE_RP)
                return True
            if pdu_type == A_ABORT_PDU:
                return False
            if pdu_type != P_DATA_TF_PDU:
                raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X}")
            if length > limit or length < PDV_HEADER_BYTES:
                raise ProtocolError(f"P-DATA-TF of {length} bytes (our maximum is {max_pdu})")
            if len(buf) < length:
                buf = bytearray(length)
            view = memoryview(buf)[:length]
            reader.pdu(view, length, idle_deadline)
            pos = 0
            while pos < length:  # PDV items: 4-byte length, context ID, control header, data
                if pos + PDV_HEADER_BYTES > length:
                    raise ProtocolError("truncated PDV item")
                (item_len,) = struct.unpack_from(">L", view, pos)
                if item_len < 2 or pos + 4 + item_len > length:
                    raise ProtocolError("PDV item length exceeds its PDU")
                cx_id = view[pos + 4]
                control = view[pos + 5]
                data = view[pos + PDV_HEADER_BYTES : pos + 4 + item_len]
                pos += 4 + item_len
                if cx_id not in contexts:
                    raise ProtocolError(f"PDV on presentation context {cx_id}, which was not accepted")
                if control & PDV_COMMAND:
                    if sink is not None:
                        raise ProtocolError("a command arrived in the middle of a data set")
                    if len(command) + len(data) > max_command_bytes:
                        raise ProtocolError(
                            f"a DIMSE command set of more than {max_command_bytes} bytes "
                            "(a real one is a few hundred)")
                    command += data
                    command_cx = cx_id
                    if control & PDV_LAST:
                        whole = bytes(command)
                        command.clear()
                        sink = on_command(cx_id, whole)
                        if sink is None:  # no data set (a C-ECHO): the message is complete
                            idle_deadline = clock() + idle_timeout
                else:  # data set fragment
                    if sink is None or cx_id != command_cx:
                        raise ProtocolError("data set fragment without a C-STORE request")
                    sink.write(data)
                    if control & PDV_LAST:
                        done, sink = sink, None
                        done.complete()
                        idle_deadline = clock() + idle_timeout
    finally:
        if sink is not None:
            sink.discard()


class RateLimitedLog:
    """Logs to ``log`` a message at most once per ``every`` seconds per key, then says how
    many were left out: a flood or a fuzzer must not flood the journal."""

    def __init__(self, log: logging.Logger, every: float) -> None:
        self.log = log
        self.every = every
        self._seen: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, level: int, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            last, suppressed = self._seen.get(key, (-self.every, 0))
            if now - last < self.every:
                self._seen[key] = (last, suppressed + 1)
                return
            self._seen[key] = (now, 0)
            self._seen.move_to_end(key)
            while len(self._seen) > 1024:
                self._seen.popitem(last=False)
        if suppressed:
            msg += " (%d more like it in the last %.0f s)"
            args = (*args, suppressed, now - last)
        self.log.log(level, msg, *args)


class QuietPynetdicom(logging.Filter):
    """Drops pynetdicom's log records in the threads that decode and negotiate a peer's
    A-ASSOCIATE-RQ (the accept thread always, an association's thread while it negotiates):
    a malformed A-ASSOCIATE-RQ is our one warning line, not pynetdicom's traceback."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread not in self.threads

    @contextlib.contextmanager
    def here(self) -> Iterator[None]:
        """Quiet pynetdicom in this thread for the ``with`` block."""
        ident = threading.get_ident()
        self.threads.add(ident)
        try:
            yield
        finally:
            self.threads.discard(ident)


def pynetdicom_loggers() -> list[logging.Logger]:
    """pynetdicom's module loggers: a filter on a logger sees only what is logged to that
    very logger, not what its children propagate."""
    names = [name for name in logging.root.manager.loggerDict if name.startswith("pynetdicom")]
    return [logging.getLogger(name) for name in names]


# -- the PDUs we send -----------------------------------------------------------------


def _user_information(max_pdu: int) -> list[Any]:
    """The user information we send in an A-ASSOCIATE-RQ or -AC: our maximum PDU length (0:
    no limit) and our implementation class UID and version name."""
    ml = MaximumLengthNotification()
    ml.maximum_length_received = max_pdu
    ic = ImplementationClassUIDNotification()
    ic.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    iv = ImplementationVersionNameNotification()
    iv.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    return [ml, ic, iv]


def associate_ac_pdu(rq: A_ASSOCIATE, results: list[PresentationContext], max_pdu: int) -> bytes:
    """The A-ASSOCIATE-AC answering ``rq``: the negotiated ``results``, our maximum PDU
    length and our implementation class UID and version name."""
    prim = A_ASSOCIATE()
    prim.application_context_name = rq.application_context_name
    prim.calling_ae_title = rq.calling_ae_title
    prim.called_ae_title = rq.called_ae_title
    prim.result = 0x00
    prim.presentation_context_definition_results_list = results
    prim.user_information = _user_information(max_pdu)
    ac = A_ASSOCIATE_AC()
    ac.from_primitive(prim)
    return bytes(ac.encode())


def associate_rq_pdu(calling_ae: str, called_ae: str, contexts: list[tuple[int, str, list[str]]],
                     max_pdu: int) -> bytes:
    """An A-ASSOCIATE-RQ from ``calling_ae`` to ``called_ae`` proposing ``contexts`` (context
    ID, abstract syntax, transfer syntaxes), with our maximum PDU length (0: no limit) and
    our implementation class UID and version name."""
    prim = A_ASSOCIATE()
    prim.application_context_name = APPLICATION_CONTEXT_NAME
    prim.calling_ae_title = calling_ae
    prim.called_ae_title = called_ae
    proposed = []
    for cx_id, abstract, syntaxes in contexts:
        cx = build_context(abstract, syntaxes)
        cx.context_id = cx_id
        proposed.append(cx)
    prim.presentation_context_definition_list = proposed
    prim.user_information = _user_information(max_pdu)
    rq = A_ASSOCIATE_RQ()
    rq.from_primitive(prim)
    return bytes(rq.encode())


def reject_pdu(result: int, source: int, reason: int) -> bytes:
    """A-ASSOCIATE-RJ (one of the ``REJECT_*`` triples)."""
    rj = A_ASSOCIATE_RJ()
    prim = A_ASSOCIATE()
    prim.result = result
    prim.result_source = source
    prim.diagnostic = reason
    rj.from_primitive(prim)
    return bytes(rj.encode())


def abort_pdu(source: int) -> bytes:
    """A-ABORT: source 0 = service user, 2 = service provider (reason 0, not specified)."""
    return bytes([A_ABORT_PDU, 0, 0, 0, 0, 4, 0, 0, source, 0])


#: A-RELEASE-RP: type, reserved, length 4, 4 reserved bytes (PS3.8 9.3.7).
RELEASE_RP = bytes([A_RELEASE_RP_PDU, 0, 0, 0, 0, 4, 0, 0, 0, 0])


#: A-RELEASE-RQ: type, reserved, length 4, 4 reserved bytes (PS3.8 9.3.6).
RELEASE_RQ = bytes([A_RELEASE_RQ_PDU, 0, 0, 0, 0, 4, 0, 0, 0, 0])


def p_data_tf_pdu(cx_id: int, control: int, data: bytes) -> bytes:
    """A P-DATA-TF of one PDV item (a command set: a few hundred bytes, so one PDV fits any
    negotiated PDU size)."""
    pdv = struct.pack(">LBB", len(data) + 2, cx_id, control) + data
    return struct.pack(">BBL", P_DATA_TF_PDU, 0, len(pdv)) + pdv


# -- sockets ------------------------------------------------------------------------------


#: The clock every deadline is measured on (monotonic seconds): time.monotonic itself, not
#: a function around it, as it is read twice per PDU on the data path.
clock: Callable[[], float] = time.monotonic


def _timeval(seconds: float) -> bytes:
    return struct.pack("ll", int(seconds), int((seconds % 1) * 1_000_000))


def kernel_timeout(sock: socket.socket, seconds: float) -> None:
    """Make ``sock`` blocking with the timeout enforced by the kernel (SO_RCVTIMEO and
    SO_SNDTIMEO): Python's own socket timeout polls before every recv, which doubles the
    system calls on the data path. An expired timeout raises BlockingIOError (EAGAIN)."""
    sock.settimeout(None)
    tv = _timeval(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def shutdown(sock: socket.socket) -> None:
    """Wake the thread blocked reading ``sock`` (it closes the socket itself)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def close(sock: socket.socket) -> None:
    """Shut down and close ``sock``, whatever state it is in."""
    shutdown(sock)
    try:
        sock.close()
    except OSError:
        pass


def send_quietly(sock: socket.socket, data: bytes) -> None:
    """Send a last PDU (an A-ABORT) if the peer is still there to read it."""
    try:
        sock.sendall(data)
    except OSError:
        pass


def send_and_close(sock: socket.socket, data: bytes) -> None:
    """Send a short last PDU on a non-blocking socket without waiting, then close: a peer
    that does not read its A-ASSOCIATE-RJ must not stall the accept thread."""
    try:
        sock.send(data)
    except OSError:
        pass
    close(sock)
