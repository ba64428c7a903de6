"""DIMSE: our command sets read back by pydicom and pynetdicom's read back by us, the named
fields of a request, what a malformed command set raises, and the service table routing
C-ECHO and C-STORE (and aborting anything else) on real associations on loopback."""

from __future__ import annotations

import logging
import socket
import struct
from typing import Iterator

import pytest
from helpers import associate_rq_pdu, ct_series, p_data_pdu, read_pdu, wait_for
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pynetdicom import AE
from pynetdicom.dsutils import encode

from appliance.config import ScpConfig
from appliance.conformance import SCP_STORAGE_CLASSES, SOPClass, Status, TransferSyntax
from appliance.net.acceptor import Acceptor
from appliance.net.dimse import (
    ERROR_COMMENT_MAX,
    NO_DATA_SET,
    SERVICES,
    CommandField,
    Request,
    Tag,
    decode_command,
    encode_command,
    encode_response,
    service_for,
    uid,
    us,
)
from appliance.net.ul import A_ABORT_PDU, A_ASSOCIATE_AC_PDU, ProtocolError
from appliance.store.ingest import Outcome

CT = SOPClass.CT_IMAGE
ILE = TransferSyntax.IMPLICIT_LE


def _store_rq(instance_uid: bytes = b"1.2.3.4", message_id: int = 7) -> list[tuple[int, bytes]]:
    return [
        (Tag.AFFECTED_SOP_CLASS_UID, uid(CT)),
        (Tag.COMMAND_FIELD, us(CommandField.C_STORE_RQ)),
        (Tag.MESSAGE_ID, us(message_id)),
        (Tag.PRIORITY, us(0)),
        (Tag.COMMAND_DATA_SET_TYPE, us(0x0000)),
        (Tag.AFFECTED_SOP_INSTANCE_UID, instance_uid),
    ]


def _pydicom(data: bytes) -> Dataset:
    return read_dataset(DicomBytesIO(data), is_implicit_VR=True, is_little_endian=True)


def test_a_command_set_round_trips_and_pydicom_reads_it():
    data = encode_command(_store_rq(b"1.2.3.456"))
    decoded = decode_command(data)
    assert decoded[Tag.COMMAND_FIELD] == us(CommandField.C_STORE_RQ)
    assert decoded[Tag.AFFECTED_SOP_INSTANCE_UID] == b"1.2.3.456\x00"  # padded to even length
    assert struct.unpack("<L", decoded[Tag.COMMAND_GROUP_LENGTH])[0] == len(data) - 12
    ds = _pydicom(data)
    assert ds.CommandGroupLength == len(data) - 12
    assert ds.CommandField == CommandField.C_STORE_RQ and ds.MessageID == 7
    assert ds.AffectedSOPClassUID == CT and ds.AffectedSOPInstanceUID == "1.2.3.456"


def test_we_read_a_command_set_pynetdicom_encodes():
    ds = Dataset()
    ds.AffectedSOPClassUID = SOPClass.VERIFICATION
    ds.CommandField = CommandField.C_ECHO_RQ
    ds.MessageID = 513
    ds.CommandDataSetType = NO_DATA_SET
    body = encode(ds, True, True)
    assert body is not None
    request = Request.decode(body)
    assert request.command_field == CommandField.C_ECHO_RQ
    assert request.message_id == 513 and not request.has_data_set
    assert request.affected_sop_class_uid == SOPClass.VERIFICATION


def test_a_request_names_its_fields():
    request = Request.decode(encode_command(_store_rq(b"1.2.840.99\xff", message_id=65535)))
    assert request.command_field == CommandField.C_STORE_RQ
    assert CommandField(request.command_field).name == "C_STORE_RQ"
    assert request.message_id == 65535 and request.has_data_set
    assert request.affected_sop_class_uid == CT and request.affected_sop_class_uid_raw == uid(CT)
    assert request.affected_sop_instance_uid_raw == b"1.2.840.99\xff"  # the peer's own bytes
    assert request.affected_sop_instance_uid == "1.2.840.99\ufffd"


def test_the_command_fields_of_ps3_7_have_names():
    assert CommandField.C_FIND_RQ == 0x0020 and CommandField.C_MOVE_RQ == 0x0021
    assert CommandField.C_GET_RQ == 0x0010 and CommandField.N_EVENT_REPORT_RQ == 0x0100
    assert CommandField.N_ACTION_RQ == 0x0130 and CommandField.C_CANCEL_RQ == 0x0FFF
    for field in CommandField:  # a response is its request with the high bit set
        if field.name.endswith("_RSP"):
            assert CommandField[field.name[:-4] + "_RQ"] == field & 0x7FFF


def test_a_response_names_what_the_request_sent():
    data = encode_response(CommandField.C_STORE_RSP, CT, 7, Status.REFUSED_MODALITY,
                           error_comment="modality  MG\nis not accepted " + "x" * 80,
                           sop_instance_uid=b"1.2.3")
    ds = _pydicom(data)
    assert ds.CommandField == CommandField.C_STORE_RSP and ds.MessageIDBeingRespondedTo == 7
    assert ds.Status == Status.REFUSED_MODALITY and ds.CommandDataSetType == NO_DATA_SET
    assert ds.AffectedSOPClassUID == CT and ds.AffectedSOPInstanceUID == "1.2.3"
    assert len(ds.ErrorComment) == ERROR_COMMENT_MAX and ds.ErrorComment.startswith("modality MG is not")
    assert ds.ErrorComment.endswith("...")
    echo = _pydicom(encode_response(CommandField.C_ECHO_RSP, SOPClass.VERIFICATION, 1, Status.SUCCESS))
    assert "ErrorComment" not in echo and "AffectedSOPInstanceUID" not in echo


@pytest.mark.parametrize("data, words", [
    (encode_command(_store_rq())[:-3], "malformed"),
    (encode_command(_store_rq()) + b"\x00\x00\x00", "truncated"),
    (struct.pack("<HHL", 0x0008, 0x0016, 2) + b"1\x00", "malformed"),
    (encode_command([(Tag.COMMAND_FIELD, us(CommandField.C_ECHO_RQ))]), "missing"),
    (encode_command([(Tag.COMMAND_FIELD, b"\x30\x00\x00\x00"), (Tag.MESSAGE_ID, us(1))]), "missing"),
])
def test_a_malformed_command_set_is_a_protocol_error(data: bytes, words: str):
    with pytest.raises(ProtocolError, match=words):
        Request.decode(data)


def test_a_store_request_without_a_data_set_type_is_a_protocol_error():
    request = Request.decode(encode_command([e for e in _store_rq() if e[0] != Tag.COMMAND_DATA_SET_TYPE]))
    with pytest.raises(ProtocolError, match="missing"):
        request.has_data_set


# -- the service table, through real associations on loopback ---------------------------


class _Received:
    """A data set streamed into the test instead of the store (like bench/sink.py)."""

    def __init__(self, sink: _Sink, args: tuple[str, str, str, str]) -> None:
        self.sink, self.args, self.data = sink, args, bytearray()

    def write(self, data: memoryview) -> None:
        self.data += data

    def finish(self) -> Outcome:
        self.sink.finished.append(self)
        return Outcome(Status.SUCCESS, "received", self.args[2])

    def settle(self) -> None:
        pass

    def discard(self) -> None:
        pass


class _Sink:
    def __init__(self) -> None:
        self.finished: list[_Received] = []

    def open_stream(self, *args: str) -> _Received:
        return _Received(self, (args[0], args[1], args[2], args[3]))


@pytest.fixture
def sink_acceptor() -> Iterator[tuple[_Sink, int]]:
    sink = _Sink()
    acceptor = Acceptor(ScpConfig(max_pdu=16384, check_called_ae=True, acse_timeout=5.0, network_timeout=5.0), sink.open_stream)
    _, port = acceptor.listen("127.0.0.1", 0)
    try:
        yield sink, port
    finally:
        acceptor.stop(1.0)


def test_the_table_has_a_row_for_c_echo_and_c_store():
    assert set(SERVICES) == {CommandField.C_ECHO_RQ, CommandField.C_STORE_RQ}
    assert SERVICES[CommandField.C_ECHO_RQ].contexts == {SOPClass.VERIFICATION}
    assert SERVICES[CommandField.C_STORE_RQ].contexts == SCP_STORAGE_CLASSES
    assert service_for(Request.decode(encode_command(_store_rq()))) is SERVICES[CommandField.C_STORE_RQ]


def test_c_echo_and_c_store_are_routed_to_their_handlers(sink_acceptor):
    sink, port = sink_acceptor
    ds = ct_series(1)[0]
    ae = AE("PYSCU")
    ae.add_requested_context(SOPClass.VERIFICATION)
    ae.add_requested_context(CT, [TransferSyntax.IMPLICIT_LE])
    assoc = ae.associate("127.0.0.1", port, ae_title="ELEKTA_STORAGE")
    try:
        assert assoc.is_established
        assert assoc.send_c_echo(msg_id=11).Status == Status.SUCCESS
        assert not sink.finished
        assert assoc.send_c_store(ds, msg_id=12).Status == Status.SUCCESS
    finally:
        assoc.release()
    [received] = sink.finished
    assert received.args == (TransferSyntax.IMPLICIT_LE, CT, ds.SOPInstanceUID, "PYSCU")
    assert _pydicom(bytes(received.data)).SOPInstanceUID == ds.SOPInstanceUID


def _abort_reason(port: int, contexts: list[tuple[str, list[str]]], command: bytes,
                  caplog: pytest.LogCaptureFixture) -> str:
    """Send ``command`` on context 1 of a fresh association; expect an A-ABORT and return
    the acceptor's reason for it."""
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(10)
    with caplog.at_level(logging.WARNING, logger="appliance.net.acceptor"):
        s.sendall(associate_rq_pdu(contexts=contexts))
        assert read_pdu(s)[0] == A_ASSOCIATE_AC_PDU
        s.sendall(p_data_pdu(1, 0x03, command))
        assert read_pdu(s)[0] == A_ABORT_PDU
        s.close()
        wait_for(lambda: "aborting association" in caplog.text, what="the abort's log line")
    [line] = [r.getMessage() for r in caplog.records if "aborting association" in r.getMessage()]
    return line.split(": ", 1)[1]


@pytest.mark.parametrize("field", [CommandField.C_FIND_RQ, 0x1234])  # one without a row, one not in PS3.7
def test_an_unknown_command_field_is_aborted(sink_acceptor, caplog, field):
    _, port = sink_acceptor
    command = encode_command([
        (Tag.AFFECTED_SOP_CLASS_UID, uid(SOPClass.VERIFICATION)),
        (Tag.COMMAND_FIELD, us(field)),
        (Tag.MESSAGE_ID, us(3)),
        (Tag.COMMAND_DATA_SET_TYPE, us(NO_DATA_SET)),
    ])
    assert _abort_reason(port, [(SOPClass.VERIFICATION, [ILE])], command, caplog) == \
        f"unsupported DIMSE command 0x{field:04X}"


@pytest.mark.parametrize("field, context, words", [
    (CommandField.C_ECHO_RQ, CT, "C-ECHO on a storage context"),
    (CommandField.C_STORE_RQ, SOPClass.VERIFICATION, "C-STORE on the verification context"),
])
def test_a_service_on_a_context_it_does_not_serve_is_aborted(sink_acceptor, caplog, field, context, words):
    sink, port = sink_acceptor
    command = encode_command([
        (Tag.AFFECTED_SOP_CLASS_UID, uid(context)),
        (Tag.COMMAND_FIELD, us(field)),
        (Tag.MESSAGE_ID, us(4)),
        (Tag.COMMAND_DATA_SET_TYPE, us(NO_DATA_SET)),
    ])
    assert _abort_reason(port, [(context, [ILE])], command, caplog) == words
    assert not sink.finished
