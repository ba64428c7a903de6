"""The wire of the hostile peers: PDUs and DIMSE commands written by hand after PS3.8 9.3
(A-ASSOCIATE-RQ 9.3.2, P-DATA-TF 9.3.5, A-RELEASE-RQ 9.3.6) and PS3.7 9.3.1/9.3.5, so that a
generator sends exactly the bytes it means to, including wrong ones; reading the SCP's
answer; raw associations and the socket helpers every generator shares."""

from __future__ import annotations

import errno
import resource
import select
import socket
import ssl
import struct
import time
from dataclasses import dataclass, field
from typing import Sequence

from appliance.conformance import (
    APPLICATION_CONTEXT_NAME,
    DEFAULT_SCP_AE_TITLE,
    SOPClass,
    TransferSyntax,
)

#: The calling AE title of every generator (a real scanner's would be its own).
CALLING_AE = "HOSTILE"
#: The implementation identity the generators announce (a UUID-derived UID, PS3.5 B.2).
IMPLEMENTATION_UID = "2.25.96226317145936513212873593735946401787"
#: Our max PDU in the A-ASSOCIATE-RQ.
CLIENT_MAX_PDU = 16384

# PDU types (PS3.8 9.3.1)
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = 0x04, 0x05, 0x06, 0x07
PDU_NAMES = {
    ASSOCIATE_RQ: "A-ASSOCIATE-RQ",
    ASSOCIATE_AC: "A-ASSOCIATE-AC",
    ASSOCIATE_RJ: "A-ASSOCIATE-RJ",
    P_DATA_TF: "P-DATA-TF",
    RELEASE_RQ: "A-RELEASE-RQ",
    RELEASE_RP: "A-RELEASE-RP",
    ABORT: "A-ABORT",
}
A_RELEASE_RQ = bytes([RELEASE_RQ, 0, 0, 0, 0, 4, 0, 0, 0, 0])


@dataclass(frozen=True)
class Target:
    """The SCP under test; with ``tls``, its TLS port (every connection is wrapped in it)."""

    host: str
    port: int
    ae_title: str = DEFAULT_SCP_AE_TITLE
    tls: ssl.SSLContext | None = field(default=None, compare=False)


# -- PDUs and commands, by hand -------------------------------------------------------------


def _item(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(payload)) + payload


def pdu(kind: int, payload: bytes) -> bytes:
    """A PDU of ``kind`` around ``payload`` (PS3.8 9.3.1: type, reserved, 4-byte length)."""
    return struct.pack(">BBL", kind, 0, len(payload)) + payload


def associate_rq(
    called: str,
    contexts: Sequence[tuple[str, Sequence[str]]] | None = None,
    *,
    calling: str = CALLING_AE,
    max_pdu: int = CLIENT_MAX_PDU,
) -> bytes:
    """An A-ASSOCIATE-RQ proposing ``contexts`` ((abstract syntax, transfer syntaxes), with
    odd context IDs 1, 3, ... in order); Verification in Implicit LE by default."""
    if contexts is None:
        contexts = [(SOPClass.VERIFICATION, [TransferSyntax.IMPLICIT_LE])]
    items = _item(0x10, APPLICATION_CONTEXT_NAME.encode())
    for n, (abstract, syntaxes) in enumerate(contexts):
        sub = _item(0x30, str(abstract).encode()) + b"".join(_item(0x40, str(ts).encode()) for ts in syntaxes)
        items += _item(0x20, bytes([2 * n + 1, 0, 0, 0]) + sub)
    items += _item(0x50, _item(0x51, struct.pack(">L", max_pdu)) + _item(0x52, IMPLEMENTATION_UID.encode()))
    head = struct.pack(">HH", 1, 0) + called.encode().ljust(16)[:16] + calling.encode().ljust(16)[:16] + bytes(32)
    return pdu(ASSOCIATE_RQ, head + items)


def p_data(*pdvs: tuple[int, int, bytes]) -> bytes:
    """A P-DATA-TF of PDV items (context ID, message control header, fragment)."""
    return pdu(P_DATA_TF, b"".join(struct.pack(">LBB", len(d) + 2, cx, mch) + d for cx, mch, d in pdvs))


def _element(tag: int, value: bytes) -> bytes:
    if len(value) & 1:
        value += b"\x00"
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value


def command(elements: list[tuple[int, bytes]]) -> bytes:
    """A DIMSE command set (Implicit VR LE, group 0000) headed by its group length; the
    values are bytes as given, so they may hold anything."""
    body = b"".join(_element(tag, value) for tag, value in elements)
    return _element(0x00000000, struct.pack("<L", len(body))) + body


def echo_rq(message_id: int = 1) -> bytes:
    return command([
        (0x00000002, SOPClass.VERIFICATION.encode()),
        (0x00000100, struct.pack("<H", 0x0030)),
        (0x00000110, struct.pack("<H", message_id)),
        (0x00000800, struct.pack("<H", 0x0101)),
    ])


def store_rq(sop_class: str, sop_instance: bytes, message_id: int = 1) -> bytes:
    return command([
        (0x00000002, sop_class.encode()),
        (0x00000100, struct.pack("<H", 0x0001)),
        (0x00000110, struct.pack("<H", message_id)),
        (0x00000700, struct.pack("<H", 0)),
        (0x00000800, struct.pack("<H", 0x0000)),
        (0x00001000, sop_instance),
    ])


def command_status(cmd: bytes) -> int | None:
    """The Status (0000,0900) of a command set, or None."""
    pos = 0
    while pos + 8 <= len(cmd):
        group, elem, length = struct.unpack_from("<HHL", cmd, pos)
        if group == 0 and elem == 0x0900 and length == 2:
            return int(struct.unpack_from("<H", cmd, pos + 8)[0])
        pos += 8 + length
    return None


# -- reading answers ------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What the SCP did: a PDU (``kind`` is its name), or ``closed``, ``reset``, ``silent``."""

    kind: str
    body: bytes = b""

    @property
    def reject(self) -> tuple[int, int, int] | None:
        """(result, source, reason) of an A-ASSOCIATE-RJ."""
        if self.kind != "A-ASSOCIATE-RJ" or len(self.body) < 4:
            return None
        return self.body[1], self.body[2], self.body[3]


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def read_answer(sock: socket.socket, timeout: float, max_body: int = 1 << 20) -> Answer:
    """Read one PDU within ``timeout`` s; a body longer than ``max_body`` is not read."""
    deadline = time.monotonic() + timeout
    try:
        head = _recv_exact(sock, 6, deadline)
        if head is None:
            return Answer("closed")
        kind, length = head[0], struct.unpack_from(">L", head, 2)[0]
        name = PDU_NAMES.get(kind, f"PDU 0x{kind:02X}")
        if length > max_body:
            return Answer(name)
        body = _recv_exact(sock, length, deadline)
        if body is None:
            return Answer("closed")
        return Answer(name, body)
    except (TimeoutError, socket.timeout):
        return Answer("silent")
    except ConnectionResetError:
        return Answer("reset")
    except OSError as exc:
        return Answer(f"error {errno.errorcode.get(exc.errno or 0, exc.errno)}")


def peer_gone(sock: socket.socket) -> str | None:
    """If the peer has closed, reset or sent an A-ABORT, say which; never blocks."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return None
        data = sock.recv(65536, socket.MSG_DONTWAIT | socket.MSG_PEEK)
        if not data:
            return "closed"
        if data[0] == ABORT:
            return "A-ABORT"
        sock.recv(len(data), socket.MSG_DONTWAIT)  # something else: drop it, look again later
        return None
    except BlockingIOError:
        return None
    except ConnectionResetError:
        return "reset"
    except OSError:
        return "closed"


def connect(target: Target, timeout: float) -> socket.socket:
    sock = socket.create_connection((target.host, target.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if target.tls is not None:
        try:
            return target.tls.wrap_socket(sock)  # the handshake, within ``timeout``
        except BaseException:
            sock.close()
            raise
    return sock


def insecure_tls() -> ssl.SSLContext:
    """A client context that checks nothing: a hostile peer on the TLS port does not care whose
    certificate it gets."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def close_quietly(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


@dataclass
class Association:
    """A raw association: the socket, the answer, and the accepted contexts {id: result}."""

    sock: socket.socket
    answer: Answer
    results: dict[int, int] = field(default_factory=dict)
    peer_max_pdu: int = 0

    @property
    def accepted(self) -> bool:
        return self.answer.kind == "A-ASSOCIATE-AC"


def associate(
    target: Target, contexts: Sequence[tuple[str, Sequence[str]]] | None = None, timeout: float = 5.0
) -> Association:
    """Connect and send an A-ASSOCIATE-RQ; the caller closes ``.sock`` (also when refused)."""
    sock = connect(target, timeout)
    try:
        sock.sendall(associate_rq(target.ae_title, contexts))
    except OSError:
        return Association(sock, Answer("reset"))
    answer = read_answer(sock, timeout)
    assoc = Association(sock, answer)
    if answer.kind == "A-ASSOCIATE-AC":
        pos, body = 68, answer.body
        while pos + 4 <= len(body):
            kind, length = body[pos], struct.unpack_from(">H", body, pos + 2)[0]
            if kind == 0x21 and pos + 8 <= len(body):
                assoc.results[body[pos + 4]] = body[pos + 6]
            elif kind == 0x50:
                sub = pos + 4
                while sub + 4 <= pos + 4 + length:
                    skind, slen = body[sub], struct.unpack_from(">H", body, sub + 2)[0]
                    if skind == 0x51 and slen == 4:
                        assoc.peer_max_pdu = int(struct.unpack_from(">L", body, sub + 4)[0])
                    sub += 4 + slen
            pos += 4 + length
    return assoc


def try_associate(target: Target, timeout: float = 5.0) -> Answer:
    """Ask for a Verification association and release it; return the SCP's answer."""
    assoc = associate(target, timeout=timeout)
    try:
        if assoc.accepted:
            assoc.sock.sendall(A_RELEASE_RQ)
            read_answer(assoc.sock, timeout)
    except OSError:
        pass
    finally:
        close_quietly(assoc.sock)
    return assoc.answer


def ensure_fds(n: int) -> None:
    """Raise our own soft descriptor limit to at least ``n`` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < n:
        want = n if hard == resource.RLIM_INFINITY else min(n, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

