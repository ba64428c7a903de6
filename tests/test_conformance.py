"""The conformance tables are the statement's, and no other module writes a UID."""

import re
from pathlib import Path

from appliance import conformance as c
from appliance.conformance import SOPClass, TransferSyntax

PACKAGE = Path(c.__file__).parent


def test_scp_accepts_tables_2_and_3_with_the_statements_preference():
    classes = [r.abstract_syntax for r in c.SCP_CONTEXTS]
    assert classes == [
        SOPClass.CT_IMAGE, SOPClass.MR_IMAGE, SOPClass.XA_IMAGE, SOPClass.PET_IMAGE,
        SOPClass.RT_STRUCTURE_SET, SOPClass.SC_IMAGE, SOPClass.VERIFICATION,
    ]
    for row in c.SCP_CONTEXTS:
        assert row.transfer_syntaxes == (
            TransferSyntax.IMPLICIT_LE, TransferSyntax.EXPLICIT_LE, TransferSyntax.EXPLICIT_BE)
        assert row.role == "SCP"
    assert set(c.TABLE_1) == {r.abstract_syntax for r in c.SCP_CONTEXTS}


def test_client_tables_are_implicit_le_only():
    for row in c.TABLE_6 + c.TABLE_7 + c.TABLE_8:
        assert row.transfer_syntaxes == (TransferSyntax.IMPLICIT_LE,)
    assert {r.abstract_syntax for r in c.TABLE_6} | {r.abstract_syntax for r in c.TABLE_8} == set(c.TABLE_4)
    assert {r.abstract_syntax for r in c.TABLE_7} == set(c.TABLE_5)


def test_media_tables():
    assert c.syntaxes_for(c.TABLE_9, SOPClass.CT_IMAGE)[-2:] == c.JPEG_LOSSLESS
    assert c.syntaxes_for(c.TABLE_9, SOPClass.RT_STRUCTURE_SET) == c.UNCOMPRESSED
    assert c.syntaxes_for(c.TABLE_9, SOPClass.RT_DOSE) == ()
    assert len(c.TABLE_10) == 6 and len(c.TABLE_11) == 2


def test_modalities_and_character_sets():
    assert c.ACCEPTED_MODALITIES == {"CT", "MR", "XA", "PT", "RTSTRUCT", "OT", "DS"}
    assert c.allowed_character_sets(SOPClass.RT_STRUCTURE_SET) == c.RT_CHARACTER_SETS
    assert c.allowed_character_sets(SOPClass.CT_IMAGE) == {"ISO_IR 100"}
    assert len(c.RT_CHARACTER_SETS) == 10


def test_statuses_are_in_the_right_ranges():
    assert c.Status.OUT_OF_RESOURCES >> 8 == 0xA7
    for s in c.Status:
        if s.name.startswith("REFUSED"):
            assert s >> 12 == 0xC
    assert c.Status.SUCCESS.is_success and not c.Status.CANNOT_UNDERSTAND.is_success


def test_no_dicom_uid_literal_outside_conformance():
    uid = re.compile(r"[\"']1\.2\.840\.10008\.[0-9.]+[\"']")
    offenders = [
        f"{p.name}: {m.group(0)}"
        for p in PACKAGE.glob("*.py")
        if p.name != "conformance.py"
        for m in uid.finditer(p.read_text())
    ]
    assert offenders == []
