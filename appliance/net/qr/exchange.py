"""What the Query/Retrieve handlers share: gathering a request's Identifier, and noticing
a C-CANCEL-RQ between two responses."""

from __future__ import annotations

from typing import Callable

from appliance.net.dimse import CommandField, Message, Tag
from appliance.net.ul import DataSetSink, ProtocolError

#: The largest Identifier accepted: a query is a few hundred bytes; a list of UIDs to
#: retrieve can be long (15,000 UIDs of 64 characters), but not without bound.
MAX_IDENTIFIER_BYTES = 1 << 20


def gather(msg: Message, answer: Callable[[Message, bytes], None]) -> DataSetSink:
    """Collect the request's Identifier (at most :data:`MAX_IDENTIFIER_BYTES`), then
    ``answer(msg, identifier)``. ProtocolError if the request says no data set follows."""
    name = {CommandField.C_FIND_RQ: "C-FIND", CommandField.C_MOVE_RQ: "C-MOVE",
            CommandField.C_GET_RQ: "C-GET"}.get(CommandField(msg.request.command_field), "request")
    if not msg.request.has_data_set:
        raise ProtocolError(f"{name} request without an identifier")
    buf = bytearray()

    def write(data: memoryview) -> None:
        if len(buf) + len(data) > MAX_IDENTIFIER_BYTES:
            raise ProtocolError(f"a {name} identifier of more than {MAX_IDENTIFIER_BYTES} bytes")
        buf.extend(data)

    return DataSetSink(write, lambda: answer(msg, bytes(buf)), buf.clear)


def cancelled(msg: Message) -> bool:
    """Whether the peer has sent a C-CANCEL-RQ for ``msg`` (read without waiting). A
    C-CANCEL-RQ for another message is ignored; any other command is a protocol error."""
    assert msg.link is not None
    while (incoming := msg.link.poll()) is not None:
        if incoming.command_field != CommandField.C_CANCEL_RQ:
            raise ProtocolError(f"DIMSE command 0x{incoming.command_field:04X} while a request was being answered")
        if incoming.us(Tag.MESSAGE_ID_BEING_RESPONDED_TO) == msg.request.message_id:
            return True
    return False
