"""DIMSE command sets: our encoding read back by pydicom and pydicom's read back by us, the
named fields of a request, and what a malformed command set raises."""

from __future__ import annotations

import struct

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pynetdicom.dsutils import encode

from appliance.conformance import SOPClass, Status
from appliance.net.dimse import (
    ERROR_COMMENT_MAX,
    NO_DATA_SET,
    CommandField,
    Request,
    Tag,
    decode_command,
    encode_command,
    encode_response,
    uid,
    us,
)
from appliance.net.ul import ProtocolError

CT = SOPClass.CT_IMAGE


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
