"""The Storage Server: a C-ECHO and C-STORE SCP accepting exactly Tables 2 and 3.

The network side is :mod:`appliance.acceptor` (our upper layer, which streams each data
set into the store's temp file); every C-STORE goes through
:class:`appliance.ingest.Ingest`, the one door into the store. Transfer syntaxes are chosen
in the statement's order (Implicit LE, Explicit LE, Explicit BE), whatever order the
requestor proposes them in, and only peers that sent an A-ASSOCIATE-RQ hold one of the
``max_associations`` slots.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

from appliance.acceptor import Acceptor, Association, Settings
from appliance.config import ScpConfig
from appliance.ingest import Ingest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Listening:
    """Where the server listens."""

    ae_title: str
    host: str
    port: int


class StorageServer:
    """A Storage SCP bound to ``cfg.bind``:``cfg.port`` (port 0 picks a free one)."""

    def __init__(self, cfg: ScpConfig, ingest: Ingest, sock: socket.socket | None = None) -> None:
        """``sock``: an already bound socket to serve (e.g. inherited from the supervisor)
        instead of binding ``cfg.bind``:``cfg.port``."""
        self.cfg = cfg
        self._sock = sock
        self.ingest = ingest
        self._acceptor = Acceptor(
            Settings(
                ae_title=cfg.ae_title,
                max_pdu=cfg.max_pdu,
                max_associations=cfg.max_associations,
                check_called_ae=cfg.check_called_ae,
                allowed_calling_aes=tuple(cfg.allowed_calling_aes),
                acse_timeout=cfg.acse_timeout,
                network_timeout=cfg.network_timeout,
            ),
            ingest.open_stream,
            self._on_association_end,
        )
        self._where: Listening | None = None

    def start(self) -> Listening:
        """Start listening in background threads; return where."""
        host, port = self._acceptor.listen(self.cfg.bind, self.cfg.port, self._sock)
        self._where = Listening(self.cfg.ae_title, host, port)
        log.info("Storage SCP %s listening on %s:%d", self.cfg.ae_title, host, port)
        return self._where

    @property
    def port(self) -> int:
        assert self._where is not None
        return self._where.port

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
