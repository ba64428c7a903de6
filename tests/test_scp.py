"""The Storage SCP over real loopback associations: DCMTK peers, pynetdicom and raw sockets."""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_context
from pynetdicom._globals import APPLICATION_CONTEXT_NAME
from pynetdicom.transport import AddressInformation

from appliance.dicom import dicomio
from appliance.config import ScpConfig, StoreConfig
from appliance.conformance import JPEG_LOSSLESS, SOPClass, Status, TransferSyntax
from helpers import ROOT, ct_series, dcmtk, run, sample, samples, wait_for, write_series

ILE, ELE, EBE = TransferSyntax.IMPLICIT_LE, TransferSyntax.EXPLICIT_LE, TransferSyntax.EXPLICIT_BE


def echoscu(server, aec=None, aet="ECHOSCU"):
    return run([dcmtk("echoscu"), "-to", "5", "-aet", aet, "-aec", aec or server.ae_title,
                "127.0.0.1", str(server.port)])


def storescu(server, files, *opts):
    return run([dcmtk("storescu"), "-to", "10", "-aec", server.ae_title, *opts, "127.0.0.1",
                str(server.port), *map(str, files)], timeout=120)


def scu(contexts=None, pdu=16384):
    ae = AE(ae_title="PYSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.maximum_pdu_size = pdu
    for cx in contexts or []:
        ae.add_requested_context(*cx)
    return ae


def profile(tmp_path: Path, syntax_name: str) -> Path:
    """A storescu config file proposing exactly one transfer syntax for CT/MR/PET/RT/SC/XA."""
    classes = ["CTImageStorage", "MRImageStorage", "PositronEmissionTomographyImageStorage",
               "RTStructureSetStorage", "SecondaryCaptureImageStorage", "XRayAngiographicImageStorage"]
    lines = ["[[TransferSyntaxes]]", "[TS]", f"TransferSyntax1 = {syntax_name}", "",
             "[[PresentationContexts]]", "[Ctx]"]
    lines += [f"PresentationContext{i + 1} = {c}\\TS" for i, c in enumerate(classes)]
    lines += ["", "[[Profiles]]", "[Only]", "PresentationContexts = Ctx", ""]
    p = tmp_path / f"{syntax_name}.cfg"
    p.write_text("\n".join(lines))
    return p


# -- DCMTK peers ------------------------------------------------------------------------


def test_echoscu(server):
    r = echoscu(server)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    "syntax_name,ts",
    [("LittleEndianImplicit", ILE), ("LittleEndianExplicit", ELE), ("BigEndianExplicit", EBE)],
)
def test_storescu_in_each_transfer_syntax(server, tmp_path, syntax_name, ts):
    """storescu converts the files to the one proposed syntax; we store exactly that."""
    files = [sample(r).path for r in ("ct_ele", "mr_be", "pt_ile", "rtstruct_ile", "sc_ele", "xa_ele")]
    r = storescu(server, files, "-xf", str(profile(tmp_path, syntax_name)), "Only")
    assert r.returncode == 0, r.stderr
    for f in files:
        original = pydicom.dcmread(f)
        stored_path = server.store.locate(original.SOPInstanceUID)
        assert stored_path is not None, f.name
        stored = pydicom.dcmread(stored_path)
        assert stored.file_meta.TransferSyntaxUID == ts
        assert stored.PatientName == original.PatientName
        if "PixelData" in original:
            assert (stored.pixel_array == original.pixel_array).all()


def test_storescu_sends_a_ct_series_and_ls_shows_it(server, tmp_path, capsys):
    files = write_series(ct_series(12), tmp_path / "series")
    r = storescu(server, files)
    assert r.returncode == 0, r.stderr
    from appliance.cli import main

    wait_for(lambda: server.store.index.counts()["instances"] == 12, what="12 instances indexed")
    assert main(["--data-dir", str(server.store.data_dir), "ls", "--series"]) == 0
    out = capsys.readouterr().out
    assert "3D ok: 12 slices, 2.000 mm apart" in out and "CT" in out


@pytest.mark.parametrize("role", ["ct_ele", "mr_be", "rtstruct_ile_large"])
def test_byte_exact_storage(server, raw_sender, role):
    """What the sender encoded is what is stored, behind a correct file meta header."""
    s = sample(role)
    original = s.path.read_bytes()
    body = original[dicomio.split_part10(original)[0]:]
    rsp = raw_sender(s, body, s.sop_instance_uid, ts=s.transfer_syntax)
    assert rsp.Status == Status.SUCCESS
    stored = server.store.locate(s.sop_instance_uid).read_bytes()
    assert stored[dicomio.split_part10(stored)[0]:] == body
    meta = pydicom.dcmread(server.store.locate(s.sop_instance_uid)).file_meta
    assert meta.TransferSyntaxUID == s.transfer_syntax and meta.MediaStorageSOPInstanceUID == s.sop_instance_uid
    assert meta.SourceApplicationEntityTitle == "PYSCU"


@pytest.mark.parametrize("s", [s for s in samples() if s.expected != "context-rejected"], ids=lambda s: s.name)
def test_manifest_over_the_network(server, s):
    """Each sample sent by DCMTK storescu in its own transfer syntax (storescu recomputes
    group lengths, which is why the 693_UNCI CT arrives well-formed)."""
    r = storescu(server, [s.path])
    want = s.expected.removeprefix("strict:") == "store-success"
    assert (server.store.locate(s.sop_instance_uid) is not None) is want, r.stderr + r.stdout


@pytest.mark.parametrize("s", [s for s in samples() if s.expected == "context-rejected"], ids=lambda s: s.name)
def test_manifest_context_rejected(server, s):
    ds = pydicom.dcmread(s.path, stop_before_pixels=True)
    ae = scu([(s.sop_class_uid, [s.transfer_syntax])])
    assoc = ae.associate("127.0.0.1", server.port, ae_title=server.ae_title)
    try:
        if assoc.is_established:
            assert assoc.accepted_contexts == []
            [cx] = assoc.rejected_contexts
            assert cx.result in (0x03, 0x04)
    finally:
        assoc.release() if assoc.is_established else None
    assert server.store.locate(ds.SOPInstanceUID) is None


# -- negotiation ---------------------------------------------------------------------------


def test_transfer_syntax_preference_ignores_the_proposed_order(server):
    ae = scu([(SOPClass.CT_IMAGE, [EBE, ELE, ILE]), (SOPClass.MR_IMAGE, [EBE, ELE]),
              (SOPClass.VERIFICATION, [EBE, ELE, ILE])])
    assoc = ae.associate("127.0.0.1", server.port, ae_title=server.ae_title)
    assert assoc.is_established
    chosen = {cx.abstract_syntax: cx.transfer_syntax[0] for cx in assoc.accepted_contexts}
    assoc.release()
    assert chosen == {SOPClass.CT_IMAGE: ILE, SOPClass.MR_IMAGE: ELE, SOPClass.VERIFICATION: ILE}


def test_unsupported_contexts_get_the_ps38_result(server):
    ae = scu([(SOPClass.RT_DOSE, [ILE]), (SOPClass.CT_IMAGE, list(JPEG_LOSSLESS)), (SOPClass.MR_IMAGE, [ILE])])
    assoc = ae.associate("127.0.0.1", server.port, ae_title=server.ae_title)
    assert assoc.is_established
    results = {cx.abstract_syntax: cx.result for cx in assoc.rejected_contexts}
    assoc.release()
    # 0x03 abstract syntax not supported, 0x04 transfer syntaxes not supported
    assert results == {SOPClass.RT_DOSE: 0x03, SOPClass.CT_IMAGE: 0x04}


def test_implementation_identity_is_our_own(server):
    ae = scu([(SOPClass.VERIFICATION, [ILE])])
    assoc = ae.associate("127.0.0.1", server.port, ae_title=server.ae_title)
    ident = (assoc.acceptor.implementation_class_uid, assoc.acceptor.implementation_version_name)
    assoc.release()
    assert ident[0].startswith("2.25.") and ident[1] == "APPLIANCE_010"


def test_called_ae_check_and_calling_allow_list(make_server):
    srv = make_server(ScpConfig(check_called_ae=True, allowed_calling_aes=("CT1", "ECHOSCU")))
    assert echoscu(srv).returncode == 0
    r = echoscu(srv, aec="SOMEONE_ELSE")
    assert r.returncode != 0 and "Called AE Title Not Recognized" in r.stderr
    r = echoscu(srv, aet="INTRUDER")
    assert r.returncode != 0 and "Calling AE Title Not Recognized" in r.stderr
    open_srv = make_server(name="open")
    assert echoscu(open_srv, aec="ANY_TITLE").returncode == 0


# -- statuses --------------------------------------------------------------------------------


@pytest.fixture
def raw_sender(server, tmp_path, monkeypatch):
    """Send an encoded data set exactly as given: pynetdicom streams a file's data set
    without decoding it when STORE_SEND_CHUNKED_DATASET is set."""
    import pynetdicom._config

    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)

    def send(s, body: bytes, sop_instance_uid: str, ts=ELE):
        path = tmp_path / f"raw-{time.monotonic_ns()}.dcm"
        path.write_bytes(dicomio.file_meta(s.sop_class_uid, sop_instance_uid, ts) + body)
        ae = scu([(s.sop_class_uid, [ts])])
        assoc = ae.associate("127.0.0.1", server.port, ae_title=server.ae_title)
        assert assoc.is_established
        rsp = assoc.send_c_store(path)
        assoc.release()
        return rsp

    return send


def test_refusals_carry_a_status_and_an_error_comment(server, raw_sender):
    s = sample("ct_ele_large")  # its (7FE0,0000) says 105406; sent as is, it is refused
    data = s.path.read_bytes()
    rsp = raw_sender(s, data[dicomio.split_part10(data)[0]:], s.sop_instance_uid)
    assert rsp.Status == Status.REFUSED_PIXEL_DATA
    assert "Group Length" in rsp.ErrorComment and len(rsp.ErrorComment) <= 64
    s = sample("pt_dynamic")
    ae = scu([(s.sop_class_uid, [ELE])])
    assoc = ae.associate("127.0.0.1", server.port, ae_title=server.ae_title)
    status = assoc.send_c_store(pydicom.dcmread(s.path))
    assoc.release()
    assert status.Status == Status.REFUSED_DYNAMIC_PET and "dynamic PET" in status.ErrorComment


def test_uid_in_command_must_match_data_set(server, raw_sender):
    s = sample("ct_ele")
    data = s.path.read_bytes()
    rsp = raw_sender(s, data[dicomio.split_part10(data)[0]:], "1.2.3.999")
    assert rsp.Status == Status.REFUSED_UID_MISMATCH
    assert server.store.locate(s.sop_instance_uid) is None


def test_below_watermark_answers_out_of_resources_and_echo_still_works(make_server):
    srv = make_server(rules=StoreConfig(min_free_mb=2**40))
    s = sample("ct_ele")
    ae = scu([(s.sop_class_uid, [ELE])])
    assoc = ae.associate("127.0.0.1", srv.port, ae_title=srv.ae_title)
    status = assoc.send_c_store(pydicom.dcmread(s.path))
    assoc.release()
    assert status.Status == Status.OUT_OF_RESOURCES and "MiB free" in status.ErrorComment
    assert echoscu(srv).returncode == 0


# -- association slots and robustness -----------------------------------------------------


def test_sixth_association_is_rejected_transient_and_slots_free_up(server):
    ae = scu([(SOPClass.VERIFICATION, [ILE])])
    held = [ae.associate("127.0.0.1", server.port, ae_title=server.ae_title) for _ in range(5)]
    assert all(a.is_established for a in held)
    sixth = ae.associate("127.0.0.1", server.port, ae_title=server.ae_title)
    assert sixth.is_rejected
    rj = sixth.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)  # transient, local limit
    held.pop().release()
    wait_for(lambda: server.server.active() < 5, what="a slot to free up")
    again = ae.associate("127.0.0.1", server.port, ae_title=server.ae_title)
    assert again.is_established
    again.release()
    for a in held:
        a.release()


def test_bare_tcp_connects_hold_no_slot(server, tmp_path):
    files = write_series(ct_series(3), tmp_path / "s")
    started = time.monotonic()
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(50)]
    try:
        r = storescu(server, files)
        assert r.returncode == 0, r.stderr
        # No SYN dropped by a full backlog, no slot held: well under a TCP retransmission.
        assert time.monotonic() - started < 3
        assert server.store.index.counts()["instances"] == 3
    finally:
        for s in socks:
            s.close()


def _assoc_rq_pdu(called: str = "ELEKTA_STORAGE") -> bytes:
    """A real A-ASSOCIATE-RQ PDU for the Verification context."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification

    prim = A_ASSOCIATE()
    prim.application_context_name = APPLICATION_CONTEXT_NAME
    prim.calling_ae_title = "RAW"
    prim.called_ae_title = called
    prim.calling_presentation_address = AddressInformation("127.0.0.1", 1)
    prim.called_presentation_address = AddressInformation("127.0.0.1", 2)
    prim.presentation_context_definition_list = [build_context(SOPClass.VERIFICATION, [ILE])]
    prim.presentation_context_definition_list[0].context_id = 1
    ml = MaximumLengthNotification()
    ml.maximum_length_received = 16384
    prim.user_information = [ml]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    return pdu.encode()


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(os.urandom(4096), id="garbage"),
        pytest.param(b"\x01\x00\x00\x00\x10\x00" + b"\x00" * 30, id="truncated-assoc-rq"),
        pytest.param(b"\x04\x00\x00\x00\x00\x10" + b"\x00" * 20, id="p-data-before-association"),
        pytest.param(b"\x01\x00\xff\xff\xff\xff", id="absurd-length"),
        pytest.param(_assoc_rq_pdu()[:40], id="half-a-real-assoc-rq"),
    ],
)
def test_malformed_pdus_leave_the_server_serving(server, tmp_path, payload):
    socks = []
    for _ in range(6):  # more than max_associations: none may hold a slot
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(payload)
        socks.append(s)
    try:
        files = write_series(ct_series(2), tmp_path / "s")
        r = storescu(server, files)
        assert r.returncode == 0, r.stderr
        assert server.store.index.counts()["instances"] == 2
    finally:
        for s in socks:
            s.close()


def test_abort_mid_transfer_stores_nothing(server, tmp_path):
    s = sample("ct_ele_2")
    ds = pydicom.dcmread(s.path)
    ae = scu([(s.sop_class_uid, [ELE])], pdu=4096)
    assoc = ae.associate("127.0.0.1", server.port, ae_title=server.ae_title)
    assert assoc.is_established
    from io import BytesIO

    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dimse_messages import C_STORE_RQ

    data = s.path.read_bytes()
    req = C_STORE()
    req.MessageID = 7
    req.AffectedSOPClassUID = s.sop_class_uid
    req.AffectedSOPInstanceUID = ds.SOPInstanceUID
    req.Priority = 2
    req.DataSet = BytesIO(data[dicomio.split_part10(data)[0]:])
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    cx_id = assoc.accepted_contexts[0].context_id
    fragments = list(msg.encode_msg(cx_id, 4096))
    for frag in fragments[: len(fragments) // 2]:  # half of the object, then abort
        assoc.dul.send_pdu(frag)
    assoc.abort()
    wait_for(lambda: server.server.active() == 0, what="the aborted association to end")
    assert server.store.locate(ds.SOPInstanceUID) is None
    assert list(server.store.tmp.iterdir()) == []
    r = storescu(server, [s.path])
    assert r.returncode == 0 and server.store.locate(ds.SOPInstanceUID) is not None


def test_peer_vanishing_mid_association_frees_its_slot(server):
    ae = scu([(SOPClass.VERIFICATION, [ILE])])
    for _ in range(5):
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(_assoc_rq_pdu())
        assert s.recv(1)[0] == 0x02  # A-ASSOCIATE-AC
        s.close()  # vanish without A-RELEASE
    wait_for(lambda: server.server.active() == 0, what="vanished peers' slots to free up")
    a = ae.associate("127.0.0.1", server.port, ae_title=server.ae_title)
    assert a.is_established
    a.release()


# -- the real command ------------------------------------------------------------------------


def test_scp_command_serves_and_stops_cleanly_on_sigterm(tmp_path):
    data = tmp_path / "state"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "--data-dir", str(data), "scp", "--bind", "127.0.0.1",
         "-aet", "TEST_SCP", "0"],
        stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        line = wait_for(lambda: proc.stderr.readline(), timeout=20, what="the listening line")
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", str(line))
        assert m, line
        port = int(m.group(1))
        hint = proc.stderr.readline()
        assert f"echoscu -aec TEST_SCP 127.0.0.1 {port}" in hint
        files = write_series(ct_series(4), tmp_path / "s")
        r = run([dcmtk("storescu"), "-aec", "TEST_SCP", "127.0.0.1", str(port), *map(str, files)])
        assert r.returncode == 0, r.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (data / ".clean-shutdown").exists()
    assert list((data / "tmp").iterdir()) == []
    assert len(list((data / "objects").rglob("*.dcm"))) == 4


def test_privileged_port_message(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root may bind port 104")
    from appliance.cli import main

    assert main(["--data-dir", str(tmp_path), "scp", "104"]) == 1


@pytest.mark.parametrize("max_pdu", [4096, 16384, 65536, 1048576])
@pytest.mark.parametrize("syntax_name", ["LittleEndianImplicit", "LittleEndianExplicit", "BigEndianExplicit"])
def test_dcmtk_interoperates_at_every_pdu_size(make_server, tmp_path, max_pdu, syntax_name):
    """Our acceptor reassembles P-DATA from DCMTK at PDU sizes from 4 KiB to 1 MiB."""
    srv = make_server(ScpConfig(max_pdu=max_pdu))
    s = sample("ct_ele_2")  # 512 x 512 x 16 bit: 128 PDUs at 4 KiB
    r = storescu(srv, [s.path, sample("rtstruct_ile_large").path],
                 "-xf", str(profile(tmp_path, syntax_name)), "Only")
    assert r.returncode == 0, r.stderr
    stored = pydicom.dcmread(srv.store.locate(s.sop_instance_uid))
    assert (stored.pixel_array == pydicom.dcmread(s.path).pixel_array).all()
    assert srv.store.locate(sample("rtstruct_ile_large").sop_instance_uid) is not None


def test_a_pdu_larger_than_we_advertised_is_aborted(make_server):
    srv = make_server(ScpConfig(max_pdu=4096))
    s = socket.create_connection(("127.0.0.1", srv.port))
    s.sendall(_assoc_rq_pdu())
    assert s.recv(1)[0] == 0x02
    s.recv(65536)
    s.sendall(b"\x04\x00" + struct.pack(">L", 1 << 20) + b"\x00" * 64)
    assert wait_for(lambda: s.recv(10), what="an A-ABORT")[:1] == b"\x07"
    s.close()
    assert echoscu(srv).returncode == 0


def test_a_large_object_is_streamed_not_held_in_memory(make_server, tmp_path):
    """A 64 MiB multi-frame-free CT (8192 x 4096 x 16 bit) passes through a few MiB of buffers."""
    import resource
    import threading

    srv = make_server(ScpConfig(max_pdu=1048576))
    ds = ct_series(1, rows=4096, cols=8192)[0]
    [path] = write_series([ds], tmp_path / "big")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = [before]
    done = threading.Event()

    def watch():  # this process's RSS high-water mark while the SCP receives
        while not done.is_set():
            peak[0] = max(peak[0], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
            done.wait(0.01)

    t = threading.Thread(target=watch)
    t.start()
    try:
        r = storescu(srv, [path])
    finally:
        done.set()
        t.join()
    assert r.returncode == 0, r.stderr
    assert srv.store.locate(ds.SOPInstanceUID).stat().st_size > 64 * 2**20
    assert (peak[0] - before) * 1024 < 32 * 2**20  # ru_maxrss is in KiB


def test_a_connect_flood_cannot_exhaust_the_server(server, tmp_path):
    """More idle connections than the acceptor keeps: the oldest are closed, storing works."""
    MAX_IDLE_CONNECTIONS = ScpConfig().max_pending_connections

    files = write_series(ct_series(2), tmp_path / "s")
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(MAX_IDLE_CONNECTIONS + 40)]
    try:
        first = socks[0]
        first.settimeout(10)
        assert first.recv(1) == b""  # closed by the server
        r = storescu(server, files)
        assert r.returncode == 0, r.stderr
    finally:
        for s in socks:
            s.close()


@pytest.mark.parametrize("flags,expected", [([], "FILE_AE"), (["-aet", "FLAG_AE"], "FLAG_AE")])
def test_flags_override_the_config_file_which_overrides_defaults(tmp_path, flags, expected):
    cfg = tmp_path / "appliance.toml"
    cfg.write_text('[scp]\nae_title = "FILE_AE"\nmax_pdu = 16384\n')
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "--config", str(cfg), "--data-dir", str(tmp_path / "d"),
         "scp", "--bind", "127.0.0.1", *flags, "0"],
        stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        line = str(wait_for(lambda: proc.stderr.readline(), timeout=20, what="the listening line"))
        assert f"Storage SCP {expected} listening" in line
        port = int(re.search(r":(\d+),", line).group(1))
        ae = scu([(SOPClass.VERIFICATION, [ILE])])
        assoc = ae.associate("127.0.0.1", port, ae_title=expected)
        assert assoc.is_established
        assert assoc.acceptor.maximum_length == 16384  # from the file; the default is 262144
        assoc.release()
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_an_unsupported_protocol_version_is_rejected_permanently(server):
    pdu = bytearray(_assoc_rq_pdu())
    pdu[6:8] = b"\x00\x02"  # protocol version: bit 0 clear
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(bytes(pdu))
    rj = wait_for(lambda: s.recv(10), what="an A-ASSOCIATE-RJ")
    s.close()
    assert rj[0] == 0x03 and tuple(rj[7:10]) == (0x01, 0x02, 0x02)


def test_a_full_disk_answers_out_of_resources_and_storing_resumes(tmp_path):
    """A real full file system under the SCP (a 3 MiB tmpfs; needs root, as CI is)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount tmpfs here")
    from conftest import RunningServer

    srv = RunningServer(mnt / "data", ScpConfig(bind="127.0.0.1", port=0), StoreConfig(min_free_mb=0))
    try:
        big = sample("ct_ele_2")  # 0.5 MiB each: the 6th cannot fit
        ds = pydicom.dcmread(big.path)
        ae = scu([(big.sop_class_uid, [ELE])], pdu=65536)
        assoc = ae.associate("127.0.0.1", srv.port, ae_title=srv.ae_title)
        statuses = []
        for i in range(8):
            ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.9.{i}"
            statuses.append(assoc.send_c_store(ds).Status)
        assoc.release()
        assert statuses[0] == Status.SUCCESS and Status.OUT_OF_RESOURCES in statuses
        stored = [p for p in srv.store.objects.rglob("*.dcm")]
        assert len(stored) == statuses.count(Status.SUCCESS)
        assert set(srv.store.index.paths()) == {str(p.relative_to(srv.store.data_dir)) for p in stored}
        assert list(srv.store.tmp.iterdir()) == []
        assert echoscu(srv).returncode == 0  # still serving
        for uid in ("1.2.826.0.1.3680043.10.9.0", "1.2.826.0.1.3680043.10.9.1"):  # free space
            srv.store.locate(uid).unlink()
            srv.store.index.remove(uid)
        assoc = ae.associate("127.0.0.1", srv.port, ae_title=srv.ae_title)
        ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.9.99"
        assert assoc.send_c_store(ds).Status == Status.SUCCESS
        assoc.release()
    finally:
        srv.stop()
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_silent_association_is_aborted_after_the_network_timeout(make_server):
    srv = make_server(ScpConfig(network_timeout=1.0))
    s = socket.create_connection(("127.0.0.1", srv.port))
    s.sendall(_assoc_rq_pdu())
    assert s.recv(1)[0] == 0x02
    s.settimeout(10)
    data = b""
    while True:  # the rest of the A-ASSOCIATE-AC, then an A-ABORT once we stay silent
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    s.close()
    assert b"\x07\x00\x00\x00\x00\x04" in data
    wait_for(lambda: srv.server.active() == 0, what="the slot to free up")
