"""Hostile peers at the connection level: a flood of bare connects, peers trickling a byte
a second, and memory bombs (a command that never ends, headers announcing PDUs that never
come)."""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable

from bench.hostile.wire import (
    ASSOCIATE_RQ,
    Target,
    associate,
    associate_rq,
    close_quietly,
    connect,
    echo_rq,
    ensure_fds,
    p_data,
    peer_gone,
    read_answer,
)

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
    ensure_fds(n + 256)
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
        shed = sum(1 for s in socks if peer_gone(s) is not None)
    finally:
        for s in socks:
            close_quietly(s)
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
            gone = peer_gone(sock)
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
                sock = connect(target, 5.0)
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
                close_quietly(sock)

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
            gone = peer_gone(sock)
            if gone is not None:
                return sent, gone
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                return sent, peer_gone(sock) or "reset"
            except OSError:
                return sent, "closed"
            sent += fragment
        # All sent: does the SCP end it now?
        answer = read_answer(sock, 2.0)
        return sent, None if answer.kind == "silent" else answer.kind
    finally:
        close_quietly(sock)


def header_bomb(target: Target, n: int = 200, *, length: int = 1 << 20, hold: float = 2.0) -> tuple[int, int]:
    """Open ``n`` connections, each sending only the 6-byte header of an A-ASSOCIATE-RQ
    announcing ``length`` bytes; hold them ``hold`` s; return (opened, dropped by the SCP)."""
    ensure_fds(n + 256)
    socks: list[socket.socket] = []
    header = struct.pack(">BBL", ASSOCIATE_RQ, 0, length)
    try:
        for _ in range(n):
            try:
                s = connect(target, 2.0)
                s.sendall(header)
                socks.append(s)
            except OSError:
                pass
        end = time.monotonic() + hold
        while time.monotonic() < end:
            time.sleep(0.05)  # holding on purpose
        dropped = sum(1 for s in socks if peer_gone(s) is not None)
    finally:
        for s in socks:
            close_quietly(s)
    return len(socks), dropped


def memory_bombs(
    target: Target, *, command_total: int = 384 << 20, headers: int = 200, header_length: int = 1 << 20
) -> BombReport:
    """A never-ending command, then A-ASSOCIATE-RQ headers announcing big PDUs."""
    sent, ended = command_bomb(target, command_total)
    opened, dropped = header_bomb(target, headers, length=header_length)
    return BombReport(sent, command_total, ended, opened, dropped)

