"""Hostile and heavy peers for a running Storage SCP, over real TCP.

Used by ``tests/test_soak.py`` (one behaviour per test) and ``scripts/soak`` (all of them in
the background of real DCMTK senders). Each generator talks to a :class:`Target` (host,
port, AE title), is bounded in time and in count, and is deterministic given its arguments
(``fuzz`` draws every case from ``random.Random`` seeded with ``seed`` and the case number,
so any case can be replayed alone). They report what the SCP did (answered, refused,
aborted, closed, stayed silent) and assert nothing: judging is the caller's business.

* :func:`connect_flood`: bare TCP connects, held open, never associating.
* :func:`slow_peers`: peers trickling one byte a second, before associating (an
  A-ASSOCIATE-RQ) or inside an association (a P-DATA-TF).
* :func:`command_bomb`, :func:`header_bomb`, :func:`memory_bombs`: a DIMSE command that
  never ends (P-DATA fragments without the last-fragment bit), and A-ASSOCIATE-RQ headers
  announcing large PDUs that never come.
* :func:`fuzz`: mutated A-ASSOCIATE-RQ / P-DATA-TF / A-RELEASE-RQ PDUs (bit flips,
  truncation, lying lengths, random PDU types, inserted and random bytes), each on its own
  connection, with a short read of the answer.
* :func:`hostile_store`: C-STOREs of objects whose SOP Instance UID holds byte 0xFF or ends
  in a newline, and one with unknown two-letter VRs sent twice (the second is a duplicate).
* :func:`echo_ok`, :func:`store_ok`: DCMTK ``echoscu``/``storescu`` round trips, timed;
  :func:`proc_stats`: descriptors, threads and memory of a process, from ``/proc``.

The PDUs are written by hand after PS3.8 9.3 (A-ASSOCIATE-RQ 9.3.2, P-DATA-TF 9.3.5,
A-RELEASE-RQ 9.3.6) and the commands after PS3.7 9.3.1/9.3.5, so that a generator can send
exactly the bytes it means to, including wrong ones.
"""

from __future__ import annotations

import errno
import os
import random
import re
import resource
import select
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

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
    """The SCP under test."""

    host: str
    port: int
    ae_title: str = DEFAULT_SCP_AE_TITLE


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


def _peer_gone(sock: socket.socket) -> str | None:
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


def _connect(target: Target, timeout: float) -> socket.socket:
    sock = socket.create_connection((target.host, target.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _close(sock: socket.socket) -> None:
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
    sock = _connect(target, timeout)
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
        _close(assoc.sock)
    return assoc.answer


def _ensure_fds(n: int) -> None:
    """Raise our own soft descriptor limit to at least ``n`` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < n:
        want = n if hard == resource.RLIM_INFINITY else min(n, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


# -- connect flood ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FloodReport:
    """``opened`` connects succeeded, ``failed`` did not (refused, timed out, no descriptor
    here); of the opened, ``shed`` were closed or reset by the SCP while held."""

    opened: int
    failed: int
    shed: int
    seconds: float
    while_held: object = None


def connect_flood(
    target: Target,
    n: int,
    rate: float,
    *,
    hold: float = 1.0,
    connect_timeout: float = 1.0,
    seconds: float | None = None,
    while_held: Callable[[], object] | None = None,
) -> FloodReport:
    """Open ``n`` bare TCP connections at ``rate`` per second and hold them open, never
    sending a byte; once all are made call ``while_held()`` (its result is reported), hold
    them ``hold`` s more, then close them all. Connects not made within ``seconds`` (by
    default n/rate + 5: an SCP that stopped accepting makes each wait ``connect_timeout``)
    count as failed without being tried."""
    _ensure_fds(n + 256)
    start = time.monotonic()
    give_up = start + (n / rate + 5.0 if seconds is None else seconds)
    socks: list[socket.socket] = []
    failed = 0
    try:
        for i in range(n):
            if time.monotonic() > give_up:
                failed += n - i
                break
            due = start + i / rate
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)  # pacing the flood on purpose
            try:
                socks.append(socket.create_connection((target.host, target.port), timeout=connect_timeout))
            except OSError:
                failed += 1
        result = while_held() if while_held is not None else None
        end = time.monotonic() + hold
        while time.monotonic() < end:
            time.sleep(min(0.1, max(0.0, end - time.monotonic())))
        shed = sum(1 for s in socks if _peer_gone(s) is not None)
    finally:
        for s in socks:
            _close(s)
    return FloodReport(len(socks), failed, shed, time.monotonic() - start, result)


# -- slow peers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlowPeer:
    """One trickling peer: ``dropped_after`` is the seconds from its first trickled byte
    until the SCP ended the connection (None: it never did within the run), ``how`` how it
    ended it (``A-ABORT``, ``closed``, ``reset``; for ``inside``, ``refused`` when the
    association was not accepted to begin with)."""

    mode: str
    index: int
    associated: bool
    bytes_sent: int
    dropped_after: float | None
    how: str | None


def _trickle(sock: socket.socket, data: bytes, rate: float, until: float) -> tuple[int, float | None, str | None]:
    """Send ``data`` one byte every 1/``rate`` s until the peer ends the connection or
    ``until``; return (bytes sent, seconds until dropped, how)."""
    start = time.monotonic()
    sent = 0
    while time.monotonic() < until:
        if sent < len(data):
            try:
                sock.send(data[sent : sent + 1])
                sent += 1
            except BrokenPipeError:
                return sent, time.monotonic() - start, "closed"
            except ConnectionResetError:
                return sent, time.monotonic() - start, "reset"
            except OSError:
                return sent, time.monotonic() - start, "closed"
        next_byte = start + sent / rate
        # Wait for the next byte's time, or for the SCP to say something.
        while True:
            gone = _peer_gone(sock)
            if gone is not None:
                return sent, time.monotonic() - start, gone
            left = min(next_byte, until) - time.monotonic()
            if left <= 0:
                break
            select.select([sock], [], [], min(left, 0.05))
    return sent, None, None


def slow_peers(
    target: Target,
    k: int,
    mode: str,
    *,
    rate: float = 1.0,
    seconds: float = 30.0,
    ready: threading.Event | None = None,
) -> list[SlowPeer]:
    """Run ``k`` peers trickling ``rate`` bytes a second for at most ``seconds``.

    ``mode`` "before": each connects and trickles an A-ASSOCIATE-RQ; "inside": each
    associates properly (Verification) and then trickles a P-DATA-TF holding a C-ECHO-RQ.
    ``ready`` is set once every peer has connected (before) or has its answer (inside),
    i.e. once the trickling has begun. Returns when every peer was dropped or ``seconds``
    have passed."""
    if mode not in ("before", "inside"):
        raise ValueError(f"mode {mode!r}: use 'before' or 'inside'")
    until = time.monotonic() + seconds
    started = threading.Semaphore(0)
    results: list[SlowPeer | None] = [None] * k

    def peer(i: int) -> None:
        sock: socket.socket | None = None
        try:
            if mode == "before":
                sock = _connect(target, 5.0)
                started.release()
                sent, after, how = _trickle(sock, associate_rq(target.ae_title), rate, until)
                results[i] = SlowPeer(mode, i, False, sent, after, how)
                return
            assoc = associate(target)
            sock = assoc.sock
            started.release()
            if not assoc.accepted:
                results[i] = SlowPeer(mode, i, False, 0, 0.0, f"refused ({assoc.answer.kind})")
                return
            sent, after, how = _trickle(sock, p_data((1, 0x03, echo_rq())), rate, until)
            results[i] = SlowPeer(mode, i, True, sent, after, how)
        except OSError as exc:
            started.release()
            results[i] = SlowPeer(mode, i, False, 0, 0.0, f"connect failed: {exc}")
        finally:
            if sock is not None:
                _close(sock)

    threads = [threading.Thread(target=peer, args=(i,), name=f"slow-{mode}-{i}", daemon=True) for i in range(k)]
    for t in threads:
        t.start()
    for _ in range(k):
        started.acquire(timeout=max(0.0, until - time.monotonic()))
    if ready is not None:
        ready.set()
    for t in threads:
        t.join(timeout=max(0.0, until - time.monotonic()) + 5)
    return [r if r is not None else SlowPeer(mode, i, False, 0, None, None) for i, r in enumerate(results)]


# -- memory bombs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BombReport:
    """``command_sent`` of ``command_total`` bytes of a never-ending command went out before
    the SCP ended the connection ``command_ended`` (``A-ABORT``, ``reset``, ``closed``; None
    if it took it all); of ``headers`` connections announcing a large A-ASSOCIATE-RQ,
    ``headers_dropped`` were closed by the SCP while held."""

    command_sent: int
    command_total: int
    command_ended: str | None
    headers: int
    headers_dropped: int


def command_bomb(
    target: Target, total: int = 384 << 20, *, fragment: int = 16384, seconds: float = 60.0
) -> tuple[int, str | None]:
    """Associate, then send P-DATA-TF PDUs of command fragments without the last-fragment
    bit, ``total`` bytes in all; return (bytes sent, how the SCP ended it or None)."""
    assoc = associate(target)
    sock = assoc.sock
    try:
        if not assoc.accepted:
            return 0, f"refused ({assoc.answer.kind})"
        if assoc.peer_max_pdu:
            fragment = min(fragment, assoc.peer_max_pdu - 6)
        chunk = p_data((1, 0x01, bytes(fragment)))  # command, not the last fragment
        sock.settimeout(10.0)
        sent = 0
        until = time.monotonic() + seconds
        while sent < total and time.monotonic() < until:
            gone = _peer_gone(sock)
            if gone is not None:
                return sent, gone
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                return sent, _peer_gone(sock) or "reset"
            except OSError:
                return sent, "closed"
            sent += fragment
        # All sent: does the SCP end it now?
        answer = read_answer(sock, 2.0)
        return sent, None if answer.kind == "silent" else answer.kind
    finally:
        _close(sock)


def header_bomb(target: Target, n: int = 200, *, length: int = 1 << 20, hold: float = 2.0) -> tuple[int, int]:
    """Open ``n`` connections, each sending only the 6-byte header of an A-ASSOCIATE-RQ
    announcing ``length`` bytes; hold them ``hold`` s; return (opened, dropped by the SCP)."""
    _ensure_fds(n + 256)
    socks: list[socket.socket] = []
    header = struct.pack(">BBL", ASSOCIATE_RQ, 0, length)
    try:
        for _ in range(n):
            try:
                s = _connect(target, 2.0)
                s.sendall(header)
                socks.append(s)
            except OSError:
                pass
        end = time.monotonic() + hold
        while time.monotonic() < end:
            time.sleep(0.05)  # holding on purpose
        dropped = sum(1 for s in socks if _peer_gone(s) is not None)
    finally:
        for s in socks:
            _close(s)
    return len(socks), dropped


def memory_bombs(
    target: Target, *, command_total: int = 384 << 20, headers: int = 200, header_length: int = 1 << 20
) -> BombReport:
    """A never-ending command, then A-ASSOCIATE-RQ headers announcing big PDUs."""
    sent, ended = command_bomb(target, command_total)
    opened, dropped = header_bomb(target, headers, length=header_length)
    return BombReport(sent, command_total, ended, opened, dropped)


# -- fuzz ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FuzzCase:
    """Case ``number``: ``kind`` is what was mutated (rq: sent instead of an A-ASSOCIATE-RQ;
    pdata, release: sent inside an accepted association), ``how`` the mutations."""

    number: int
    kind: str
    how: str
    data: bytes


@dataclass(frozen=True)
class FuzzReport:
    """How many cases ran and the SCP's answers, by answer and by mutation."""

    cases: int
    answers: Counter[str]
    mutations: Counter[str]
    not_associated: int
    seconds: float


_STORAGE_CONTEXTS = [
    (SOPClass.VERIFICATION, [TransferSyntax.IMPLICIT_LE]),
    (SOPClass.CT_IMAGE, [TransferSyntax.EXPLICIT_LE, TransferSyntax.IMPLICIT_LE]),
    (SOPClass.RT_STRUCTURE_SET, [TransferSyntax.IMPLICIT_LE]),
]


def _mutate(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    b = bytearray(data) or bytearray(rng.randbytes(rng.randint(1, 64)))  # a second mutation may get b""
    how = rng.choice(["bitflip", "bitflip", "truncate", "pdu_length", "item_length", "pdu_type", "insert", "garbage"])
    if how == "bitflip":
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(len(b))
            b[pos] ^= 1 << rng.randrange(8)
    elif how == "truncate":
        b = b[: rng.randrange(len(b))]
    elif how == "pdu_length":
        lie = rng.choice([0, 1, len(b) - 7, len(b) + rng.randint(1, 4096), 0xFFFFFFFF, 1 << 20, rng.getrandbits(32)])
        b[2:6] = struct.pack(">L", max(0, lie) & 0xFFFFFFFF)
    elif how == "item_length":
        # a 2- or 4-byte length somewhere past the PDU header (item, sub-item or PDV lengths)
        if len(b) > 8:
            pos = rng.randrange(6, len(b) - 2)
            if rng.random() < 0.5 or pos + 4 > len(b):
                b[pos : pos + 2] = struct.pack(">H", rng.choice([0, 1, 0xFFFF, rng.getrandbits(16)]))
            else:
                b[pos : pos + 4] = struct.pack(">L", rng.choice([0, 2, 0xFFFFFFFF, rng.getrandbits(32)]))
    elif how == "pdu_type":
        b[0] = rng.randrange(256)
    elif how == "insert":
        pos = rng.randrange(len(b) + 1)
        if rng.random() < 0.5:
            b[pos:pos] = rng.randbytes(rng.randint(1, 64))
        else:  # repeat a slice (duplicate items)
            a = rng.randrange(len(b))
            b[pos:pos] = b[a : a + rng.randint(1, 80)]
    else:
        b = bytearray(rng.randbytes(rng.randint(0, 300)))
    return how, bytes(b)


def fuzz_cases(called: str, seed: int, first: int, n: int) -> Iterator[FuzzCase]:
    """Cases ``first`` .. ``first + n - 1`` of the run ``seed``; each depends on (seed,
    number) alone."""
    for number in range(first, first + n):
        rng = random.Random(f"{seed}:{number}")
        kind = rng.choices(["rq", "pdata", "release"], weights=[50, 35, 15])[0]
        if kind == "rq":
            base = associate_rq(called, rng.choice([None, _STORAGE_CONTEXTS]))
        elif kind == "pdata":
            if rng.random() < 0.5:
                base = p_data((1, 0x03, echo_rq(rng.randint(1, 65535))))
            else:
                uid = f"2.25.{rng.getrandbits(100)}".encode()
                base = p_data((3, 0x03, store_rq(SOPClass.CT_IMAGE, uid)), (3, 0x00, rng.randbytes(200)))
        else:
            base = A_RELEASE_RQ
        hows = []
        data = base
        for _ in range(1 if rng.random() < 0.8 else 2):
            how, data = _mutate(rng, data)
            hows.append(how)
        yield FuzzCase(number, kind, "+".join(hows), data)


def _run_case(target: Target, case: FuzzCase, read_timeout: float) -> tuple[str, bool]:
    """Send one case on its own connection; return (answer, associated first)."""
    sock: socket.socket | None = None
    try:
        if case.kind == "rq":
            sock = _connect(target, 5.0)
        else:
            assoc = associate(target, _STORAGE_CONTEXTS)
            sock = assoc.sock
            if not assoc.accepted:
                return assoc.answer.kind, False
        try:
            sock.sendall(case.data)
        except OSError:
            return "reset", True
        return read_answer(sock, read_timeout, max_body=1 << 16).kind, True
    except OSError as exc:
        return f"connect failed ({exc.strerror})", False
    finally:
        if sock is not None:
            _close(sock)


def fuzz(
    target: Target, seed: int, n: int, *, first: int = 0, workers: int = 4, read_timeout: float = 0.25
) -> FuzzReport:
    """Send cases ``first`` .. ``first + n - 1`` of the run ``seed``, ``workers`` at a time,
    each on its own connection, reading the answer for up to ``read_timeout`` s."""
    start = time.monotonic()
    cases = list(fuzz_cases(target.ae_title, seed, first, n))
    answers: Counter[str] = Counter()
    mutations: Counter[str] = Counter(c.how for c in cases)
    not_associated = 0
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fuzz") as pool:
        for answer, associated in pool.map(lambda c: _run_case(target, c, read_timeout), cases):
            answers[answer] += 1
            if not associated:
                not_associated += 1
    return FuzzReport(len(cases), answers, mutations, not_associated, time.monotonic() - start)


# -- hostile values -----------------------------------------------------------------------------


@dataclass(frozen=True)
class HostileResult:
    """One hostile C-STORE: the answer (``P-DATA-TF`` when a C-STORE-RSP came), its status."""

    label: str
    answer: str
    status: int | None
    seconds: float


def _ct_dataset(sop_instance_uid: str, seed: int):  # type: ignore[no-untyped-def]
    """A small generated CT image (16x16) with the given SOP Instance UID."""
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    rng = random.Random(seed)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = str(SOPClass.CT_IMAGE)
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyDate = "20260101"
    ds.Modality = "CT"
    ds.PatientName = "Hostile^Values"
    ds.PatientID = "HOSTILE-1"
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[f"hostile-study-{seed}"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[f"hostile-series-{seed}"])
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = [0.0, 0.0, 0.0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = 1.0
    ds.Rows, ds.Columns = 16, 16
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 0
    ds.PixelData = rng.randbytes(16 * 16 * 2)
    return ds


def _encode(ds, ts: str) -> bytes:  # type: ignore[no-untyped-def]
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buf = DicomBytesIO()
    buf.is_little_endian = True
    buf.is_implicit_VR = ts == TransferSyntax.IMPLICIT_LE
    write_dataset(buf, ds)
    return bytes(buf.getvalue())


def hostile_objects(seed: int = 0) -> list[tuple[str, str, bytes, bytes]]:
    """(label, transfer syntax, SOP Instance UID bytes, data set) of each hostile object:
    the UID with byte 0xFF and the UID ending in a newline are the same bytes in the
    command and the data set; the unknown-VR object carries private elements of VR ``LK``
    and ``TS`` (Explicit VR LE)."""
    from pydicom.uid import generate_uid

    out = []
    for label, last in (("uid-0xFF", b"\xff"), ("uid-newline", b"\n")):
        placeholder = str(generate_uid(entropy_srcs=[f"hostile-{label}-{seed}"]))
        if len(placeholder) % 2:
            placeholder = placeholder[:-1]
        uid = placeholder.encode()[:-1] + last  # same length: the encoded lengths stay right
        body = _encode(_ct_dataset(placeholder, seed), TransferSyntax.IMPLICIT_LE)
        assert body.count(placeholder.encode()) == 1
        out.append((label, str(TransferSyntax.IMPLICIT_LE), uid, body.replace(placeholder.encode(), uid)))
    from pydicom.dataset import Dataset

    uid_s = generate_uid(entropy_srcs=[f"hostile-vr-{seed}"])
    ds = _ct_dataset(uid_s, seed)
    low, high = Dataset(), Dataset()
    for elem in ds:
        (low if elem.tag < 0x00110000 else high).add(elem)
    private = (
        struct.pack("<HH", 0x0011, 0x0010) + b"LO" + struct.pack("<H", 8) + b"HOSTILE "
        + struct.pack("<HH", 0x0011, 0x1001) + b"LK" + struct.pack("<H", 4) + b"ABCD"
        + struct.pack("<HH", 0x0011, 0x1002) + b"TS" + struct.pack("<H", 4) + b"WXYZ"
    )
    body = _encode(low, TransferSyntax.EXPLICIT_LE) + private + _encode(high, TransferSyntax.EXPLICIT_LE)
    for label in ("vr-LK-TS", "vr-LK-TS-again"):
        out.append((label, str(TransferSyntax.EXPLICIT_LE), uid_s.encode(), body))
    return out


def hostile_store(target: Target, *, seed: int = 0, timeout: float = 10.0) -> list[HostileResult]:
    """Send each of :func:`hostile_objects` in a C-STORE on its own association and wait up
    to ``timeout`` s for the C-STORE-RSP."""
    results = []
    for label, ts, uid, body in hostile_objects(seed):
        start = time.monotonic()
        assoc = associate(target, [(SOPClass.CT_IMAGE, [ts])], timeout=timeout)
        sock = assoc.sock
        try:
            if not assoc.accepted or assoc.results.get(1) != 0:
                results.append(HostileResult(label, f"refused ({assoc.answer.kind})", None, time.monotonic() - start))
                continue
            fragment = min(CLIENT_MAX_PDU, (assoc.peer_max_pdu or CLIENT_MAX_PDU)) - 12
            sock.sendall(p_data((1, 0x03, store_rq(SOPClass.CT_IMAGE, uid))))
            for pos in range(0, len(body), fragment):
                last = pos + fragment >= len(body)
                sock.sendall(p_data((1, 0x02 if last else 0x00, body[pos : pos + fragment])))
            answer = read_answer(sock, timeout)
            status = None
            if answer.kind == "P-DATA-TF" and len(answer.body) > 6:
                status = command_status(answer.body[6:])
                try:
                    sock.sendall(A_RELEASE_RQ)
                    read_answer(sock, timeout)
                except OSError:
                    pass
            results.append(HostileResult(label, answer.kind, status, time.monotonic() - start))
        except OSError as exc:
            results.append(HostileResult(label, f"error ({exc.strerror})", None, time.monotonic() - start))
        finally:
            _close(sock)
    return results


# -- the process and the round trips ---------------------------------------------------------------


@dataclass(frozen=True)
class ProcStats:
    """Open descriptors, threads, resident memory and its high-water mark (bytes)."""

    fds: int
    threads: int
    rss: int
    hwm: int


def proc_stats(pid: int) -> ProcStats:
    """Read ``/proc/PID``; raises ProcessLookupError-like OSError if the process is gone."""
    fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()

    def kib(key: str) -> int:
        return int(fields.get(key, "0 kB").split()[0]) * 1024

    return ProcStats(fds, int(fields["Threads"]), kib("VmRSS"), kib("VmHWM"))


def open_files(pid: int) -> Counter[str]:
    """What a process's descriptors point at, by kind: ``socket``, ``index`` (the SQLite
    index, its -wal and -shm), ``pipe``, ``anon`` (epoll and the like), ``file``."""
    kinds: Counter[str] = Counter()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if link.startswith("socket:"):
            kinds["socket"] += 1
        elif link.startswith("pipe:"):
            kinds["pipe"] += 1
        elif link.startswith("anon_inode:"):
            kinds["anon"] += 1
        elif Path(link).name.startswith("index.sqlite"):
            kinds["index"] += 1
        else:
            kinds["file"] += 1
    return kinds


@dataclass(frozen=True)
class RoundTrip:
    """A DCMTK round trip: ``ok`` when it succeeded within the limit; ``detail`` says why not."""

    ok: bool
    seconds: float
    detail: str


def _dcmtk(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise RuntimeError(f"DCMTK's {tool} is not installed (Debian package dcmtk)")
    return path


_DCMTK_ENV = {"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"}


def echo_ok(host: str, port: int, aet: str, timeout: float = 1.0) -> RoundTrip:
    """One C-ECHO by ``echoscu``: ok if answered with success within ``timeout`` s (the
    process's own start included)."""
    t = str(max(1, int(timeout * 3)))
    cmd = [_dcmtk("echoscu"), "-aet", "SOAK_ECHO", "-aec", aet, "-to", t, "-ta", t, "-td", t, host, str(port)]
    return _timed(cmd, timeout, lambda out: None)


_STORE_RSP = re.compile(r"Received Store Response \(([^)]*)\)")


def store_status(output: str) -> list[str]:
    """The statuses of the C-STORE responses in ``storescu -v`` output ("Success", ...)."""
    return _STORE_RSP.findall(output)


def store_ok(host: str, port: int, aet: str, path: Path, timeout: float = 1.0) -> RoundTrip:
    """One C-STORE of ``path`` by ``storescu`` (only its own SOP class proposed): ok if
    answered with success (or a warning) within ``timeout`` s."""
    t = str(max(1, int(timeout * 3)))
    cmd = [_dcmtk("storescu"), "-v", "-R", "-aet", "SOAK_STORE", "-aec", aet, "-to", t, "-ta", t, "-td", t,
           host, str(port), str(path)]

    def check(out: str) -> str | None:
        statuses = store_status(out)
        if not statuses:
            return "no C-STORE response"
        if not all(s == "Success" or s.startswith("Warning") for s in statuses):
            return f"C-STORE answered {', '.join(statuses)}"
        return None

    return _timed(cmd, timeout, check)


def _timed(cmd: list[str], limit: float, check: Callable[[str], str | None]) -> RoundTrip:
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace",
                              timeout=max(limit * 3, 5.0), env=_DCMTK_ENV)
    except subprocess.TimeoutExpired:
        return RoundTrip(False, time.monotonic() - start, f"{Path(cmd[0]).name} did not finish")
    seconds = time.monotonic() - start
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        last = output.strip().splitlines()[-1:] or [""]
        return RoundTrip(False, seconds, f"{Path(cmd[0]).name} exited {proc.returncode}: {last[0]}")
    problem = check(output)
    if problem:
        return RoundTrip(False, seconds, problem)
    if seconds > limit:
        return RoundTrip(False, seconds, f"answered after {seconds:.2f} s (limit {limit:.1f} s)")
    return RoundTrip(True, seconds, "ok")


def fresh_copy(source: Path, folder: Path, number: int, seed: int = 0) -> Path:
    """Write ``source`` to ``folder`` with a new SOP Instance UID (deterministic in
    ``seed`` and ``number``), as a scanner sends a new image; return the new file."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(source)
    uid = generate_uid(entropy_srcs=[f"soak-{seed}-{source.name}-{number}"])
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{source.stem}-{number}.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out
