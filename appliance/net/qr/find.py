"""C-FIND SCP (PS3.4 C.4.1), Patient Root and Study Root, answered from the index.

Matches are read from the index a page at a time (:data:`PAGE` entities per read, each a
short read transaction), and each is answered with a Pending C-FIND-RSP as soon as it is
encoded; between two responses the handler looks, without waiting, whether the peer sent a
C-CANCEL-RQ, and if so stops with Cancel (0xFE00). Keys the index does not hold are read
from one stored file of each entity, and only when the query asks for them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterator

from appliance.conformance import QR_MODELS, SOPClass, Status
from appliance.errors import StoreError
from appliance.net.dimse import CommandField, Message
from appliance.net.qr.exchange import cancelled, gather
from appliance.net.qr.model import (
    Key,
    Query,
    QueryError,
    file_value_matches,
    identifier,
    parse,
    read_file_values,
)
from appliance.net.ul import DataSetSink
from appliance.store.find import Found
from appliance.store.index import Index

log = logging.getLogger(__name__)

#: Entities read from the index at a time.
PAGE = 500


class Finder:
    """The C-FIND handler of a Storage Server: answers from ``index``, names ``ae_title``
    as the Retrieve AE Title; ``data_dir`` holds the stored files the index points to."""

    def __init__(self, index: Index, data_dir: Path, ae_title: str) -> None:
        self.index = index
        self.data_dir = data_dir
        self.ae_title = ae_title

    def find(self, msg: Message) -> DataSetSink:
        """C-FIND: gather the Identifier, then answer (see the module)."""
        return gather(msg, self._answer)

    def _answer(self, msg: Message, data: bytes) -> None:
        t0 = time.perf_counter()
        try:
            query = parse(data, msg.transfer_syntax, QR_MODELS[SOPClass(msg.abstract_syntax)])
        except QueryError as exc:
            log.warning("C-FIND from %s refused (0x%04X): %s", msg.calling_ae, exc.status, exc.comment)
            msg.respond(CommandField.C_FIND_RSP, exc.status, error_comment=exc.comment)
            return
        status = Status.PENDING_WARNING if query.unsupported else Status.PENDING
        n = 0
        try:
            for values, file_values in self.matches(query):
                answer = identifier(query, values, file_values, ae_title=self.ae_title)
                msg.respond(CommandField.C_FIND_RSP, status, data_set=answer.encode(msg.transfer_syntax))
                n += 1
                if cancelled(msg):
                    msg.respond(CommandField.C_FIND_RSP, Status.CANCEL)
                    log.info("C-FIND from %s: %s level, cancelled after %d match(es)", msg.calling_ae,
                             query.level, n)
                    return
        except StoreError as exc:
            log.error("C-FIND from %s failed: %s", msg.calling_ae, exc)
            msg.respond(CommandField.C_FIND_RSP, Status.UNABLE_TO_PROCESS, error_comment=str(exc))
            return
        msg.respond(CommandField.C_FIND_RSP, Status.SUCCESS)
        log.info("C-FIND from %s: %s level, %d match(es) in %.0f ms%s", msg.calling_ae, query.level, n,
                 (time.perf_counter() - t0) * 1000,
                 f"; keys not supported: {', '.join(query.unsupported)}" if query.unsupported else "")

    def matches(self, query: Query) -> Iterator[tuple[dict[str, Any], dict[str, str]]]:
        """Each match of ``query``: its index values by column, and its file values by keyword."""
        file_keys = query.file_keys
        after = 0
        while True:
            page = self.index.find(query.index_level, query.matches, query.columns, after=after, limit=PAGE)
            for found in page:
                file_values = self._file_values(found, file_keys)
                if all(file_value_matches(m, file_values.get(m.key.keyword)) for m in query.file_matches):
                    yield dict(found.values), file_values
            if len(page) < PAGE:
                return
            after = page[-1].key

    def _file_values(self, found: Found, keys: tuple[Key, ...]) -> dict[str, str]:
        if not keys:
            return {}
        if found.path is None:
            return {k.keyword: "" for k in keys}
        return read_file_values(self.data_dir / found.path, keys)
