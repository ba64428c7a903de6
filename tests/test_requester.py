"""The client AE's association requester (appliance.net.requester) against real peers: DCMTK
storescp (what it wrote compared byte for byte with what was stored), our own Storage SCP
(plain and over DICOM TLS), a pynetdicom SCP without a PDU limit, and raw sockets that
misbehave as DICOM peers do: reject, abort mid-transfer, never answer."""

from __future__ import annotations

import re
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext

from appliance.config import Destination, ScpConfig, TlsConfig
from appliance.conformance import (
    CLIENT_AE_TITLE,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    MIN_PDU,
    SOPClass,
    Status,
    TransferSyntax,
)
from appliance.dicom import dicomio
from appliance.errors import NetworkError
from appliance.net.dimse import CommandField, Tag, decode_command
from appliance.net.requester import (
    META_PREFIX,
    Association,
    AssociationLost,
    FramedDataSet,
    associate,
    stored_data_set,
)
from appliance.net.sender import ClientSettings
from appliance.net.ul import A_ABORT_PDU, A_RELEASE_RQ_PDU, P_DATA_TF_PDU, RELEASE_RP, abort_pdu, associate_ac_pdu

from helpers import ct_series, dcmtk, encode, free_port, read_pdu, wait_for
from test_tls import Pki, TlsServer, pki, server_tls  # noqa: F401 - pki is a fixture

PEER_AE = "STORESCP"
CT = str(SOPClass.CT_IMAGE)
IMPLICIT = str(TransferSyntax.IMPLICIT_LE)
EXPLICIT = str(TransferSyntax.EXPLICIT_LE)
CONTEXTS = [(str(SOPClass.VERIFICATION), [IMPLICIT]), (CT, [IMPLICIT]), (CT, [EXPLICIT])]


def implicit_files(folder: Path, n: int, **kw: int) -> list[Path]:
    """``n`` CT slices as Part 10 files in Implicit VR LE (as the box stores what arrives so)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(ct_series(n, **kw)):
        p = folder / f"ct{i:03d}.dcm"
        p.write_bytes(dicomio.file_meta(ds.SOPClassUID, ds.SOPInstanceUID, TransferSyntax.IMPLICIT_LE)
                      + encode(ds, IMPLICIT))
        paths.append(p)
    return paths


def send_files(assoc: Association, files: list[Path], framed: bool = False) -> list[int]:
    """C-STORE each file as stored (``framed``: read by Association.read_stored into one
    buffer reused for every file); the statuses."""
    statuses = []
    buffer = bytearray()
    for f in files:
        stored = assoc.read_stored(f, buffer) if framed else stored_data_set(f)
        cx = assoc.context_for(CT, stored.transfer_syntax)
        assert cx is not None
        uid = str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        data = stored if isinstance(stored, FramedDataSet) else stored.body
        statuses.append(assoc.store(cx, uid, data).status)
    return statuses


# -- DCMTK storescp ----------------------------------------------------------------------


@dataclass
class Storescp:
    port: int
    out: Path
    log: Path
    proc: subprocess.Popen[bytes]

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        return self.log.read_text()


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Callable[..., Storescp]]:
    """DCMTK storescp on a free loopback port, writing exactly what it received (+B)."""
    started: list[Storescp] = []

    def start(*extra: str) -> Storescp:
        n = len(started)
        out, log, port = tmp_path / f"received{n}", tmp_path / f"storescp{n}.log", free_port()
        out.mkdir()
        with open(log, "wb") as f:
            proc = subprocess.Popen([dcmtk("storescp"), "-d", "-aet", PEER_AE, "+B", "-od", str(out), *extra,
                                     str(port)], stdout=f, stderr=subprocess.STDOUT)
        peer = Storescp(port, out, log, proc)
        started.append(peer)

        def answers() -> bool:  # accepting, or refusing as told (--refuse)
            r = subprocess.run([dcmtk("echoscu"), "-aec", PEER_AE, "127.0.0.1", str(port)], capture_output=True,
                               text=True)
            return r.returncode == 0 or "Association Rejected" in r.stdout + r.stderr

        wait_for(answers, what="storescp to answer")
        return peer

    yield start
    for peer in started:
        peer.stop()


@pytest.mark.parametrize("our_pdu", [MIN_PDU, 0])
def test_storescp_receives_the_stored_data_sets_byte_for_byte(storescp, tmp_path, our_pdu) -> None:  # type: ignore[no-untyped-def]
    """storescp -pdu 4096 makes us cut every data set into 4 KiB PDUs; we announce 4 KiB or no limit."""
    files = implicit_files(tmp_path / "ct", 4, rows=64, cols=64)
    peer = storescp("-pdu", "4096", "+xi")
    assoc = associate(Destination(PEER_AE, "127.0.0.1", peer.port), ClientSettings(max_pdu=our_pdu, timeout=10),
                      CONTEXTS)
    assert assoc.peer_max_pdu == 4096
    assert assoc.echo().status == Status.SUCCESS
    assert send_files(assoc, files) == [Status.SUCCESS] * 4
    assoc.release()
    assert not assoc.established
    log = peer.stop()
    assert re.findall(r"BEGIN A-ASSOCIATE-RQ.*?Their Max PDU Receive Size: +(\d+)", log, re.S)[-1] == str(our_pdu)
    assert "Association Release" in log and "Abort" not in log
    received = {stored_data_set(p).body.tobytes() for p in peer.out.iterdir()}
    assert received == {stored_data_set(f).body.tobytes() for f in files}


def test_files_read_into_one_buffer_as_pdus_arrive_byte_for_byte(storescp, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """read_stored lays each file's data set out as the peer's 4 KiB PDUs in one reused
    buffer (a large file, then smaller ones, one with a file meta longer than the first
    read); what storescp writes is the data set as stored. Not Part 10: ValueError."""
    files = implicit_files(tmp_path / "ct", 3, rows=64, cols=64)
    files[1].write_bytes(files[1].read_bytes()[:132] + _long_meta(files[1]))
    files += implicit_files(tmp_path / "small", 1, rows=2, cols=2)
    assert dicomio.split_part10(files[1].read_bytes())[0] > META_PREFIX
    peer = storescp("-pdu", "4096", "+xi")
    assoc = associate(Destination(PEER_AE, "127.0.0.1", peer.port), ClientSettings(timeout=10), CONTEXTS)
    assert send_files(assoc, files, framed=True) == [Status.SUCCESS] * 4
    (tmp_path / "not-dicom").write_bytes(b"\0" * 200)
    with pytest.raises(ValueError, match="not a DICOM Part 10 file"):
        assoc.read_stored(tmp_path / "not-dicom", bytearray())
    with pytest.raises(FileNotFoundError):
        assoc.read_stored(tmp_path / "gone.dcm", bytearray())
    assoc.release()
    log = peer.stop()
    assert "Abort" not in log
    received = {stored_data_set(p).body.tobytes() for p in peer.out.iterdir()}
    assert received == {stored_data_set(f).body.tobytes() for f in files}


def _long_meta(f: Path) -> bytes:
    """The file meta and data set of ``f`` with a 6 KB Private Information (0002,0102) added."""
    data = f.read_bytes()
    offset, _ = dicomio.split_part10(data)
    private = b"\x02\x00\x02\x01OB\x00\x00" + struct.pack("<L", 6000) + b"\x01" * 6000
    return data[132:offset] + private + data[offset:]


def test_a_rejection_says_why(storescp) -> None:  # type: ignore[no-untyped-def]
    peer = storescp("--refuse")
    with pytest.raises(NetworkError, match=rf"association rejected \w+ by {PEER_AE}@127.0.0.1:{peer.port}"):
        associate(Destination(PEER_AE, "127.0.0.1", peer.port), ClientSettings(timeout=5), CONTEXTS)


def test_an_abort_before_the_response_ends_the_association(storescp, tmp_path) -> None:  # type: ignore[no-untyped-def]
    files = implicit_files(tmp_path / "ct", 2)
    peer = storescp("--abort-after", "+xi")
    assoc = associate(Destination(PEER_AE, "127.0.0.1", peer.port), ClientSettings(timeout=10), CONTEXTS)
    t0 = time.monotonic()
    with pytest.raises(AssociationLost, match="ended: the peer aborted the association"):
        send_files(assoc, files[:1])
    assert time.monotonic() - t0 < 5 and not assoc.established
    with pytest.raises(AssociationLost, match="has ended"):
        send_files(assoc, files[1:])


def test_contexts_the_peer_refuses_are_not_offered_to_the_caller(storescp) -> None:  # type: ignore[no-untyped-def]
    peer = storescp("+xi")  # Implicit VR LE only
    assoc = associate(Destination(PEER_AE, "127.0.0.1", peer.port), ClientSettings(timeout=10), CONTEXTS)
    try:
        assert assoc.context_for(CT, IMPLICIT) is not None and assoc.context_for(CT, EXPLICIT) is None
        assert assoc.accepts(CT) and not assoc.accepts(str(SOPClass.MR_IMAGE))
    finally:
        assoc.release()
    with pytest.raises(NetworkError, match="accepted the association but none of the proposed services"):
        associate(Destination(PEER_AE, "127.0.0.1", peer.port), ClientSettings(timeout=10), [(CT, [EXPLICIT])])


# -- our own Storage SCP, plain and over TLS -----------------------------------------------


def test_our_scp_plain_and_over_tls_stores_what_we_send(tmp_path, pki) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    from dataclasses import replace

    cfg = replace(ScpConfig(), bind="127.0.0.1", port=0, tls_port=0)  # the kernel picks both as they are bound
    srv = TlsServer(tmp_path / "box", cfg, server_tls(pki))
    client = ClientSettings(timeout=10, tls=TlsConfig(certificate=str(pki.client_cert),
                                                      private_key=str(pki.client_key), ca_certificates=str(pki.ca)))
    try:
        files = implicit_files(tmp_path / "ct", 6, rows=128, cols=128)
        for port, mode, part in ((srv.port, "plain", files[:3]), (srv.tls_port, "mutual", files[3:])):
            assoc = associate(Destination(srv.ae_title, "127.0.0.1", port, mode), client, CONTEXTS)
            assert assoc.echo().status == Status.SUCCESS
            assert send_files(assoc, part, framed=mode == "mutual") == [Status.SUCCESS] * 3
            assoc.release()
        for f in files:  # stored byte for byte as sent
            row = srv.store.index.instance(str(dcmread(f, stop_before_pixels=True).SOPInstanceUID))
            assert row is not None
            assert stored_data_set(srv.data_dir / row.path).body == stored_data_set(f).body
    finally:
        srv.stop()


def test_tls_to_a_server_our_ca_did_not_sign_fails_in_words(tmp_path, pki) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    from dataclasses import replace

    cfg = replace(ScpConfig(), bind="127.0.0.1", port=0, tls_port=0)  # the kernel picks both as they are bound
    srv = TlsServer(tmp_path / "box", cfg, server_tls(pki))
    try:
        client = ClientSettings(timeout=5, tls=TlsConfig(ca_certificates=str(pki.stranger_cert)))
        with pytest.raises(NetworkError, match=r"TLS handshake with 127.0.0.1:\d+ failed: certificate verify failed"):
            associate(Destination(srv.ae_title, "127.0.0.1", srv.tls_port, "tls"), client, CONTEXTS)
    finally:
        srv.stop()


# -- a peer without a PDU limit -------------------------------------------------------------


def test_a_peer_without_a_pdu_limit_gets_a_large_object_whole() -> None:
    received: list[Dataset] = []

    def on_store(event) -> int:  # type: ignore[no-untyped-def]
        received.append(event.dataset)
        return 0

    ae = AE(ae_title="NOLIMIT")
    ae.maximum_pdu_size = 0
    ae.add_supported_context(CT, [IMPLICIT])
    scp = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        ds = ct_series(1, rows=1024, cols=1024)[0]  # 2 MiB of pixels: more than one fragment of ours
        body = encode(ds, IMPLICIT)
        assoc = associate(Destination("NOLIMIT", "127.0.0.1", scp.server_address[1]), ClientSettings(timeout=10),
                          [(CT, [IMPLICIT])])
        assert assoc.peer_max_pdu == 0
        cx = assoc.context_for(CT, IMPLICIT)
        assert cx is not None
        assert assoc.store(cx, str(ds.SOPInstanceUID), body).status == 0
        assoc.release()
    finally:
        scp.shutdown()
    assert len(received) == 1
    assert received[0].PixelData == ds.PixelData and received[0].SOPInstanceUID == ds.SOPInstanceUID


# -- raw peers that misbehave -----------------------------------------------------------------


@dataclass
class RawPeer:
    """A listening socket whose one connection ``script`` serves in a thread."""

    script: Callable[[socket.socket, RawPeer], None]
    listener: socket.socket = field(default_factory=socket.socket)
    seen: list[tuple[int, bytes]] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
            with conn:
                self.script(conn, self)
        except OSError:
            pass
        finally:
            self.done.set()

    def read(self, conn: socket.socket) -> tuple[int, bytes]:
        pdu = read_pdu(conn)
        self.seen.append(pdu)
        return pdu

    def accept_association(self, conn: socket.socket, max_pdu: int = 16384) -> A_ASSOCIATE_RQ:
        """Read the A-ASSOCIATE-RQ and accept every context in its first transfer syntax."""
        kind, body = self.read(conn)
        assert kind == 0x01
        rq = A_ASSOCIATE_RQ()
        rq.decode(bytes([0x01, 0]) + struct.pack(">L", len(body)) + body)
        prim = rq.to_primitive()
        results = []
        for cx in prim.presentation_context_definition_list:
            pc = PresentationContext()
            pc.context_id = cx.context_id
            pc.abstract_syntax = cx.abstract_syntax
            pc.transfer_syntax = [cx.transfer_syntax[0]]
            pc.result = 0
            results.append(pc)
        conn.sendall(associate_ac_pdu(prim, results, max_pdu))
        return rq

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def raw_peer() -> Iterator[Callable[[Callable[[socket.socket, RawPeer], None]], RawPeer]]:
    peers: list[RawPeer] = []

    def start(script: Callable[[socket.socket, RawPeer], None]) -> RawPeer:
        peers.append(RawPeer(script))
        return peers[-1]

    yield start
    for p in peers:
        p.close()


def test_the_associate_rq_says_who_we_are_and_our_max_pdu(raw_peer) -> None:  # type: ignore[no-untyped-def]
    announced: list[A_ASSOCIATE_RQ] = []

    def script(conn: socket.socket, peer: RawPeer) -> None:
        announced.append(peer.accept_association(conn))
        while True:
            kind, _ = peer.read(conn)
            if kind == A_RELEASE_RQ_PDU:
                conn.sendall(RELEASE_RP)
                return

    for pdu in (0, MIN_PDU):
        peer = raw_peer(script)
        associate(Destination("RAW_AE", "127.0.0.1", peer.port), ClientSettings(max_pdu=pdu, timeout=5),
                  CONTEXTS).release()
        assert peer.done.wait(5)
        prim = announced[-1].to_primitive()
        assert prim.calling_ae_title == CLIENT_AE_TITLE and prim.called_ae_title == "RAW_AE"
        items = {type(i): i for i in prim.user_information}
        assert items[MaximumLengthNotification].maximum_length_received == pdu
        assert items[ImplementationClassUIDNotification].implementation_class_uid == IMPLEMENTATION_CLASS_UID
        assert items[ImplementationVersionNameNotification].implementation_version_name == \
            IMPLEMENTATION_VERSION_NAME
        proposed = [(c.context_id, str(c.abstract_syntax), [str(t) for t in c.transfer_syntax])
                    for c in prim.presentation_context_definition_list]
        assert proposed == [(1, *CONTEXTS[0]), (3, *CONTEXTS[1]), (5, *CONTEXTS[2])]
        assert peer.seen[-1][0] == A_RELEASE_RQ_PDU


def test_a_c_store_rq_names_the_move_originator_and_is_cut_to_the_peers_pdu(raw_peer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    files = implicit_files(tmp_path / "ct", 1, rows=64, cols=64)
    stored = stored_data_set(files[0])
    commands: list[dict[int, bytes]] = []
    data = bytearray()
    sizes: list[int] = []

    def script(conn: socket.socket, peer: RawPeer) -> None:
        peer.accept_association(conn, max_pdu=MIN_PDU)
        while True:
            kind, body = peer.read(conn)
            if kind != P_DATA_TF_PDU:
                conn.sendall(RELEASE_RP)
                return
            sizes.append(len(body))
            (length,) = struct.unpack_from(">L", body)
            cx, control, value = body[4], body[5], body[6:4 + length]
            if control & 1:
                commands.append(decode_command(value))
                continue
            data.extend(value)
            if control & 2:
                msg_id = struct.unpack("<H", commands[-1][Tag.MESSAGE_ID])[0]
                rsp = b"".join(_element(t, v) for t, v in [
                    (Tag.AFFECTED_SOP_CLASS_UID, commands[-1][Tag.AFFECTED_SOP_CLASS_UID]),
                    (Tag.COMMAND_FIELD, struct.pack("<H", CommandField.C_STORE_RSP)),
                    (Tag.MESSAGE_ID_BEING_RESPONDED_TO, struct.pack("<H", msg_id)),
                    (Tag.COMMAND_DATA_SET_TYPE, struct.pack("<H", 0x0101)),
                    (Tag.STATUS, struct.pack("<H", 0xB007)),
                    (Tag.ERROR_COMMENT, b"coerced"),
                ])
                cmd = _element(0, struct.pack("<L", len(rsp))) + rsp
                pdv = struct.pack(">LBB", len(cmd) + 2, cx, 3) + cmd
                conn.sendall(struct.pack(">BBL", P_DATA_TF_PDU, 0, len(pdv)) + pdv)

    peer = raw_peer(script)
    assoc = associate(Destination("RAW_AE", "127.0.0.1", peer.port), ClientSettings(timeout=5), CONTEXTS)
    cx = assoc.context_for(CT, IMPLICIT)
    assert cx is not None
    rsp = assoc.store(cx, "1.2.3.4", stored.body, move_originator=("MOVE_SCU", 77))
    assoc.release()
    assert (rsp.status, rsp.comment) == (0xB007, "coerced")
    command = commands[0]
    assert command[Tag.MOVE_ORIGINATOR_APPLICATION_ENTITY_TITLE] == b"MOVE_SCU"
    assert struct.unpack("<H", command[Tag.MOVE_ORIGINATOR_MESSAGE_ID])[0] == 77
    assert command[Tag.AFFECTED_SOP_INSTANCE_UID].rstrip(b"\x00") == b"1.2.3.4"
    assert bytes(data) == stored.body.tobytes()
    assert max(sizes) <= MIN_PDU and len(sizes) > 2


def _element(tag: int, value: bytes) -> bytes:
    if len(value) & 1:
        value += b"\x00"
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value


def test_a_peer_that_aborts_mid_transfer(raw_peer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    files = implicit_files(tmp_path / "ct", 1, rows=1024, cols=1024)  # 2 MiB in 4 KiB PDUs

    def script(conn: socket.socket, peer: RawPeer) -> None:
        peer.accept_association(conn, max_pdu=MIN_PDU)
        for _ in range(5):
            peer.read(conn)
        conn.sendall(abort_pdu(0))

    peer = raw_peer(script)
    assoc = associate(Destination("RAW_AE", "127.0.0.1", peer.port), ClientSettings(timeout=5), CONTEXTS)
    t0 = time.monotonic()
    with pytest.raises(AssociationLost, match="the association with RAW_AE@127.0.0.1:.* ended"):
        send_files(assoc, files)
    assert time.monotonic() - t0 < 4 and not assoc.established


def test_a_peer_that_never_answers_the_association_request(raw_peer) -> None:  # type: ignore[no-untyped-def]
    def script(conn: socket.socket, peer: RawPeer) -> None:
        peer.read(conn)
        peer.read(conn)  # waits: the A-ABORT we send when we give up, or the connection closing

    peer = raw_peer(script)
    t0 = time.monotonic()
    with pytest.raises(NetworkError, match="did not answer the association request within 1 s"):
        associate(Destination("RAW_AE", "127.0.0.1", peer.port), ClientSettings(timeout=1), CONTEXTS)
    assert 1 <= time.monotonic() - t0 < 2.5
    assert peer.done.wait(5) and peer.seen[-1][0] in (A_ABORT_PDU, 0)


def test_a_peer_that_never_answers_a_c_store_or_the_release(raw_peer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    files = implicit_files(tmp_path / "ct", 1)
    gone = threading.Event()

    def script(conn: socket.socket, peer: RawPeer) -> None:
        peer.accept_association(conn)
        while peer.read(conn)[0] not in (0, A_ABORT_PDU):  # reads everything, answers nothing
            pass
        gone.set()

    peer = raw_peer(script)
    assoc = associate(Destination("RAW_AE", "127.0.0.1", peer.port), ClientSettings(timeout=1), CONTEXTS)
    t0 = time.monotonic()
    with pytest.raises(AssociationLost, match="did not answer within 1 s"):
        send_files(assoc, files)
    assert 1 <= time.monotonic() - t0 < 2.5
    assert gone.wait(5) and peer.seen[-1][0] == A_ABORT_PDU

    peer = raw_peer(script)
    assoc = associate(Destination("RAW_AE", "127.0.0.1", peer.port), ClientSettings(timeout=1), CONTEXTS)
    t0 = time.monotonic()
    assoc.release()  # no A-RELEASE-RP: aborted after the timeout
    assert 1 <= time.monotonic() - t0 < 2.5
    assert peer.done.wait(5) and [k for k, _ in peer.seen[1:]] == [A_RELEASE_RQ_PDU, A_ABORT_PDU]


def test_connection_failures_in_words() -> None:
    port = free_port()
    with pytest.raises(NetworkError, match=f"connection refused by 127.0.0.1:{port}"):
        associate(Destination("X", "127.0.0.1", port), ClientSettings(timeout=2), CONTEXTS)
    with pytest.raises(NetworkError, match="cannot resolve host name 'no-such-host.invalid'"):
        associate(Destination("X", "no-such-host.invalid", 104), ClientSettings(timeout=2), CONTEXTS)
