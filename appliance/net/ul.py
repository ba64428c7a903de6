"""The DICOM upper layer (PS3.8) as the acceptor speaks it: PDU types, the PDUs we send
(A-ASSOCIATE-AC/RJ, A-RELEASE-RP, A-ABORT, a command's P-DATA-TF), reading whole PDUs
under deadlines (:class:`PduReader`), and the socket helpers that never block the caller
on a peer that went away.

Nothing here logs: what goes wrong is raised (:class:`ProtocolError`,
:class:`DeadlineExpired`) and the acceptor says it once, in its own words.
"""

from __future__ import annotations

import socket
import struct
import time

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext

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
    caller's ``idle`` deadline for completing a DIMSE message (``idle_timeout`` long)."""

    def __init__(self, conn: socket.socket, *, network_timeout: float, pdu_timeout: float,
                 idle_timeout: float) -> None:
        self.conn = conn
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


# -- the PDUs we send -----------------------------------------------------------------


def associate_ac_pdu(rq: A_ASSOCIATE, results: list[PresentationContext], max_pdu: int) -> bytes:
    """The A-ASSOCIATE-AC answering ``rq``: the negotiated ``results``, our maximum PDU
    length and our implementation class UID and version name."""
    prim = A_ASSOCIATE()
    prim.application_context_name = rq.application_context_name
    prim.calling_ae_title = rq.calling_ae_title
    prim.called_ae_title = rq.called_ae_title
    prim.result = 0x00
    prim.presentation_context_definition_results_list = results
    ml = MaximumLengthNotification()
    ml.maximum_length_received = max_pdu
    ic = ImplementationClassUIDNotification()
    ic.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    iv = ImplementationVersionNameNotification()
    iv.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    prim.user_information = [ml, ic, iv]
    ac = A_ASSOCIATE_AC()
    ac.from_primitive(prim)
    return bytes(ac.encode())


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


def p_data_tf_pdu(cx_id: int, control: int, data: bytes) -> bytes:
    """A P-DATA-TF of one PDV item (a command set: a few hundred bytes, so one PDV fits any
    negotiated PDU size)."""
    pdv = struct.pack(">LBB", len(data) + 2, cx_id, control) + data
    return struct.pack(">BBL", P_DATA_TF_PDU, 0, len(pdv)) + pdv


# -- sockets ------------------------------------------------------------------------------


def clock() -> float:
    """The clock every deadline is measured on (monotonic seconds)."""
    return time.monotonic()


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
