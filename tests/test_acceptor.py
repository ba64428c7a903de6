"""The acceptor's limits: deadlines that a trickling peer cannot stretch, caps on what a peer
can make it hold, an accept loop that outlives running out of descriptors, and a connection
thread that never dies of an exception. Real sockets on loopback; each test fails on the
acceptor before issue 14."""

from __future__ import annotations

import logging
import os
import resource
import socket
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

from helpers import (
    ROOT,
    associate_rq_pdu,
    ct_series,
    dcmtk,
    p_data_pdu,
    read_pdu,
    run,
    wait_for,
    write_series,
)
from pynetdicom import AE
from pynetdicom.presentation import PresentationContext

from appliance.config import ScpConfig
from appliance.conformance import SOPClass, Status, TransferSyntax
from appliance.net.acceptor import SELF_CHECK_AE_TITLE, Acceptor, Association, PeerLog
from appliance.net.dimse import CommandField, Tag, encode_command
from appliance.net.scp import report
from appliance.ops import health

ILE = TransferSyntax.IMPLICIT_LE
A_ASSOCIATE_AC, P_DATA, A_ABORT = 0x02, 0x04, 0x07


def _associated(port: int, contexts=None) -> socket.socket:  # type: ignore[no-untyped-def]
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(10)
    s.sendall(associate_rq_pdu(contexts=contexts))
    kind, _ = read_pdu(s)
    assert kind == A_ASSOCIATE_AC
    return s


def _trickle_until_closed(s: socket.socket, data: bytes, every: float, limit: float) -> tuple[float, bytes]:
    """Send ``data`` one byte per ``every`` seconds (pacing on purpose: this is the slow
    peer) until the server answers or closes; return (seconds taken, what it sent)."""
    started = time.monotonic()
    s.settimeout(every)
    for byte in data:
        if time.monotonic() - started > limit:
            break
        try:
            s.send(bytes([byte]))
            answer = s.recv(64)
            return time.monotonic() - started, answer
        except socket.timeout:
            continue
        except OSError:
            return time.monotonic() - started, b""
    return time.monotonic() - started, b"(still open)"


def test_a_trickled_associate_rq_is_closed_at_the_acse_deadline(make_server):
    srv = make_server(ScpConfig(acse_timeout=1.0))
    s = socket.create_connection(("127.0.0.1", srv.port))
    took, answer = _trickle_until_closed(s, associate_rq_pdu(), every=0.1, limit=5)
    s.close()
    assert answer == b"", answer
    assert 0.9 <= took < 2.5


def test_a_trickled_pdu_is_aborted_at_the_pdu_deadline(make_server):
    srv = make_server(ScpConfig(pdu_timeout=1.0, network_timeout=5.0))
    s = _associated(srv.port)
    pdu = p_data_pdu(1, 0x03, b"\x00" * 200)
    took, answer = _trickle_until_closed(s, pdu, every=0.1, limit=5)
    s.close()
    assert answer[:1] == bytes([A_ABORT]), answer
    assert 0.9 <= took < 2.5
    wait_for(lambda: srv.server.active() == 0, what="the slot to free up")


def test_an_association_that_completes_no_message_is_aborted_after_the_idle_timeout(make_server):
    srv = make_server(ScpConfig(idle_timeout=1.5, pdu_timeout=5.0, network_timeout=5.0))
    s = _associated(srv.port)
    s.settimeout(0.2)
    started = time.monotonic()
    answer = b""
    while time.monotonic() - started < 6:  # whole PDUs, each a command fragment that never ends
        try:
            s.sendall(p_data_pdu(1, 0x01, b"\x00" * 8))
            answer = s.recv(64)
            break
        except socket.timeout:
            continue
    took = time.monotonic() - started
    s.close()
    assert answer[:1] == bytes([A_ABORT]), answer
    assert 1.4 <= took < 3.5


def test_a_command_set_over_the_cap_is_aborted(make_server):
    srv = make_server(ScpConfig(max_command_bytes=65536, max_pdu=262144))
    s = _associated(srv.port)
    sent = 0

    def bomb() -> None:
        nonlocal sent
        try:
            for _ in range(64):  # 1 MiB of command fragments, never the last one
                s.sendall(p_data_pdu(1, 0x01, b"\x00" * 16384))
                sent += 16384
        except OSError:
            pass

    t = threading.Thread(target=bomb, daemon=True)
    t.start()
    kind, _ = read_pdu(s)
    t.join(10)
    s.close()
    assert kind == A_ABORT
    assert sent <= 1 << 20


def test_an_announced_associate_rq_length_allocates_nothing_before_its_bytes(make_server):
    """A peer announcing a 128 KiB A-ASSOCIATE-RQ and sending nothing more costs a socket,
    not 128 KiB: buffers grow as bytes arrive."""
    srv = make_server(ScpConfig(max_associate_rq_bytes=131072, acse_timeout=30.0))
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        socks = []
        for _ in range(100):
            s = socket.create_connection(("127.0.0.1", srv.port))
            s.sendall(b"\x01\x00" + struct.pack(">L", 131072))
            socks.append(s)
        wait_for(lambda: srv.server.state().pending == 100, what="100 pending connections")
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    for s in socks:
        s.close()
    assert after - before < 2 * 2**20, f"{(after - before) / 2**20:.1f} MiB held for 100 announced RQs"


def test_a_uid_that_is_not_ascii_is_still_answered(make_server):
    """A C-STORE whose Affected SOP Instance UID holds byte 0xFF gets a C-STORE response
    naming the peer's own bytes (a refusal), never a dead connection."""
    srv = make_server()
    s = _associated(srv.port, contexts=[(SOPClass.CT_IMAGE, [ILE])])
    uid = b"1.2.840.99\xff"
    command = encode_command([
        (Tag.AFFECTED_SOP_CLASS_UID, SOPClass.CT_IMAGE.encode()),
        (Tag.COMMAND_FIELD, struct.pack("<H", CommandField.C_STORE_RQ)),
        (Tag.MESSAGE_ID, struct.pack("<H", 7)),
        (Tag.PRIORITY, struct.pack("<H", 0)),
        (Tag.COMMAND_DATA_SET_TYPE, struct.pack("<H", 0x0000)),
        (Tag.AFFECTED_SOP_INSTANCE_UID, uid),
    ])
    def element(group: int, elem: int, value: bytes) -> bytes:
        if len(value) % 2:
            value += b"\x00"
        return struct.pack("<HHL", group, elem, len(value)) + value

    data_set = element(0x0008, 0x0016, SOPClass.CT_IMAGE.encode()) + element(0x0008, 0x0018, uid)
    s.sendall(p_data_pdu(1, 0x03, command) + p_data_pdu(1, 0x02, data_set))
    kind, body = read_pdu(s)
    s.close()
    assert kind == P_DATA
    assert body[5] == 0x03  # a whole command: the C-STORE response
    assert b"\x00\x00\x00\x10" + struct.pack("<L", 12) + uid + b"\x00" in body
    status_at = body.index(b"\x00\x00\x00\x09")
    assert struct.unpack("<H", body[status_at + 8 : status_at + 10])[0] != Status.SUCCESS


def test_an_exception_in_a_connection_thread_is_logged_once_and_the_server_serves_on(caplog):
    def broken_open_stream(*_args: str):  # type: ignore[no-untyped-def]
        raise RuntimeError("a bug in the store")

    settings = ScpConfig(max_pdu=16384, acse_timeout=5.0, network_timeout=5.0)
    acceptor = Acceptor(settings, broken_open_stream)
    _, port = acceptor.listen("127.0.0.1", 0)
    try:
        s = _associated(port, contexts=[(SOPClass.CT_IMAGE, [ILE])])
        command = encode_command([
            (Tag.AFFECTED_SOP_CLASS_UID, SOPClass.CT_IMAGE.encode()),
            (Tag.COMMAND_FIELD, struct.pack("<H", CommandField.C_STORE_RQ)),
            (Tag.MESSAGE_ID, struct.pack("<H", 1)),
            (Tag.COMMAND_DATA_SET_TYPE, struct.pack("<H", 0x0000)),
            (Tag.AFFECTED_SOP_INSTANCE_UID, b"1.2.3.4"),
        ])
        with caplog.at_level(logging.WARNING, logger="appliance.net.acceptor"):
            s.sendall(p_data_pdu(1, 0x03, command))
            kind, _ = read_pdu(s)
            s.close()
            wait_for(lambda: acceptor.associated() == 0, what="the slot to free up")
        assert kind == A_ABORT
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "a bug in the store" in errors[0].getMessage() + str(errors[0].exc_info)
        ae = AE("PYSCU")
        ae.add_requested_context(SOPClass.VERIFICATION)
        assoc = ae.associate("127.0.0.1", port, ae_title="ELEKTA_STORAGE")
        assert assoc.is_established and assoc.send_c_echo().Status == Status.SUCCESS
        assoc.release()
    finally:
        acceptor.stop(1.0)


def test_malformed_associate_rqs_log_one_line_without_a_traceback(server, caplog):
    rq = bytearray(associate_rq_pdu())
    rq[74:80] = b"\x99\x99\x99\x99\x99\x99"  # the first item's type and length: garbage
    with caplog.at_level(logging.DEBUG):
        for _ in range(50):
            s = socket.create_connection(("127.0.0.1", server.port))
            s.settimeout(10)
            s.sendall(bytes(rq))
            assert read_pdu(s)[0] in (A_ABORT, 0)
            s.close()
    ours = [r for r in caplog.records if "malformed A-ASSOCIATE-RQ" in r.getMessage()]
    assert 1 <= len(ours) <= 2  # rate-limited per peer address
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


def _limit_fds(n: int):  # type: ignore[no-untyped-def]
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))


def test_the_accept_loop_survives_running_out_of_descriptors(tmp_path: Path):
    """At a 64-descriptor limit, a connect flood makes accept(2) fail with EMFILE: the SCP
    sheds the waiting connections, says so once, and serves the next scanner."""
    cfg = tmp_path / "appliance.toml"
    cfg.write_text("[scp]\nport = 11112\nmax_pending_connections = 4096\nacse_timeout = 30.0\n")
    log_path = tmp_path / "scp.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance", "--config", str(cfg), "--data-dir", str(tmp_path / "d"),
             "scp", "--bind", "127.0.0.1", "0"],
            stderr=log_file, env=dict(os.environ, PYTHONPATH=str(ROOT)), preexec_fn=_limit_fds(64))
    try:
        text = wait_for(lambda: "listening on" in log_path.read_text() and log_path.read_text(), 30,
                        "the listening line")
        port = int(str(text).split("listening on 127.0.0.1:")[1].split(",")[0])
        flood = []
        for _ in range(200):
            try:
                flood.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            except OSError:
                break
        wait_for(lambda: "out of resources accepting connections" in log_path.read_text(), 15,
                 "the SCP to notice it ran out of descriptors")
        for s in flood:
            s.close()
        r = run([dcmtk("echoscu"), "-to", "5", "-aec", "ELEKTA_STORAGE", "127.0.0.1", str(port)])
        assert r.returncode == 0, r.stderr
        files = write_series(ct_series(2), tmp_path / "s")
        r = run([dcmtk("storescu"), "-to", "10", "-aec", "ELEKTA_STORAGE", "127.0.0.1", str(port),
                 *map(str, files)], timeout=60)
        assert r.returncode == 0, r.stderr
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(20)
    text = log_path.read_text()
    assert "Traceback" not in text
    assert text.count("out of resources accepting connections") == 1


def test_the_scp_report_says_when_it_does_not_accept(server):
    fields = dict(line.split("=", 1) for line in report(server.server, ""))
    assert fields["X_ACCEPTING"] == "1" and int(fields["X_FDS"]) > 0 and int(fields["X_THREADS"]) > 0
    problem, detail = health.scp_report_view(fields, 1.0, 60.0)
    assert problem == "" and "open files" in detail
    server.server.stop(grace=0.5)
    fields = dict(line.split("=", 1) for line in report(server.server, ""))
    problem, _ = health.scp_report_view(fields, 1.0, 60.0)
    assert "not accepting connections" in problem
    h = health.Health("A:1", True, "", {}, 1.0, scp_problem=problem)
    assert not h.ok and problem in h.status_line() and problem in h.render()
    assert "has not reported" in health.scp_report_view(fields, 60.0, 600.0)[0]
    assert "cannot store" in health.scp_report_view({**fields, "X_ACCEPTING": "1",
                                                     "X_SELF_STORE": "store degraded: read-only"}, 1.0, 60.0)[0]


def _without_abstract_syntax(rq: bytes) -> bytes:
    """``rq`` with its first presentation context's abstract syntax sub-item (0x30) cut out,
    every length fixed: a context that negotiation cannot read (found by the soak's fuzz)."""
    pos = 6 + 68  # items after the fixed fields
    while rq[pos] != 0x20:
        pos += 4 + struct.unpack_from(">H", rq, pos + 2)[0]
    (item_len,) = struct.unpack_from(">H", rq, pos + 2)
    sub = pos + 8  # context id, 3 reserved bytes
    assert rq[sub] == 0x30
    sub_len = 4 + struct.unpack_from(">H", rq, sub + 2)[0]
    item = rq[pos:sub] + rq[sub + sub_len : pos + 4 + item_len]
    item = item[:2] + struct.pack(">H", len(item) - 4) + item[4:]
    body = rq[6:pos] + item + rq[pos + 4 + item_len :]
    return rq[:2] + struct.pack(">L", len(body)) + body


def test_a_presentation_context_without_an_abstract_syntax_is_one_warning(server, caplog):
    with caplog.at_level(logging.DEBUG):
        s = socket.create_connection(("127.0.0.1", server.port))
        s.settimeout(10)
        s.sendall(_without_abstract_syntax(associate_rq_pdu()))
        assert read_pdu(s)[0] == A_ABORT
        s.close()
        wait_for(lambda: server.server.active() == 0, what="the slot to free up")
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert [r for r in caplog.records if "malformed presentation context" in r.getMessage()]
    r = run([dcmtk("echoscu"), "-to", "5", "-aec", server.ae_title, "127.0.0.1", str(server.port)])
    assert r.returncode == 0, r.stderr


def test_library_warnings_go_to_debug_not_the_journal(capsys):
    import warnings

    from appliance import logs

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        _warnings_to_debug(logs, warnings, capsys)
    finally:
        root.handlers[:], root.level = saved[0], saved[1]


def _warnings_to_debug(logs, warnings, capsys) -> None:  # type: ignore[no-untyped-def]
    logs.setup(0)
    logging.getLogger("pydicom").warning("Invalid value for VR UI: '1.2.x'")
    warnings.warn("Invalid value for VR UI", UserWarning, stacklevel=1)
    assert "Invalid value" not in capsys.readouterr().err
    logs.setup(2)
    logging.getLogger("pydicom").warning("Invalid value for VR UI: '1.2.y'")
    assert "DEBUG pydicom: Invalid value for VR UI: '1.2.y'" in capsys.readouterr().err


# -- who is talking to the box: the first association from each peer -----------------------------


def _info_lines(caplog) -> list[str]:  # type: ignore[no-untyped-def]
    return [r.getMessage() for r in caplog.records
            if r.name == "appliance.net.acceptor" and r.levelno >= logging.INFO]


def _echoscu(port: int, aet: str) -> None:
    r = run([dcmtk("echoscu"), "-to", "5", "-aet", aet, "-aec", "ELEKTA_STORAGE", "127.0.0.1", str(port)])
    assert r.returncode == 0, r.stdout + r.stderr


def test_an_echo_from_a_new_peer_is_one_info_line_a_repeat_and_the_self_check_are_not(server, caplog, tmp_path):
    """An admin's echoscu from a new system shows in the journal; echoing again within the
    hour, and the supervisor's own echo every few seconds, write only DEBUG lines."""
    assert SELF_CHECK_AE_TITLE == health.HEALTH_AE_TITLE  # the supervisor's echo is the one kept quiet
    with caplog.at_level(logging.DEBUG, logger="appliance.net.acceptor"):
        _echoscu(server.port, "ADMIN_PC")
        wait_for(lambda: _info_lines(caplog), what="the first association's line")
        assert _info_lines(caplog) == ["first association from ADMIN_PC at 127.0.0.1: C-ECHO answered"]
        released = lambda: sum("association from ADMIN_PC released" in r.getMessage()  # noqa: E731
                               for r in caplog.records)
        _echoscu(server.port, "ADMIN_PC")
        wait_for(lambda: released() == 2, what="the second echo to end")
        for _ in range(3):
            assert health.echo("127.0.0.1", server.port, "ELEKTA_STORAGE") is None
        wait_for(lambda: server.server.active() == 0, what="the self-checks to end")
        _echoscu(server.port, "OTHER_PC")
        wait_for(lambda: len(_info_lines(caplog)) == 2, what="the other peer's line")
        files = write_series(ct_series(2), tmp_path / "series")
        r = run([dcmtk("storescu"), "-aet", "CT_ROOM_1", "-aec", "ELEKTA_STORAGE", "127.0.0.1", str(server.port),
                 *map(str, files)])
        assert r.returncode == 0, r.stdout + r.stderr
        wait_for(lambda: any("CT_ROOM_1 at" in line for line in _info_lines(caplog)), what="the store's line")
    lines = _info_lines(caplog)
    assert lines[1] == "first association from OTHER_PC at 127.0.0.1: C-ECHO answered"
    assert "first association from CT_ROOM_1 at 127.0.0.1: 2 C-STORE requests answered" in lines
    assert not [line for line in lines if "ADMIN_PC" in line][1:]
    assert not [line for line in lines if SELF_CHECK_AE_TITLE in line]
    assert sum(SELF_CHECK_AE_TITLE in r.getMessage() for r in caplog.records) >= 3  # at DEBUG


def _echo_association(calling: str, host: str) -> Association:
    cx = PresentationContext()
    cx.context_id, cx.abstract_syntax, cx.transfer_syntax = 1, SOPClass.VERIFICATION, [ILE]
    assoc = Association(calling, f"{host}:40000", {1: cx}, 16384)
    assoc.requests["C-ECHO"] += 1
    return assoc


def test_repeated_echoes_are_one_info_line_per_peer_per_interval(caplog):
    peers = PeerLog(every=3600.0)
    with caplog.at_level(logging.DEBUG, logger="appliance.net.acceptor"):
        for minute in range(0, 125, 5):  # a monitoring system's echo every 5 minutes, 2 hours long
            peers.note(_echo_association("MONITOR", "10.0.0.5"), True, now=minute * 60.0)
    assert _info_lines(caplog) == [
        "first association from MONITOR at 10.0.0.5: C-ECHO answered",
        "association from MONITOR at 10.0.0.5: C-ECHO answered (12 association(s) from it in the last 60 min)",
        "association from MONITOR at 10.0.0.5: C-ECHO answered (12 association(s) from it in the last 60 min)",
    ]
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="appliance.net.acceptor"):
        for host in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):  # the supervisor's own echo, at any time
            peers.note(_echo_association(SELF_CHECK_AE_TITLE, host), True, now=9000.0)
        peers.note(_echo_association(SELF_CHECK_AE_TITLE, "10.0.0.9"), True, now=9000.0)  # not ours: from afar
    assert _info_lines(caplog) == [f"first association from {SELF_CHECK_AE_TITLE} at 10.0.0.9: C-ECHO answered"]


def test_the_peers_remembered_are_bounded_least_recently_seen_forgotten_first(caplog):
    peers = PeerLog(every=3600.0, max_peers=1000)
    peers.note(_echo_association("REGULAR", "10.0.0.1"), True, now=0.0)
    for i in range(20_000):  # a peer inventing a new AE title each time
        peers.note(_echo_association(f"X{i}", "10.6.6.6"), True, now=1.0)
        if i % 500 == 0:
            peers.note(_echo_association("REGULAR", "10.0.0.1"), True, now=1.0)  # seen now and then: kept
    assert len(peers) == 1000
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="appliance.net.acceptor"):
        peers.note(_echo_association("REGULAR", "10.0.0.1"), True, now=2.0)
        peers.note(_echo_association("X0", "10.6.6.6"), True, now=2.0)
    assert _info_lines(caplog) == ["first association from X0 at 10.6.6.6: C-ECHO answered"]
