"""Negotiating an association once per kind of request, not once per association.

A modality or storescu sends the same A-ASSOCIATE-RQ every time: only the two AE title
fields may differ, and the rest (application context, the presentation contexts, often
more than a hundred, and the user information) is byte for byte the same. pynetdicom
decodes and negotiates such a request in about 9 ms of CPU, which a peer sending one image
per association pays per image. :class:`NegotiationCache` keeps, for each distinct rest of
a request, what pynetdicom made of it (the decoded request, the negotiated results and
role replies, and the A-ASSOCIATE-AC), so a repeated request costs a dictionary look-up:
the AE titles are read from the new request (pynetdicom checks them as before) and written
into a copy of the cached answer, which is then byte for byte what negotiating it afresh
gives.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from dataclasses import dataclass

from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, SCP_SCU_RoleSelectionNegotiation
from pynetdicom.presentation import PresentationContext

#: Distinct requests remembered (least recently used dropped first): a site has a few
#: dozen modalities and workstations at most, each with one or two kinds of request.
CACHE_SIZE = 32

#: Where the AE title fields are in an A-ASSOCIATE-RQ and -AC (PS3.8 9.3.2, 9.3.3).
_AE_FIELDS = slice(10, 42)


@dataclass(frozen=True)
class Negotiated:
    """What one kind of A-ASSOCIATE-RQ was decoded and negotiated into. Shared between
    associations: nothing here is changed after it is made."""

    #: The decoded request, with the AE titles of the first request of this kind.
    primitive: A_ASSOCIATE
    results: list[PresentationContext]
    roles: list[SCP_SCU_RoleSelectionNegotiation]
    #: The A-ASSOCIATE-AC, with the AE title fields of that first request.
    ac: bytes


class NegotiationCache:
    """The negotiations of the last :data:`CACHE_SIZE` kinds of request; safe to share
    between threads."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size = size
        self._entries: OrderedDict[bytes, Negotiated] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(raw: bytes) -> bytes:
        """Everything of the request ``raw`` but its PDU length and AE title fields."""
        return raw[6:10] + raw[42:]

    def get(self, raw: bytes) -> Negotiated | None:
        """The negotiation of a request like ``raw`` (the whole PDU), or None."""
        key = self._key(raw)
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
            return found

    def put(self, raw: bytes, negotiated: Negotiated) -> None:
        """Remember ``negotiated`` for requests like ``raw``."""
        key = self._key(raw)
        with self._lock:
            self._entries[key] = negotiated
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


def for_request(negotiated: Negotiated, raw: bytes) -> tuple[A_ASSOCIATE, bytes]:
    """The decoded request and the A-ASSOCIATE-AC for ``raw``, a request of the kind
    ``negotiated`` was made from: its AE titles read as pynetdicom reads them (ValueError
    for titles it refuses), the rest from ``negotiated``."""
    fields = A_ASSOCIATE_RQ()
    fields.called_ae_title = raw[10:26]  # decoded, stripped and checked by pynetdicom
    fields.calling_ae_title = raw[26:42]
    primitive = copy.copy(negotiated.primitive)
    primitive.called_ae_title = fields.called_ae_title
    primitive.calling_ae_title = fields.calling_ae_title
    titles = fields.called_ae_title.ljust(16) + fields.calling_ae_title.ljust(16)
    ac = negotiated.ac[:_AE_FIELDS.start] + titles.encode("ascii") + negotiated.ac[_AE_FIELDS.stop:]
    return primitive, ac
