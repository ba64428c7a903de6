"""The Storage Server: a C-ECHO and C-STORE SCP accepting exactly Tables 2 and 3.

The network side is :mod:`appliance.net.acceptor` (our upper layer, which streams each data
set into the store's temp file); every C-STORE goes through
:class:`appliance.store.ingest.Ingest`, the one door into the store. Transfer syntaxes are chosen
in the statement's order (Implicit LE, Explicit LE, Explicit BE), whatever order the
requestor proposes them in, and only peers that sent an A-ASSOCIATE-RQ hold one of the
``max_associations`` slots.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

from appliance import audit
from appliance.config import Peer, ScpConfig, plain_bind
from appliance.net.acceptor import Acceptor, AcceptorState, Association
from appliance.store.disk import self_store
from appliance.store.ingest import Ingest

log = logging.getLogger(__name__)

#: Seconds between the SCP's reports to its supervisor (its notify channel).
REPORT_INTERVAL = 5.0
#: Seconds between two self-stores into the scratch area.
SELF_STORE_INTERVAL = 60.0
#: The report's fields (sd_notify assignments of our own, next to STATUS=).
REPORT_FIELDS = ("X_ACCEPTING", "X_PROBLEM", "X_ASSOCIATIONS", "X_PENDING", "X_SHED", "X_SERVED",
                 "X_FDS", "X_THREADS", "X_RSS_KB", "X_LAST_STORE", "X_LAST_STORE_AGE", "X_SELF_STORE")


@dataclass(frozen=True)
class Listening:
    """Where the server listens."""

    ae_title: str
    host: str
    port: int
    #: The DICOM TLS port (0: none).
    tls_port: int = 0


class StorageServer:
    """A Storage SCP bound to ``cfg.bind``:``cfg.port`` (port 0 picks a free one)."""

    def __init__(self, cfg: ScpConfig, ingest: Ingest, sock: socket.socket | None = None) -> None:
        """``sock``: an already bound socket to serve (e.g. inherited from the supervisor)
        instead of binding ``cfg.bind``:``cfg.port``."""
        self.cfg = cfg
        self._sock = sock
        self.ingest = ingest
        self._acceptor = Acceptor(
            cfg,
            ingest.open_stream,
            self._on_association_end,
        )
        self._where: Listening | None = None
        self._tls: ssl.SSLContext | None = None
        self._tls_sock: socket.socket | None = None
        self._peers: tuple[Peer, ...] = ()

    def secure(self, tls: ssl.SSLContext | None, tls_sock: socket.socket | None = None,
               peers: tuple[Peer, ...] = ()) -> None:
        """Before :meth:`start`: serve DICOM TLS with ``tls`` on ``cfg.tls_port`` (or the
        already bound ``tls_sock``), and check ``peers`` (``cfg.require_known_peers``)."""
        self._tls, self._tls_sock, self._peers = tls, tls_sock, peers

    def start(self) -> Listening:
        """Start listening in background threads; return where. Every association is
        recorded in the audit trail of the store's data directory."""
        self._acceptor.peers = self._peers
        self._acceptor.audit = partial(audit.record, self.ingest.store.data_dir)
        host, port = self._acceptor.listen(plain_bind(self.cfg), self.cfg.port, self._sock)
        tls_port = 0
        if self._tls is not None:
            try:
                _, tls_port = self._acceptor.listen_tls(self.cfg.bind, self.cfg.tls_port, self._tls, self._tls_sock)
            except OSError:
                self._acceptor.stop(0)
                raise
        self._where = Listening(self.cfg.ae_title, host, port, tls_port)
        log.info("Storage SCP %s listening on %s:%d%s", self.cfg.ae_title, host, port,
                 f" and DICOM TLS on {tls_port}" if tls_port else "")
        return self._where

    @property
    def listening(self) -> bool:
        return self._where is not None

    @property
    def port(self) -> int:
        assert self._where is not None
        return self._where.port

    @property
    def tls_port(self) -> int:
        assert self._where is not None
        return self._where.tls_port

    def active(self) -> int:
        """Number of associations holding a slot now."""
        return self._acceptor.associated()

    def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, let associations in flight finish for up to ``grace`` seconds,
        then abort the rest. An object being written is either stored whole or not at all.
        Connections that never asked to associate are closed at once."""
        if self._where is None:
            return
        self._where = None
        self._acceptor.stop(grace)
        log.info("Storage SCP stopped")

    def _on_association_end(self, assoc: Association) -> None:
        """Recompute the 3D verdict of the series this association stored into."""
        if assoc.touched_series:
            self.ingest.store.update_verdicts(sorted(assoc.touched_series))

    def state(self) -> AcceptorState:
        """How the network side is doing (accepting, associations, the last store)."""
        return self._acceptor.state()


#: glibc's mallopt(3) parameter M_ARENA_MAX.
_M_ARENA_MAX = -8
#: Malloc arenas the SCP process may use. glibc gives threads up to 8 per core, and each keeps
#: the memory its threads freed: with a thread per association, RSS rose by about 13 MiB
#: over a 30-minute soak and stayed there. Two arenas serve 2 cores' worth of threads.
MALLOC_ARENAS = 2


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas for this process (call before starting threads); False
    where it cannot be done (not glibc)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


def process_usage() -> tuple[int, int, int]:
    """This process's open descriptors, threads and resident memory in KiB."""
    try:
        fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        fds = -1
    rss_kb = 0
    try:
        with open("/proc/self/statm") as f:
            rss_kb = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError, IndexError):
        pass
    return fds, threading.active_count(), rss_kb


def report(server: StorageServer, self_store_result: str) -> list[str]:
    """The SCP's report to its supervisor, as sd_notify assignments (one datagram)."""
    st = server.state()
    fds, threads, rss_kb = process_usage()
    age = f"{time.time() - st.last_store_at:.0f}" if st.last_store_at else ""
    problem = st.problem or ("" if st.accepting else "not accepting connections")
    where = f"{server.cfg.ae_title}:{server.port}" if server.listening else "stopped"
    status = f"listening {where} · {st.associations} association(s)" if st.accepting else \
        f"NOT ACCEPTING on {where}: {problem}"
    values = {
        "X_ACCEPTING": "1" if st.accepting else "0",
        "X_PROBLEM": problem,
        "X_ASSOCIATIONS": str(st.associations),
        "X_PENDING": str(st.pending),
        "X_SHED": str(st.shed),
        "X_SERVED": str(st.associations_served),
        "X_FDS": str(fds),
        "X_THREADS": str(threads),
        "X_RSS_KB": str(rss_kb),
        "X_LAST_STORE": st.last_store,
        "X_LAST_STORE_AGE": age,
        "X_SELF_STORE": self_store_result or "ok",
    }
    # One assignment per line: a value never spans lines.
    return [f"STATUS={status}"] + [f"{k}={' '.join(v.split())}" for k, v in values.items()]


def serve_until_stopped(server: StorageServer, data_dir: Path, send: Callable[..., None],
                        stop: threading.Event, orphaned: Callable[[], bool]) -> None:
    """The SCP process's main loop: every second, check whether the supervisor is still
    there (``orphaned``); every :data:`REPORT_INTERVAL`, send the report (``send``, the
    notifier); every :data:`SELF_STORE_INTERVAL`, self-store. Returns when ``stop`` is set
    or the supervisor is gone."""
    last_report = last_self_store = 0.0
    self_store_result = ""
    while True:
        now = time.monotonic()
        if now - last_self_store >= SELF_STORE_INTERVAL:
            last_self_store = now
            result = self_store(data_dir)
            if result != self_store_result:
                if result:
                    log.error("self-store failed: %s", result)
                else:
                    log.info("self-store works again")
            self_store_result = result
        if now - last_report >= REPORT_INTERVAL:
            last_report = now
            try:
                send(*report(server, self_store_result))
            except Exception:  # noqa: BLE001 - the report is advisory; serving goes on
                log.exception("cannot report to the supervisor")
        if stop.wait(1.0):
            return
        if orphaned():
            log.warning("the supervisor ('appliance run') that started this SCP is gone; stopping")
            return
