"""Query/Retrieve SCP on the Storage Server's port (beyond the conformance statement):
C-FIND, C-MOVE and C-GET in the Patient Root and Study Root information models.

The services are rows of a table like :data:`appliance.net.dimse.SERVICES`, whose handlers
are bound to the store they answer from (:func:`services`); :class:`QueryRetrieveServer`
is the Storage Server with those rows and the Q/R presentation contexts
(:data:`appliance.conformance.QR_CONTEXTS`) added, when ``[qr] enabled``. Everything else
is the Storage Server's: the association limit, the timeouts and the size limits.

* :mod:`~appliance.net.qr.model`: the information models' keys; Identifier in, Identifier out.
* :mod:`~appliance.net.qr.find`: C-FIND, answered from the index.
* :mod:`~appliance.net.qr.retrieve`: C-MOVE to configured destinations, C-GET back over the
  requester's association.
"""

from __future__ import annotations

import logging
import socket
from typing import Mapping

from appliance.config import Destination, QrConfig, ScpConfig
from appliance.conformance import QR_CONTEXTS, QR_FIND_CLASSES, QR_GET_CLASSES, QR_MOVE_CLASSES, SCP_CONTEXTS
from appliance.net.acceptor import Acceptor
from appliance.net.dimse import SERVICES, CommandField, Message, Service
from appliance.net.qr.find import Finder
from appliance.net.qr.retrieve import Retriever
from appliance.net.scp import StorageServer
from appliance.net.sender import ClientSettings
from appliance.store.ingest import Ingest
from appliance.store.store import Store

log = logging.getLogger(__name__)


def late_cancel(msg: Message) -> None:
    """C-CANCEL-RQ for a request already answered in full: nothing to do (PS3.7 9.3.2.3)."""
    log.debug("C-CANCEL from %s for message %d, already answered", msg.calling_ae, msg.request.message_id)


def services(store: Store, ae_title: str, destinations: Mapping[str, Destination],
             client: ClientSettings) -> Mapping[int, Service]:
    """The Query/Retrieve rows of a service table, answering from ``store`` as ``ae_title``
    and moving to ``destinations`` as the client AE (``client``)."""
    finder = Finder(store.index, store.data_dir, ae_title)
    retriever = Retriever(store, destinations, client)
    return {
        CommandField.C_FIND_RQ: Service("C-FIND", frozenset(QR_FIND_CLASSES), finder.find),
        CommandField.C_MOVE_RQ: Service("C-MOVE", frozenset(QR_MOVE_CLASSES), retriever.move),
        CommandField.C_GET_RQ: Service("C-GET", frozenset(QR_GET_CLASSES), retriever.get),
        CommandField.C_CANCEL_RQ: Service("C-CANCEL", frozenset(QR_FIND_CLASSES | QR_MOVE_CLASSES | QR_GET_CLASSES),
                                          late_cancel),
    }


class QueryRetrieveServer(StorageServer):
    """The Storage Server (:class:`~appliance.net.scp.StorageServer`) with Query/Retrieve
    when ``qr.enabled``: its contexts negotiated after the statement's, its rows served,
    C-MOVE to ``destinations`` (as ``[destinations]``) through the client AE (``client``,
    ELEKTA_CLIENT by default), and SCP/SCU Role Selection accepted for storage (C-GET)."""

    def __init__(self, cfg: ScpConfig, ingest: Ingest, sock: socket.socket | None = None, *,
                 qr: QrConfig | None = None, destinations: Mapping[str, Destination] | None = None,
                 client: ClientSettings | None = None) -> None:
        super().__init__(cfg, ingest, sock)
        self.qr = qr or QrConfig()
        if self.qr.enabled:
            table = services(ingest.store, cfg.ae_title, dict(destinations or {}), client or ClientSettings())
            self._acceptor = Acceptor(
                cfg, ingest.open_stream, self._on_association_end,
                services={**SERVICES, **table},
                contexts=SCP_CONTEXTS + QR_CONTEXTS,
                storage_roles=True,
            )
