"""The Storage Server: a C-ECHO and C-STORE SCP accepting exactly Tables 2 and 3.

Built on pynetdicom's acceptor. What we change:

* Association slots count only peers that have sent an A-ASSOCIATE-RQ. pynetdicom counts
  every TCP connection, so five port scans (or five half-open connects) would lock a real
  scanner out for the whole ACSE timeout.
* Transfer syntaxes are chosen in the statement's order (Implicit LE, Explicit LE, Explicit
  BE), whatever order the requestor proposes them in (pynetdicom walks the acceptor's list).
* Every C-STORE goes through :class:`appliance.ingest.Ingest`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.transport import ThreadedAssociationServer

from appliance.config import ScpConfig
from appliance.conformance import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    SCP_CONTEXTS,
    Status,
)
from appliance.ingest import Ingest, Source

log = logging.getLogger(__name__)

#: DUL states in which a connection holds no association slot: idle, and transport
#: open but no A-ASSOCIATE-RQ received yet (PS3.8 9.2).
_NOT_ASSOCIATED = frozenset({"Sta1", "Sta2", "Sta13"})
_ERROR_COMMENT_MAX = 64  # Error Comment (0000,0902) is LO


class _SlotCountingAE(AE):  # type: ignore[misc]
    """An AE whose association limit counts only peers that asked to associate."""

    @property
    def active_associations(self) -> list[Association]:
        return [
            a
            for a in super().active_associations
            if a.dul.state_machine.current_state not in _NOT_ASSOCIATED or not a.is_acceptor
        ]


class _Server(ThreadedAssociationServer):  # type: ignore[misc]
    """pynetdicom's server with a listen backlog that absorbs a burst of connects.

    The default backlog of 5 drops the SYN of the 6th simultaneous connect, so a scanner
    arriving during a port scan would wait a full TCP retransmission (1 s or more)."""

    request_queue_size = 128


@dataclass(frozen=True)
class Listening:
    """Where the server listens."""

    ae_title: str
    host: str
    port: int


def _comment(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _ERROR_COMMENT_MAX else text[: _ERROR_COMMENT_MAX - 3] + "..."


class StorageServer:
    """A running Storage SCP bound to ``cfg.bind``:``cfg.port`` (port 0 picks a free one)."""

    def __init__(self, cfg: ScpConfig, ingest: Ingest) -> None:
        self.cfg = cfg
        self.ingest = ingest
        self.ae = self._make_ae(cfg)
        self._server: ThreadedAssociationServer | None = None
        self._touched: set[str] = set()
        self._touched_lock = threading.Lock()

    @staticmethod
    def _make_ae(cfg: ScpConfig) -> AE:
        ae = _SlotCountingAE(ae_title=cfg.ae_title)
        for row in SCP_CONTEXTS:
            ae.add_supported_context(row.abstract_syntax, [str(ts) for ts in row.transfer_syntaxes])
        ae.maximum_associations = cfg.max_associations
        ae.maximum_pdu_size = cfg.max_pdu
        ae.acse_timeout = cfg.acse_timeout
        ae.network_timeout = cfg.network_timeout
        ae.dimse_timeout = cfg.network_timeout
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ae.require_called_aet = cfg.check_called_ae
        ae.require_calling_aet = list(cfg.allowed_calling_aes)
        return ae

    def start(self) -> Listening:
        """Start listening in background threads; return where."""
        handlers = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        server = self.ae.make_server(
            (self.cfg.bind, self.cfg.port), evt_handlers=handlers, server_class=_Server
        )
        threading.Thread(target=server.serve_forever, name="StorageSCP-accept", daemon=True).start()
        self.ae._servers.append(server)  # as AE.start_server does; server.shutdown() removes it
        self._server = server
        host, port = self._server.server_address[:2]
        where = Listening(self.cfg.ae_title, str(host), int(port))
        log.info("Storage SCP %s listening on %s:%d", where.ae_title, where.host, where.port)
        return where

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def active(self) -> int:
        """Number of associations holding a slot now."""
        return len(self.ae.active_associations)

    def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, let associations in flight finish for up to ``grace`` seconds,
        then abort the rest. An object being written is either stored whole or not at all.

        Connections that never asked to associate are closed at once: pynetdicom would
        otherwise keep each one (and the process) alive for the whole ACSE timeout."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.shutdown()
        for assoc in self._connections(server, associated=False):
            self._drop(assoc)
        deadline = time.monotonic() + grace
        while self._connections(server, associated=True) and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in self._connections(server, associated=True):
            log.warning("aborting association with %s at shutdown", assoc.requestor.ae_title)
            assoc.abort()
        for assoc in self._connections(server, associated=False):
            self._drop(assoc)
        # Aborted associations end within moments; threads of dropped connections are
        # daemons whose DUL is already stopped, so they need no wait.
        deadline = time.monotonic() + 5
        for assoc in self._connections(server, associated=True):
            assoc.join(timeout=max(0.0, deadline - time.monotonic()))
        self._flush_verdicts()
        log.info("Storage SCP stopped")

    @staticmethod
    def _connections(server: ThreadedAssociationServer, associated: bool) -> list[Association]:
        return [
            a
            for a in server.active_associations
            if a.is_alive() and (a.dul.state_machine.current_state not in _NOT_ASSOCIATED) == associated
        ]

    @staticmethod
    def _drop(assoc: Association) -> None:
        """Close a connection that holds no association (Evt17 takes its DUL to Sta1)."""
        sock = assoc.dul.socket
        if sock is not None:
            sock.close()
        assoc.kill()

    # -- handlers ----------------------------------------------------------------

    def _on_echo(self, event: Any) -> int:
        return int(Status.SUCCESS)

    def _on_store(self, event: Any) -> Dataset:
        req = event.request
        calling = event.assoc.requestor.ae_title.strip()
        body = req.DataSet.getvalue() if req.DataSet is not None else b""
        outcome = self.ingest.accept(
            body,
            event.context.transfer_syntax,
            sop_class_uid=event.context.abstract_syntax,
            sop_instance_uid=req.AffectedSOPInstanceUID,
            source=Source(calling),
        )
        rsp = Dataset()
        rsp.Status = int(outcome.status)
        if not outcome.ok:
            rsp.ErrorComment = _comment(outcome.comment)
        elif outcome.series_uid:
            with self._touched_lock:
                self._touched.add(outcome.series_uid)
        return rsp

    def _on_accepted(self, event: Any) -> None:
        a = event.assoc
        log.info(
            "association from %s (%s:%s) accepted, %d context(s)",
            a.requestor.ae_title,
            a.requestor.address,
            a.requestor.port,
            len(a.accepted_contexts),
        )

    def _on_rejected(self, event: Any) -> None:
        a = event.assoc
        log.warning(
            "association from %s (%s) rejected (local limit %d, called AE '%s')",
            a.requestor.ae_title,
            a.requestor.address,
            self.cfg.max_associations,
            a.acceptor.ae_title,
        )

    def _on_aborted(self, event: Any) -> None:
        log.warning("association from %s aborted", event.assoc.requestor.ae_title or event.assoc.requestor.address)

    def _on_closed(self, event: Any) -> None:
        self._flush_verdicts()

    def _flush_verdicts(self) -> None:
        """Recompute the 3D verdict of series stored into since the last flush."""
        with self._touched_lock:
            touched, self._touched = self._touched, set()
        if touched:
            try:
                self.ingest.store.update_verdicts(sorted(touched))
            except Exception:  # the verdict is advisory; never break the connection for it
                log.exception("could not update the 3D verdict of %d series", len(touched))
