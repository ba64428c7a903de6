"""Repeated A-ASSOCIATE-RQs are negotiated once (appliance.net.negotiation): the answer to a
repeated request is byte for byte the answer a fresh negotiation gives, its AE titles are
read and checked afresh, and the called AE title check and the association limit apply as
before. Real sockets on loopback, real DCMTK echoscu and storescu."""

from __future__ import annotations

import socket

from helpers import associate_rq_pdu, ct_series, dcmtk, read_pdu, run, wait_for, write_series

from appliance.conformance import SOPClass, TransferSyntax

A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ABORT = 0x02, 0x03, 0x07
CONTEXTS = [(SOPClass.CT_IMAGE, [TransferSyntax.EXPLICIT_LE, TransferSyntax.IMPLICIT_LE]),
            (SOPClass.MR_IMAGE, [TransferSyntax.IMPLICIT_LE]),
            ("1.2.840.10008.5.1.4.1.1.77.1.6", [TransferSyntax.IMPLICIT_LE]),  # not ours: refused in the AC
            (SOPClass.VERIFICATION, [TransferSyntax.IMPLICIT_LE])]


def _answer(srv, rq: bytes) -> tuple[int, bytes]:  # type: ignore[no-untyped-def]
    """Send the A-ASSOCIATE-RQ ``rq`` to the server ``srv`` and return the answer's PDU type
    and whole PDU; then hang up, and wait until the server has finished with the connection
    (its log line about it belongs to this test)."""
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.settimeout(10)
        s.sendall(rq)
        kind, body = read_pdu(s)
    wait_for(lambda: srv.server.active() == 0, what="the server to let the connection go")
    return kind, body


def test_a_repeated_request_gets_the_answer_a_fresh_negotiation_gives(make_server):
    cached = make_server(name="a")
    first = associate_rq_pdu(contexts=CONTEXTS, calling="CT_SIM")
    again = associate_rq_pdu(contexts=CONTEXTS, calling="PLANNING_2")
    assert first[42:] == again[42:] and first[26:42] != again[26:42]
    kind, _ = _answer(cached, first)
    assert kind == A_ASSOCIATE_AC
    repeated = _answer(cached, again)
    fresh = _answer(make_server(name="b"), again)  # a new server has negotiated nothing yet
    assert repeated == fresh and repeated[0] == A_ASSOCIATE_AC
    assert b"PLANNING_2      " in repeated[1]


def test_a_repeated_request_is_still_checked(make_server):
    """Its called AE title (the check is on), and its calling AE title as pynetdicom reads
    it: one of spaces only is malformed, and aborted as before."""
    from dataclasses import replace

    from appliance.config import ScpConfig

    srv = make_server(replace(ScpConfig(), check_called_ae=True))
    good = associate_rq_pdu(contexts=CONTEXTS, calling="CT_SIM")
    assert _answer(srv, good)[0] == A_ASSOCIATE_AC
    wrong_called = associate_rq_pdu(called="SOMEONE_ELSE", contexts=CONTEXTS, calling="CT_SIM")
    assert wrong_called[42:] == good[42:]
    assert _answer(srv, wrong_called)[0] == A_ASSOCIATE_RJ
    blank_calling = good[:26] + b" " * 16 + good[42:]
    assert _answer(srv, blank_calling)[0] == A_ABORT
    assert _answer(srv, good)[0] == A_ASSOCIATE_AC  # and it serves on


def test_dcmtk_peers_store_and_echo_through_repeated_negotiations(make_server, tmp_path):
    """storescu proposes 128 contexts; the second and third associations (other calling AE
    titles) reuse the first's negotiation, and every object is stored under its own
    calling AE title."""
    srv = make_server()
    series = ct_series(3)
    paths = write_series(series, tmp_path / "ct")
    for i, path in enumerate(paths):
        r = run([dcmtk("storescu"), "-aet", f"MODALITY{i}", "-aec", srv.ae_title, "127.0.0.1", str(srv.port),
                 str(path)])
        assert r.returncode == 0, r.stdout + r.stderr
    assert run([dcmtk("echoscu"), "-aec", srv.ae_title, "127.0.0.1", str(srv.port)]).returncode == 0
    assert all(srv.store.locate(ds.SOPInstanceUID) is not None for ds in series)
    rows = {r.sop_instance_uid: r.calling_ae for r in srv.store.instances()}
    assert sorted(rows.values()) == ["MODALITY0", "MODALITY1", "MODALITY2"]
