"""Our association acceptor, the Storage SCP's network side: it accepts connections, reads
their A-ASSOCIATE-RQs, negotiates, and gives each association a thread that dispatches every
DIMSE request to its row of the service table, :data:`appliance.net.dimse.SERVICES` (C-ECHO,
C-STORE; how to add C-FIND is written there). The PDUs, reading them under deadlines and
reassembling messages are :mod:`appliance.net.ul` (PS3.8); command sets and the services'
handlers are :mod:`appliance.net.dimse` (PS3.7).

This replaces pynetdicom's acceptor on the receive path, for three reasons the benchmarks
and the robustness tests showed:

* **Speed.** pynetdicom spends 5-7 ms of CPU per CT image in its event queues and polling
  loops; DCMTK spends about 1.3 ms. Here an association's thread reads PDUs with blocking
  ``recv_into`` and streams P-DATA straight into the object's temp file.
* **Memory.** A data set is never held in memory, so a 1 GiB object is received in a few
  MiB of buffers.
* **Slots and timing.** Only peers that have sent a valid A-ASSOCIATE-RQ hold an association
  slot, and the free-space check happens when the C-STORE command arrives, before the data
  set is stored.

pynetdicom still decodes and encodes the association PDUs (A-ASSOCIATE-RQ/AC/RJ) and
negotiates presentation contexts, so that logic is not written twice.

**Bounded everything** (the ``[scp]`` settings, :class:`~appliance.config.ScpConfig`). One thread, ``scp-accept``,
accepts connections and reads their A-ASSOCIATE-RQs without blocking, each into a buffer
that grows only as bytes arrive (never from a length the peer announced), up to
``max_associate_rq_bytes``, and by a deadline of ``acse_timeout`` from the connect. At most
``max_pending_connections`` such connections are kept (the oldest is closed). Only an
accepted association gets a thread, so threads are bounded by ``max_associations``. Inside an
association: ``network_timeout`` of silence, ``pdu_timeout`` for one whole PDU once it has
started, ``idle_timeout`` without completing a DIMSE message, ``max_command_bytes`` for a
command set, and the PDU size we advertised. When the process runs out of descriptors
(EMFILE), the accept loop sheds the oldest pending connections, backs off briefly and goes
on; it never ends but at :meth:`Acceptor.stop`.

**DICOM TLS** (:meth:`Acceptor.listen_tls`, :mod:`appliance.tls`). The TLS port's connections
are accepted by the same loop, but their handshake runs in a thread of the connection's own
(at most ``max_pending_connections`` at once; beyond that a new one is closed), with the
``acse_timeout`` deadline from the connect covering the handshake and the whole
A-ASSOCIATE-RQ; a failed handshake is one log line with the peer's address and the reason
in words, and an audit event. From the A-ASSOCIATE-RQ on, a TLS association is served by
the same code: :class:`~appliance.tls.DicomTlsSocket` reads under the same deadlines.

**Known peers** (``scp.require_known_peers``, ``[[peer]]``): an association from an unknown
calling AE title, from a known one at an address not its own, or over TLS without the
certificate its entry names, is rejected (rejected-permanent, service user, calling AE
title not recognised), logged and audited. Every association goes into the audit trail at
its end (peer, AE titles, TLS or not, result, objects stored), rejected ones too; the
supervisor's own C-ECHO from loopback does not.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import selectors
import socket
import ssl
import struct
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Mapping, Sequence

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification, SCP_SCU_RoleSelectionNegotiation
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from appliance import audit
from appliance.config import Peer, ScpConfig
from appliance.conformance import (
    APPLICATION_CONTEXT_NAME,
    SCP_CONTEXTS,
    SCP_STORAGE_CLASSES,
    PresentationContextRow,
    SOPClass,
)
from appliance.net.dimse import (
    SERVICES,
    Link,
    Message,
    OpenStream,
    Request,
    Service,
    StorageContext,
    StoreResult,
    service_for,
)
from appliance.net.negotiation import Negotiated, NegotiationCache, for_request
from appliance.tls import PeerCertificate, describe
from appliance.net.ul import (
    A_ASSOCIATE_RQ_PDU,
    ABORT_SERVICE_PROVIDER,
    ABORT_SERVICE_USER,
    MIN_ASSOCIATE_RQ,
    PDU_HEADER_BYTES,
    REJECT_APPLICATION_CONTEXT,
    REJECT_CALLED_AE,
    REJECT_CALLING_AE,
    REJECT_LOCAL_LIMIT,
    REJECT_PROTOCOL_VERSION,
    REJECT_REASONS,
    DataSetSink,
    DeadlineExpired,
    PduReader,
    ProtocolError,
    QuietPynetdicom,
    RateLimitedLog,
    abort_pdu,
    associate_ac_pdu,
    clock,
    close,
    pynetdicom_loggers,
    reject_pdu,
    send_and_close,
    send_quietly,
    serve_p_data,
    shutdown,
)

log = logging.getLogger(__name__)

#: Connections accepted in one go before the loop looks at its other work.
_ACCEPT_BURST = 64
#: Seconds the accept loop pauses after running out of descriptors.
_EMFILE_BACKOFF = 0.1
#: Seconds without EMFILE after which a burst of them is over (and logged as such).
_BURST_QUIET = 10.0
#: Seconds of accept(2) failing for want of descriptors, without one success, after which
#: the acceptor reports that it is not accepting.
_STUCK_AFTER = 10.0
#: Errors of accept(2) that mean "out of descriptors or memory": shed, back off, go on.
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: A peer's repeated protocol errors are logged once per this many seconds.
_LOG_EVERY = 60.0
#: The calling AE title of the supervisor's own C-ECHO (``appliance.ops.health``), which from
#: a loopback address is never logged above DEBUG: it comes every few seconds.
SELF_CHECK_AE_TITLE = "APPLIANCE_CHECK"
#: Seconds between two INFO lines for verification-only associations from one peer (calling
#: AE title and address); the ones in between are DEBUG.
ECHO_LOG_INTERVAL = 3600.0
#: Peers remembered for that (least recently seen forgotten first), so that peers
#: inventing AE titles or addresses cannot grow the SCP's memory over months of running.
MAX_PEERS_REMEMBERED = 4096


@dataclass(frozen=True)
class AcceptorState:
    """What the acceptor reports of itself (for the supervisor's health check)."""

    accepting: bool
    #: Why it is not accepting, or what went wrong last ("" when nothing did).
    problem: str
    associations: int
    pending: int
    #: Connections closed unserved because descriptors ran out or too many were pending.
    shed: int
    associations_served: int
    #: Outcome of the last C-STORE: "" (none yet), "ok", or the refusal's status and comment.
    last_store: str
    last_store_at: float


@dataclass
class Association:
    """One accepted association (internal bookkeeping)."""

    calling_ae: str
    peer: str
    contexts: dict[int, PresentationContext]
    peer_max_pdu: int
    touched_series: set[str] = field(default_factory=set)
    #: Storage contexts on which we act as SCU (SCP/SCU Role Selection, for C-GET).
    storage: tuple[StorageContext, ...] = ()
    #: Requests answered, by service name ("C-ECHO", "C-STORE").
    requests: Counter[str] = field(default_factory=Counter)
    called_ae: str = ""
    #: "TLSv1.3 TLS_AES_256_GCM_SHA384, certificate CN=..." over TLS, else "".
    tls: str = ""
    #: Objects stored (C-STOREs answered with success).
    stored: int = 0

    @property
    def verification_only(self) -> bool:
        return all(str(cx.abstract_syntax) == SOPClass.VERIFICATION for cx in self.contexts.values())

    @property
    def log_level(self) -> int:
        """INFO for associations that can store; DEBUG for verification-only ones (the
        health check echoes every few seconds and would drown the journal; :class:`PeerLog`
        writes their one INFO line when a peer is new, and once an interval after that)."""
        return logging.DEBUG if self.verification_only else logging.INFO

    def summary(self, released: bool) -> str:
        """What the association did, in words: ``C-ECHO answered``, ``20 C-STORE requests answered``."""
        done = [name if n == 1 else f"{n} {name} requests" for name, n in self.requests.items()]
        words = f"{', '.join(done)} answered" if done else "no request"
        return words if released else f"{words}, then aborted by the peer"


@dataclass
class _Seen:
    last_info: float  # when the peer's last INFO line was written
    since: int = 0  # associations from it since then


class PeerLog:
    """The INFO line that makes a new peer visible: the first association from each calling
    AE title and address, whatever it did, and then for verification-only associations at most
    one line per ``every`` seconds, so that an admin's ``echoscu`` from a new system shows in
    the journal but a monitoring system's echo every few seconds does not fill it. The
    supervisor's own echo (:data:`SELF_CHECK_AE_TITLE` from loopback) is never noted. At most
    ``max_peers`` are remembered, the least recently seen forgotten first."""

    def __init__(self, every: float = ECHO_LOG_INTERVAL, max_peers: int = MAX_PEERS_REMEMBERED) -> None:
        self.every = every
        self.max_peers = max_peers
        self._seen: OrderedDict[tuple[str, str], _Seen] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def note(self, assoc: Association, released: bool, now: float | None = None) -> None:
        """Log ``assoc``'s INFO line if it is due (at its end); otherwise nothing."""
        host = _host(assoc.peer)
        if assoc.calling_ae == SELF_CHECK_AE_TITLE and _is_loopback(host):
            return
        now = clock() if now is None else now
        key = (assoc.calling_ae, host)
        with self._lock:
            seen = self._seen.get(key)
            if seen is None:
                self._seen[key] = _Seen(now)
                while len(self._seen) > self.max_peers:
                    self._seen.popitem(last=False)
            else:
                self._seen.move_to_end(key)
                seen.since += 1
                if not assoc.verification_only or now - seen.last_info < self.every:
                    return  # a storing association has its own INFO lines
                since, ago = seen.since, now - seen.last_info
                seen.last_info, seen.since = now, 0
        if seen is None:
            log.info("first association from %s at %s: %s", assoc.calling_ae, host, assoc.summary(released))
        else:
            log.info("association from %s at %s: %s (%d association(s) from it in the last %.0f min)",
                     assoc.calling_ae, host, assoc.summary(released), since, ago / 60)


@dataclass
class _Pending:
    """A connection that has not yet sent its whole A-ASSOCIATE-RQ."""

    sock: socket.socket
    peer: str
    deadline: float
    buf: bytearray = field(default_factory=bytearray)
    need: int = PDU_HEADER_BYTES  # the PDU header first, then the whole PDU


# -- the acceptor -------------------------------------------------------------------------


class Acceptor:
    """Accepts associations on a listening socket and serves the rows of ``services``
    (C-ECHO and C-STORE; the Storage Server adds Query/Retrieve's) on ``contexts``.
    ``storage_roles``: accept SCP/SCU Role Selection for the storage classes, so that a
    C-GET requestor can take the SCP role and we send it C-STORE requests."""

    def __init__(self, settings: ScpConfig, open_stream: OpenStream,
                 on_association_end: Callable[[Association], None] | None = None, *,
                 services: Mapping[int, Service] = SERVICES,
                 contexts: Sequence[PresentationContextRow] = SCP_CONTEXTS,
                 storage_roles: bool = False) -> None:
        self.settings = settings
        self.open_stream = open_stream
        self.on_association_end = on_association_end
        self.services = services
        self.storage_roles = storage_roles
        self._supported = [
            PresentationContext() for _ in contexts
        ]
        for cx, row in zip(self._supported, contexts):
            cx.abstract_syntax = str(row.abstract_syntax)
            cx.transfer_syntax = [str(ts) for ts in row.transfer_syntaxes]
            if storage_roles and row.abstract_syntax in SCP_STORAGE_CLASSES:
                cx.scu_role = cx.scp_role = True  # the requestor may be SCU, SCP or both
        self._lock = threading.Lock()
        # Sockets of accepted associations, and their threads.
        self._associated: dict[socket.socket, threading.Thread] = {}
        # Connections still sending their A-ASSOCIATE-RQ, oldest first (accept thread only).
        self._pending: OrderedDict[socket.socket, _Pending] = OrderedDict()
        self._listener: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self._accept_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._wake_r: socket.socket | None = None  # stop() wakes the accept thread through these
        self._wake_w: socket.socket | None = None
        self._quiet = QuietPynetdicom()
        #: What each kind of A-ASSOCIATE-RQ was negotiated into (see appliance.net.negotiation).
        self._negotiations = NegotiationCache()
        self._ratelimited = RateLimitedLog(log, _LOG_EVERY)
        self._peers = PeerLog()
        self._out_of_fds_since: float | None = None  # backing off since
        self._burst_last: float | None = None  # the last EMFILE of a burst still logged as one
        self._failing_since: float | None = None  # EMFILE without an accept in between
        self._shed_in_burst = 0
        self._shed = 0
        self._served = 0
        self._problem = ""
        self._last_store = ""
        self._last_store_at = 0.0
        #: Known peers (``[[peer]]``), checked when ``settings.require_known_peers``.
        self.peers: tuple[Peer, ...] = ()
        #: Where association events go (:func:`appliance.audit.record` bound to a data dir).
        self.audit: Callable[[audit.Event], None] | None = None
        self._tls_listener: socket.socket | None = None
        self._tls_context: ssl.SSLContext | None = None
        # TLS connections in their handshake or A-ASSOCIATE-RQ, each in its own thread.
        self._handshaking: dict[int, socket.socket] = {}

    # -- lifecycle ------------------------------------------------------------------

    def listen(self, host: str, port: int, sock: socket.socket | None = None) -> tuple[str, int]:
        """Bind (or use the already bound ``sock``) and start accepting in a background
        thread; return the bound address."""
        sock = _listening(host, port, sock)
        self._listener = sock
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._selector.register(sock, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        for logger in pynetdicom_loggers():
            logger.addFilter(self._quiet)
        self._accept_thread = threading.Thread(target=self._accept_loop, name="scp-accept", daemon=True)
        self._accept_thread.start()
        addr = sock.getsockname()
        return str(addr[0]), int(addr[1])

    def listen_tls(self, host: str, port: int, context: ssl.SSLContext,
                   sock: socket.socket | None = None) -> tuple[str, int]:
        """Also accept DICOM TLS on ``host``:``port`` (or the already bound ``sock``);
        call after :meth:`listen`. Return the bound address."""
        assert self._selector is not None, "listen() first"
        sock = _listening(host, port, sock)
        self._tls_context = context
        self._tls_listener = sock
        self._selector.register(sock, selectors.EVENT_READ)
        if self._wake_w is not None:  # the accept thread selects on the new listener from now on
            send_quietly(self._wake_w, b"x")
        addr = sock.getsockname()
        return str(addr[0]), int(addr[1])

    def associated(self) -> int:
        """Number of associations holding a slot."""
        with self._lock:
            return len(self._associated)

    def state(self) -> AcceptorState:
        """A snapshot of how the acceptor is doing."""
        thread = self._accept_thread
        alive = thread is not None and thread.is_alive()
        with self._lock:
            return AcceptorState(
                accepting=alive and not self._stopping.is_set() and (
                    self._failing_since is None or clock() - self._failing_since < _STUCK_AFTER),
                problem=self._problem if alive or self._stopping.is_set() else
                (self._problem or "the accept loop has ended"),
                associations=len(self._associated),
                pending=len(self._pending) + len(self._handshaking),
                shed=self._shed,
                associations_served=self._served,
                last_store=self._last_store,
                last_store_at=self._last_store_at,
            )

    def stop(self, grace: float) -> None:
        """Stop accepting; give associations ``grace`` seconds, then abort them."""
        self._stopping.set()
        if self._wake_w is not None:
            send_quietly(self._wake_w, b"x")
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
        if self._tls_listener is not None:
            self._tls_listener.close()
        with self._lock:
            handshaking = list(self._handshaking.values())
        for hs in handshaking:
            shutdown(hs)
        for p in list(self._pending.values()):  # connected, never associated: just close
            close(p.sock)
        self._pending.clear()
        deadline = clock() + grace
        while self.associated() and clock() < deadline:
            time.sleep(0.05)
        with self._lock:
            remaining = list(self._associated.items())
        for s, _ in remaining:
            # Not over TLS: the association's thread may be inside OpenSSL reading the same
            # connection, which must not be written from a second thread; it is just closed.
            if not isinstance(s, ssl.SSLSocket):
                try:
                    s.sendall(abort_pdu(ABORT_SERVICE_USER))
                except OSError:
                    pass
            shutdown(s)
        for _, t in remaining:
            t.join(timeout=5)
        if self._selector is not None:
            self._selector.close()
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        for logger in pynetdicom_loggers():
            logger.removeFilter(self._quiet)

    # -- the accept thread ----------------------------------------------------------------

    def _accept_loop(self) -> None:
        """Accept and read A-ASSOCIATE-RQs until :meth:`stop`. Whatever goes wrong in one
        round is logged and the loop goes on: a Storage SCP that stops accepting while its
        process lives is the worst failure it can have."""
        self._quiet.threads.add(threading.get_ident())
        failures = 0
        while not self._stopping.is_set():
            try:
                self._accept_round()
                failures = 0
            except Exception as exc:  # noqa: BLE001 - the loop must outlive any one round
                failures += 1
                with self._lock:
                    self._problem = f"accepting failed: {type(exc).__name__}: {exc}"
                log.exception("the accept loop failed (%d time(s) in a row); going on", failures)
                self._stopping.wait(min(5.0, 0.1 * 2**failures))

    def _accept_round(self) -> None:
        assert self._selector is not None and self._listener is not None
        now = clock()
        timeout = 1.0
        if self._pending:
            timeout = min(timeout, max(0.0, min(p.deadline for p in self._pending.values()) - now))
        if self._out_of_fds_since is not None:
            timeout = min(timeout, _EMFILE_BACKOFF)
        for key, _ in self._selector.select(timeout):
            if self._stopping.is_set():
                return
            if key.fileobj is self._listener:
                self._accept_burst()
            elif key.fileobj is self._tls_listener:
                self._accept_burst(tls=True)
            elif key.fileobj is self._wake_r:
                assert self._wake_r is not None
                self._wake_r.recv(64)
            else:
                pending = self._pending.get(key.fileobj)  # type: ignore[call-overload]
                if pending is not None:
                    self._read_pending(pending)
        now = clock()
        self._expire(now)
        if self._out_of_fds_since is not None and now - self._out_of_fds_since >= _EMFILE_BACKOFF:
            self._resume_accepting()
        if self._burst_last is not None and now - self._burst_last >= _BURST_QUIET:
            self._burst_last = None
            with self._lock:
                self._problem = ""
            log.warning("accepting connections normally again; %d waiting connection(s) were closed "
                        "to make room", self._shed_in_burst)
            self._shed_in_burst = 0

    def _accept_burst(self, tls: bool = False) -> None:
        listener = self._tls_listener if tls else self._listener
        assert listener is not None
        for _ in range(_ACCEPT_BURST):
            try:
                conn, addr = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRNOS:
                    self._out_of_descriptors(exc)
                    return
                if self._stopping.is_set():
                    return
                # ECONNABORTED, EPROTO, EPERM (firewall): this one connection is gone.
                self._ratelimited(logging.INFO, "accept", "a connection could not be accepted: %s", exc.strerror)
                continue
            self._failing_since = None
            if tls:
                self._start_tls(conn, f"{addr[0]}:{addr[1]}")
            else:
                self._add_pending(conn, f"{addr[0]}:{addr[1]}")

    def _out_of_descriptors(self, exc: OSError) -> None:
        """accept(2) failed for want of descriptors: close the oldest connections that have
        not associated, and stop polling the listener for a moment (its backlog would wake
        us at once). Logged once per burst."""
        now = clock()
        if self._burst_last is None:
            log.warning("out of resources accepting connections (%s) with %d association(s) and %d "
                        "connection(s) waiting to associate; closing the oldest waiting ones",
                        exc.strerror, self.associated(), len(self._pending))
            self._shed_in_burst = 0
        self._burst_last = now
        if self._failing_since is None:
            self._failing_since = now
        if self._out_of_fds_since is None:
            assert self._selector is not None and self._listener is not None
            self._selector.unregister(self._listener)
            if self._tls_listener is not None:
                self._selector.unregister(self._tls_listener)
        self._out_of_fds_since = now
        with self._lock:
            self._problem = f"out of descriptors accepting connections ({exc.strerror})"
        for _ in range(max(1, len(self._pending) // 4)):
            if not self._pending:
                break
            self._shed_oldest()

    def _resume_accepting(self) -> None:
        if self._out_of_fds_since is None:
            return
        assert self._selector is not None and self._listener is not None
        for listener in (self._listener, self._tls_listener):
            if listener is None:
                continue
            try:
                self._selector.register(listener, selectors.EVENT_READ)
            except KeyError:
                pass
        self._out_of_fds_since = None

    def _shed_oldest(self) -> None:
        _, pending = self._pending.popitem(last=False)
        self._drop_pending(pending)
        with self._lock:
            self._shed += 1
        self._shed_in_burst += 1

    def _add_pending(self, conn: socket.socket, peer: str) -> None:
        assert self._selector is not None
        conn.setblocking(False)
        self._pending[conn] = _Pending(conn, peer, clock() + self.settings.acse_timeout)
        self._selector.register(conn, selectors.EVENT_READ)
        if len(self._pending) > self.settings.max_pending_connections:
            # A flood of connects that never associate: drop the oldest, so a scanner
            # (which sends its A-ASSOCIATE-RQ at once) always gets its turn.
            if self._burst_last is None:
                self._ratelimited(logging.WARNING, "pending",
                                  "%d connections have not asked to associate; closing the oldest",
                                  len(self._pending))
            self._shed_oldest()

    # -- TLS connections: handshake and A-ASSOCIATE-RQ in a thread of their own -------------

    def _start_tls(self, conn: socket.socket, peer: str) -> None:
        """Give a new TLS connection a thread for its handshake (never run here, in the
        accept loop); at most ``max_pending_connections`` at once."""
        deadline = clock() + self.settings.acse_timeout
        with self._lock:
            full = len(self._handshaking) >= self.settings.max_pending_connections
        if full:
            self._ratelimited(logging.WARNING, "tls-pending",
                              "%d TLS connections are still in their handshake; closed the new one from %s",
                              self.settings.max_pending_connections, peer)
            close(conn)
            return
        thread = threading.Thread(target=self._tls_connection, args=(conn, peer, deadline),
                                  name=f"tls-{peer}", daemon=True)
        with self._lock:
            self._handshaking[id(thread)] = conn
        try:
            thread.start()
        except RuntimeError:
            with self._lock:
                self._handshaking.pop(id(thread), None)
            close(conn)

    def _tls_connection(self, conn: socket.socket, peer: str, deadline: float) -> None:
        """The TLS handshake and the A-ASSOCIATE-RQ, both by ``deadline``; then as any
        association (:meth:`_on_associate_rq`)."""
        key = id(threading.current_thread())
        tls: socket.socket = conn
        try:
            assert self._tls_context is not None
            try:
                conn.setblocking(True)
                conn.settimeout(max(0.01, deadline - clock()))
                tls = self._tls_context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
                with self._lock:
                    self._handshaking[key] = tls
                tls.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                reason = describe(exc)
                if isinstance(exc, (TimeoutError, socket.timeout)):
                    reason = f"no TLS handshake within {self.settings.acse_timeout:.0f} s"
                if not self._stopping.is_set():
                    self._ratelimited(logging.WARNING, f"tls {_host(peer)} {reason}",
                                      "TLS handshake with %s failed: %s; closed", peer, reason)
                    self._audit_refused(peer, "", "", f"TLS handshake failed: {reason}", "TLS port")
                close(tls)
                return
            raw = self._read_associate_rq(tls, peer, deadline)
            if raw is None:
                close(tls)
                return
            tls.settimeout(max(1.0, deadline - clock()))  # for an A-ASSOCIATE-RJ, if it comes to that
            self._on_associate_rq(tls, peer, raw)
        except Exception:  # noqa: BLE001 - one connection's bug must never end the server
            log.exception("unexpected error on the TLS connection from %s; closed", peer)
            close(tls)
        finally:
            with self._lock:
                self._handshaking.pop(key, None)

    def _read_associate_rq(self, conn: socket.socket, peer: str, deadline: float) -> bytes | None:
        """Read a whole A-ASSOCIATE-RQ from ``conn`` (blocking, in the connection's thread)
        under the same rules as the accept loop's; None (logged) if it does not come."""
        buf = bytearray()
        need = PDU_HEADER_BYTES
        while len(buf) < need:
            left = deadline - clock()
            if left <= 0:
                self._ratelimited(logging.INFO, f"silent {_host(peer)}",
                                  "TLS connection from %s sent %d bytes of an A-ASSOCIATE-RQ within %.0f s; closed",
                                  peer, len(buf), self.settings.acse_timeout)
                return None
            conn.settimeout(left)
            try:
                data = conn.recv(min(65536, need - len(buf)))
            except BlockingIOError:
                continue
            except OSError:
                return None
            if not data:
                return None
            buf += data
            if need == PDU_HEADER_BYTES and len(buf) >= PDU_HEADER_BYTES:
                pdu_type = buf[0]
                (length,) = struct.unpack_from(">L", buf, 2)
                if pdu_type != A_ASSOCIATE_RQ_PDU or not MIN_ASSOCIATE_RQ <= length <= \
                        self.settings.max_associate_rq_bytes:
                    self._ratelimited(
                        logging.INFO, f"bad {_host(peer)}",
                        "TLS connection from %s did not start with a valid A-ASSOCIATE-RQ (PDU type 0x%02X, "
                        "%d bytes; at most %d); closed", peer, pdu_type, length,
                        self.settings.max_associate_rq_bytes)
                    return None
                need = PDU_HEADER_BYTES + length
        return bytes(buf)

    # -- known peers and the audit trail -------------------------------------------------

    def _unknown_peer(self, conn: socket.socket, peer: str, calling: str) -> str | None:
        """Why ``calling`` at ``peer`` is not a known peer (``require_known_peers``), or None."""
        host = _host(peer)
        if not self.settings.require_known_peers or (calling == SELF_CHECK_AE_TITLE and _is_loopback(host)):
            return None  # the supervisor's own C-ECHO is always known
        named = [p for p in self.peers if p.ae_title == calling]
        if not named:
            return f"calling AE title '{calling}' is not a known peer ([[peer]])"
        at = [p for p in named if not p.addresses or _address_in(host, p.addresses)]
        if not at:
            where = ", ".join(a for p in named for a in p.addresses)
            return f"'{calling}' is a known peer, but at {where}, not at {host}"
        cert = PeerCertificate.of(conn) if isinstance(conn, ssl.SSLSocket) else None
        for p in at:
            if not p.needs_certificate or (cert is not None and cert.matches(p)):
                return None
        if cert is None:
            return f"'{calling}' is a known peer with a certificate, but came without TLS"
        if not cert.sha256:
            return f"'{calling}' is a known peer with a certificate, but presented none"
        return f"'{calling}' presented a certificate that is not its own ({cert.subject}, SHA-256 {cert.sha256})"

    def _record(self, event: audit.Event) -> None:
        if self.audit is None:
            return
        try:
            self.audit(event)
        except Exception:  # noqa: BLE001 - the trail is never a reason to stop serving
            log.exception("cannot record an association in the audit trail")

    def _audit_refused(self, peer: str, calling: str, called: str, reason: str, tls: str = "") -> None:
        self._record(audit.Event(
            "association", "E", audit.SERIOUS, f"refused: {reason}",
            participants=_participants(peer, calling, called, self.settings.ae_title),
            detail=tls or _tls_words(None)))

    def _audit_association(self, assoc: Association, result: str, outcome: int) -> None:
        if assoc.calling_ae == SELF_CHECK_AE_TITLE and _is_loopback(_host(assoc.peer)):
            return
        words = assoc.summary(True).replace(" answered", "")
        self._record(audit.Event(
            "association", "E", outcome, "" if outcome == audit.SUCCESS else result,
            participants=_participants(assoc.peer, assoc.calling_ae, assoc.called_ae, self.settings.ae_title),
            detail=f"{result}; {assoc.stored} object(s) stored; {words}; {assoc.tls or _tls_words(None)}"))

    def _drop_pending(self, pending: _Pending) -> None:
        assert self._selector is not None
        self._pending.pop(pending.sock, None)
        try:
            self._selector.unregister(pending.sock)
        except (KeyError, ValueError):
            pass
        close(pending.sock)

    def _expire(self, now: float) -> None:
        while self._pending:
            pending = next(iter(self._pending.values()))  # oldest first: deadlines in order
            if pending.deadline > now:
                return
            if pending.buf:
                self._ratelimited(logging.WARNING, f"slow {_host(pending.peer)}",
                                  "connection from %s sent only %d bytes of its A-ASSOCIATE-RQ within "
                                  "%.0f s; closed", pending.peer, len(pending.buf), self.settings.acse_timeout)
            else:
                self._ratelimited(logging.INFO, f"silent {_host(pending.peer)}",
                                  "connection from %s sent no A-ASSOCIATE-RQ within %.0f s; closed",
                                  pending.peer, self.settings.acse_timeout)
            self._drop_pending(pending)

    def _read_pending(self, pending: _Pending) -> None:
        """Read what has arrived of ``pending``'s A-ASSOCIATE-RQ; act once it is whole."""
        try:
            data = pending.sock.recv(min(65536, pending.need - len(pending.buf)))
        except BlockingIOError:
            return
        except OSError:
            self._drop_pending(pending)
            return
        if not data:
            self._drop_pending(pending)
            return
        pending.buf += data
        if len(pending.buf) < pending.need:
            return
        if pending.need == PDU_HEADER_BYTES:
            pdu_type = pending.buf[0]
            (length,) = struct.unpack_from(">L", pending.buf, 2)
            if pdu_type != A_ASSOCIATE_RQ_PDU or not MIN_ASSOCIATE_RQ <= length <= self.settings.max_associate_rq_bytes:
                self._ratelimited(
                    logging.INFO, f"bad {_host(pending.peer)}",
                    "connection from %s did not start with a valid A-ASSOCIATE-RQ (PDU type 0x%02X, "
                    "%d bytes; at most %d); closed", pending.peer, pdu_type, length,
                    self.settings.max_associate_rq_bytes)
                self._drop_pending(pending)
                return
            pending.need = PDU_HEADER_BYTES + length
            return
        # The whole A-ASSOCIATE-RQ is here: the connection leaves the pending set.
        assert self._selector is not None
        self._pending.pop(pending.sock, None)
        self._selector.unregister(pending.sock)
        try:
            self._on_associate_rq(pending.sock, pending.peer, bytes(pending.buf))
        except OSError:
            close(pending.sock)

    def _on_associate_rq(self, conn: socket.socket, peer: str, raw: bytes) -> None:
        """Decide on a whole A-ASSOCIATE-RQ: reject it here, or take a slot and hand the
        connection to a thread of its own, which negotiates and serves the association."""
        negotiated = self._negotiations.get(raw)
        ac: bytes | None = None
        try:
            if negotiated is not None:  # a request like one seen before: only its AE titles are read
                primitive, ac = for_request(negotiated, raw)
                (protocol_version,) = struct.unpack_from(">H", raw, 6)
            else:
                rq = A_ASSOCIATE_RQ()
                rq.decode(raw)
                primitive = rq.to_primitive()
                protocol_version = rq.protocol_version
            calling = (primitive.calling_ae_title or "").strip()
            called = (primitive.called_ae_title or "").strip()
        except Exception as exc:  # noqa: BLE001 - pynetdicom raises many kinds on malformed items
            self._ratelimited(logging.WARNING, f"malformed {_host(peer)}",
                              "malformed A-ASSOCIATE-RQ from %s (%s); aborted", peer, _brief(exc))
            send_and_close(conn, abort_pdu(ABORT_SERVICE_PROVIDER))
            return
        s = self.settings
        reject: tuple[int, int, int] | None = None
        if not protocol_version & 0x0001:
            reject = REJECT_PROTOCOL_VERSION
        elif s.check_called_ae and called != s.ae_title:
            reject = REJECT_CALLED_AE
        elif s.allowed_calling_aes and calling not in s.allowed_calling_aes:
            reject = REJECT_CALLING_AE
        elif primitive.application_context_name != APPLICATION_CONTEXT_NAME:
            reject = REJECT_APPLICATION_CONTEXT
        unknown = None if reject is not None else self._unknown_peer(conn, peer, calling)
        if unknown is not None:
            reject = REJECT_CALLING_AE
        if reject is None:
            thread = threading.Thread(target=self._serve, args=(conn, peer, primitive, raw, negotiated, ac),
                                      name=f"scp-{peer}", daemon=True)
            with self._lock:
                if len(self._associated) >= s.max_associations:
                    reject = REJECT_LOCAL_LIMIT
                else:
                    self._associated[conn] = thread
        if reject is not None:
            reason = unknown or REJECT_REASONS.get(reject, str(reject))
            self._ratelimited(logging.WARNING, f"rejected {calling} {_host(peer)} {reject} {reason}",
                              "association from %s (%s) to '%s' rejected: %s", calling, peer, called, reason)
            self._audit_refused(peer, calling, called, reason, _tls_words(conn))
            send_and_close(conn, reject_pdu(*reject))
            return
        try:
            thread.start()
        except RuntimeError as exc:  # "can't start new thread": out of tasks or memory
            with self._lock:
                self._associated.pop(conn, None)
                self._problem = f"cannot start a thread for an association: {exc}"
            log.error("association from %s (%s) aborted: cannot start a thread (%s)", calling, peer, exc)
            send_and_close(conn, abort_pdu(ABORT_SERVICE_PROVIDER))

    # -- one association, in its own thread ----------------------------------------------

    def _serve(self, conn: socket.socket, peer: str, primitive: A_ASSOCIATE, raw: bytes,
               negotiated: Negotiated | None, ac: bytes | None) -> None:
        """Negotiate (or take ``negotiated``, with its ``ac`` for this request) and serve one
        association; whatever happens, release its slot, its socket and its temp file, and
        log once."""
        assoc: Association | None = None
        who = peer
        result, outcome = "aborted", audit.MINOR
        try:
            s = self.settings
            reader = PduReader(conn, network_timeout=s.network_timeout, pdu_timeout=s.pdu_timeout,
                               idle_timeout=s.idle_timeout)  # makes conn blocking, with TCP keepalive
            assoc = self._accept_association(conn, peer, primitive, raw, negotiated, ac)
            who = f"{assoc.calling_ae} ({peer})"
            link = Link(conn, reader, contexts=assoc.contexts, peer_max_pdu=assoc.peer_max_pdu, max_pdu=s.max_pdu,
                        max_command_bytes=s.max_command_bytes, storage=assoc.storage)
            # The contexts' UIDs as text, once per association rather than per request.
            syntaxes = {i: (str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for i, cx in assoc.contexts.items()}
            on_command = partial(self._on_command, conn, assoc, partial(self._stored, assoc), link, syntaxes)
            released = serve_p_data(conn, reader, assoc.contexts, on_command, max_pdu=s.max_pdu,
                                    max_command_bytes=s.max_command_bytes)
            if released:
                log.log(assoc.log_level, "association from %s released: %s", assoc.calling_ae, assoc.summary(True))
                result, outcome = "released", audit.SUCCESS
            else:
                log.warning("association from %s aborted by the peer", assoc.calling_ae)
                result = "aborted by the peer"
            self._peers.note(assoc, released)
        except ProtocolError as exc:
            log.warning("aborting association with %s: %s", who, exc)
            result = f"aborted: {exc}"
            send_quietly(conn, abort_pdu(ABORT_SERVICE_PROVIDER))
        except DeadlineExpired as exc:
            log.warning("aborting association with %s: %s", who, exc)
            result = f"aborted: {exc}"
            send_quietly(conn, abort_pdu(ABORT_SERVICE_USER))
        except (ConnectionError, OSError) as exc:
            result = f"connection lost: {exc.strerror or exc}"
            if not self._stopping.is_set():
                log.warning("connection from %s lost: %s", who, exc.strerror or exc)
        except Exception:  # noqa: BLE001 - one association's bug must never end the server
            log.exception("unexpected error serving %s; association aborted", who)
            send_quietly(conn, abort_pdu(ABORT_SERVICE_PROVIDER))
        finally:
            with self._lock:
                self._associated.pop(conn, None)
                self._served += 1
            close(conn)
            if assoc is not None:
                self._audit_association(assoc, result, outcome)
            if assoc is not None and self.on_association_end is not None:
                try:
                    self.on_association_end(assoc)
                except Exception:  # noqa: BLE001 - the end hook is advisory; never break the server
                    log.exception("association end hook failed")

    def _accept_association(self, conn: socket.socket, peer: str, primitive: A_ASSOCIATE, raw: bytes,
                            negotiated: Negotiated | None, ac: bytes | None) -> Association:
        """Negotiate the presentation contexts (unless a request like ``raw`` was: then
        ``negotiated`` and ``ac`` are its outcome) and send the A-ASSOCIATE-AC."""
        rq_contexts = primitive.presentation_context_definition_list
        if negotiated is not None and ac is not None:
            results, reply_roles = negotiated.results, negotiated.roles
        else:
            roles: dict[str, tuple[bool | None, bool | None]] | None = None
            if self.storage_roles:
                roles = {str(item.sop_class_uid): (item.scu_role, item.scp_role) for item in primitive.user_information
                         if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid}
            try:
                with self._quiet.here():
                    results, reply_roles = negotiate_as_acceptor(
                        rq_contexts, self._supported, roles)  # type: ignore[arg-type]
            except Exception as exc:  # noqa: BLE001 - pynetdicom raises many kinds on malformed contexts
                raise ProtocolError(f"malformed presentation context in the A-ASSOCIATE-RQ ({_brief(exc)})") from None
            ac = _associate_ac(primitive, results, self.settings.max_pdu, reply_roles)
            self._negotiations.put(raw, Negotiated(primitive, results, list(reply_roles), ac))
        accepted = {int(cx.context_id or 0): cx for cx in results if cx.result == 0x00}
        peer_max = 0
        for item in primitive.user_information:
            if isinstance(item, MaximumLengthNotification):
                peer_max = item.maximum_length_received or 0
        calling = (primitive.calling_ae_title or "").strip()
        conn.sendall(ac)
        storage = tuple(StorageContext(i, str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                        for i, cx in accepted.items() if reply_roles and cx.as_scu)
        assoc = Association(calling, peer, accepted, peer_max, storage=storage,
                            called_ae=(primitive.called_ae_title or "").strip(), tls=_tls_words(conn))
        log.log(assoc.log_level, "association from %s (%s) accepted, %d of %d context(s)", calling, peer,
                len(accepted), len(rq_contexts))
        return assoc

    def _on_command(self, conn: socket.socket, assoc: Association, stored: Callable[[StoreResult], None],
                    link: Link, syntaxes: Mapping[int, tuple[str, str]], cx_id: int,
                    command: bytes) -> DataSetSink | None:
        """Dispatch a whole command set to its row of the service table (``syntaxes``: each
        accepted context's abstract and transfer syntax)."""
        request = Request.decode(command)
        service = service_for(request, self.services)
        abstract_syntax, transfer_syntax = syntaxes[cx_id]
        service.check_context(abstract_syntax)
        assoc.requests[service.name] += 1
        return service.handler(Message(
            request, conn, cx_id, abstract_syntax, transfer_syntax, assoc.calling_ae,
            self.open_stream, stored, link))

    def _stored(self, assoc: Association, result: StoreResult) -> None:
        """A C-STORE has been answered by the store: note its series and the outcome."""
        if result.ok:
            assoc.stored += 1
        if result.ok and result.series_uid:
            assoc.touched_series.add(result.series_uid)
        with self._lock:
            self._last_store = "ok" if result.ok else f"0x{int(result.status):04X} {result.comment}"
            self._last_store_at = time.time()


def _associate_ac(rq: A_ASSOCIATE, results: list[PresentationContext], max_pdu: int,
                  roles: Sequence[SCP_SCU_RoleSelectionNegotiation]) -> bytes:
    """The A-ASSOCIATE-AC answering ``rq`` (:func:`~appliance.net.ul.associate_ac_pdu`),
    with the SCP/SCU Role Selection replies ``roles``, if any, in its user information."""
    raw = associate_ac_pdu(rq, results, max_pdu)
    if not roles:
        return raw
    ac = A_ASSOCIATE_AC()
    ac.decode(raw)
    prim = ac.to_primitive()
    prim.user_information = [*prim.user_information, *roles]
    out = A_ASSOCIATE_AC()
    out.from_primitive(prim)
    return bytes(out.encode())


def _participants(peer: str, calling: str, called: str, ours: str) -> tuple[audit.Participant, ...]:
    return (audit.Participant("source", calling, _host(peer), requestor=True),
            audit.Participant("destination", called or ours))


def _tls_words(conn: socket.socket | None) -> str:
    """``TLSv1.3 TLS_AES_256_GCM_SHA384, certificate CN=...`` for a TLS connection, else "no TLS"."""
    if not isinstance(conn, ssl.SSLSocket):
        return "no TLS"
    cipher = conn.cipher()
    cert = PeerCertificate.of(conn)
    who = f"certificate {cert.subject or '(no subject)'} SHA-256 {cert.sha256}" if cert.sha256 else \
        "no client certificate"
    return f"{conn.version()} {cipher[0] if cipher else ''}, {who}"


def _address_in(host: str, addresses: Sequence[str]) -> bool:
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    for a in addresses:
        try:
            if addr in ipaddress.ip_network(a, strict=False):
                return True
        except (ValueError, TypeError):
            continue
    return False


def _host(peer: str) -> str:
    """The address part of ``host:port`` (log lines are rate-limited per address)."""
    return peer.rsplit(":", 1)[0]


def _is_loopback(host: str) -> bool:
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _brief(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _listening(host: str, port: int, sock: socket.socket | None) -> socket.socket:
    """``sock`` (or a new socket bound to ``host``:``port``) listening and non-blocking; closed on failure."""
    if sock is None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
    try:
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
