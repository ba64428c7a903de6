"""The client AE against real peers: DCMTK storescp (Implicit VR LE only) and pynetdicom."""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt

from appliance import config as config_mod
from appliance.dicom import dicomio
from appliance.cli import main
from appliance.config import Destination, StoreConfig
from appliance.conformance import (
    CLIENT_AE_TITLE,
    DEFAULT_CLIENT_PDU,
    MIN_PDU,
    TABLE_2,
    SOPClass,
    TransferSyntax,
)
from appliance.errors import ConfigError, NetworkError
from appliance.store.ingest import Ingest, Source
from appliance.net.sender import (
    MAX_PDU,
    ClientSettings,
    SendOutcome,
    SendRefused,
    echo,
    plan_send,
    send,
)
from appliance.store.store import Store

from helpers import ct_series, dcmtk, encode, free_port, sample, wait_for
from test_transcode import assert_same_values

PEER_AE = "STORESCP"


# -- peers ---------------------------------------------------------------------------


@dataclass
class Storescp:
    port: int
    out: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def received(self) -> dict[str, Dataset]:
        """The objects storescp wrote, by SOP Instance UID."""
        found = {}
        for p in self.out.iterdir():
            if p.is_file():
                ds = dcmread(p)
                found[str(ds.SOPInstanceUID)] = ds
        return found

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        return self.log.read_text()


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Callable[..., Storescp]]:
    """Start DCMTK storescp, accepting Implicit VR LE only, on a free loopback port."""
    started: list[Storescp] = []

    def start(*extra: str, name: str = "received") -> Storescp:
        out = tmp_path / name
        out.mkdir()
        port = free_port()
        log = tmp_path / f"{name}.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen(
                [dcmtk("storescp"), "-v", "-aet", PEER_AE, "+xi", "-od", str(out), *extra, str(port)],
                stdout=f, stderr=subprocess.STDOUT,
            )
        peer = Storescp(port, out, proc, log)
        started.append(peer)
        def answers() -> bool:
            r = subprocess.run([dcmtk("echoscu"), "-aec", PEER_AE, "127.0.0.1", str(port)],
                               capture_output=True, text=True)
            return r.returncode == 0 or "Association Rejected" in r.stdout + r.stderr

        wait_for(answers, what="storescp to answer an association request")
        return peer

    yield start
    for peer in started:
        peer.stop()


class PynetdicomPeer:
    """A pynetdicom Storage SCP that records associations (a second, independent peer)."""

    def __init__(self, *, require_called_aet: bool = False) -> None:
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        self.associations = 0
        self.requested: list[tuple[str, tuple[str, ...]]] = []
        self.stored: list[str] = []
        ae = AE(ae_title="PYPEER")
        ae.require_called_aet = require_called_aet
        for row in TABLE_2:
            ae.add_supported_context(row.abstract_syntax, [str(TransferSyntax.IMPLICIT_LE)])
        ae.add_supported_context(str(SOPClass.VERIFICATION), [str(TransferSyntax.IMPLICIT_LE)])
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[
            (evt.EVT_ESTABLISHED, self._up), (evt.EVT_RELEASED, self._down), (evt.EVT_ABORTED, self._down),
            (evt.EVT_C_STORE, self._store),
        ])
        self.port = int(self.server.server_address[1])

    def _up(self, event) -> None:  # type: ignore[no-untyped-def]
        with self.lock:
            self.active += 1
            self.associations += 1
            self.max_active = max(self.max_active, self.active)
            self.requested += [(cx.abstract_syntax, tuple(cx.transfer_syntax))
                               for cx in event.assoc.requestor.requested_contexts]

    def _down(self, event) -> None:  # type: ignore[no-untyped-def]
        with self.lock:
            self.active -= 1

    def _store(self, event) -> int:  # type: ignore[no-untyped-def]
        with self.lock:
            self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def pypeer() -> Iterator[Callable[..., PynetdicomPeer]]:
    started: list[PynetdicomPeer] = []

    def start(**kw: bool) -> PynetdicomPeer:
        p = PynetdicomPeer(**kw)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


# -- a store with generated series -----------------------------------------------------


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def box(data_dir: Path) -> Iterator[Store]:
    s = Store(data_dir)
    yield s
    s.index.close()


def put(store: Store, ds: Dataset, ts: str = TransferSyntax.EXPLICIT_LE) -> None:
    outcome = Ingest(store, StoreConfig(min_free_mb=0)).accept(
        encode(ds, ts), ts, sop_class_uid=str(ds.SOPClassUID), sop_instance_uid=None, source=Source(None, "test"))
    assert outcome.ok, outcome.comment


def put_file(store: Store, path: Path) -> None:
    data = path.read_bytes()
    offset, ts = dicomio.split_part10(data)
    outcome = Ingest(store, StoreConfig(min_free_mb=0)).accept(
        data[offset:], ts, sop_class_uid=str(dcmread(path).SOPClassUID), sop_instance_uid=None,
        source=Source(None, "test"))
    assert outcome.ok, outcome.comment


def structure_set(images: list[Dataset]) -> Dataset:
    """A minimal RT Structure Set referencing the series of ``images``."""
    first = images[0]
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = str(SOPClass.RT_STRUCTURE_SET)
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "RTSTRUCT"
    ds.PatientName, ds.PatientID = first.PatientName, first.PatientID
    ds.StudyDate, ds.StudyTime = first.StudyDate, first.StudyTime
    ds.StudyInstanceUID = first.StudyInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 99
    ds.InstanceNumber = 1
    ds.StructureSetLabel = "Target"
    contour_images = []
    for img in images:
        ci = Dataset()
        ci.ReferencedSOPClassUID = img.SOPClassUID
        ci.ReferencedSOPInstanceUID = img.SOPInstanceUID
        contour_images.append(ci)
    se = Dataset()
    se.SeriesInstanceUID = first.SeriesInstanceUID
    se.ContourImageSequence = contour_images
    st = Dataset()
    st.ReferencedSOPInstanceUID = first.StudyInstanceUID
    st.RTReferencedSeriesSequence = [se]
    fr = Dataset()
    fr.FrameOfReferenceUID = first.FrameOfReferenceUID
    fr.RTReferencedStudySequence = [st]
    ds.ReferencedFrameOfReferenceSequence = [fr]
    roi = Dataset()
    roi.ROINumber = 1
    roi.ReferencedFrameOfReferenceUID = first.FrameOfReferenceUID
    roi.ROIName = "GTV"
    ds.StructureSetROISequence = [roi]
    return ds


def assert_received_as_stored(store: Store, received: dict[str, Dataset], uids: set[str]) -> None:
    """Every object in ``uids`` arrived in Implicit VR LE, value by value and pixel by pixel as stored."""
    assert set(received) == uids
    for uid in uids:
        row = store.index.instance(uid)
        assert row is not None
        orig = dcmread(store.data_dir / row.path)
        got = received[uid]
        assert got.file_meta.TransferSyntaxUID == TransferSyntax.IMPLICIT_LE
        assert_same_values(orig, got, TransferSyntax(row.transfer_syntax).is_little_endian)
        if "PixelData" in orig:
            assert (orig.pixel_array == got.pixel_array).all()


def run_cli(data_dir: Path, *args: str | int) -> int:
    return main(["--data-dir", str(data_dir), *[str(a) for a in args]])


# -- echo ----------------------------------------------------------------------------


def test_echo_succeeds_against_storescp(storescp, capsys) -> None:  # type: ignore[no-untyped-def]
    peer = storescp()
    assert main(["echo", "-aec", PEER_AE, "-pdu", str(MIN_PDU), "127.0.0.1", str(peer.port)]) == 0
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1
    assert out.startswith(f"C-ECHO to {PEER_AE}@127.0.0.1:{peer.port} (as {CLIENT_AE_TITLE}) succeeded")
    assert "round trip" in out and " ms" in out
    result = echo(Destination(PEER_AE, "127.0.0.1", peer.port))
    assert result.rtt_ms > 0


def test_echo_to_a_closed_port_says_connection_refused(capsys) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    assert main(["echo", "127.0.0.1", str(port)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err]
    assert f"connection refused by 127.0.0.1:{port}" in err


def test_echo_rejected_for_the_called_ae_title_says_why(pypeer, capsys) -> None:  # type: ignore[no-untyped-def]
    peer = pypeer(require_called_aet=True)
    assert main(["echo", "-aec", "WRONG_AE", "127.0.0.1", str(peer.port)]) == 1
    err = capsys.readouterr().err.strip()
    assert "association rejected permanently" in err
    assert "does not answer to the called AE title 'WRONG_AE'" in err
    assert main(["echo", "-aec", "PYPEER", "127.0.0.1", str(peer.port)]) == 0


def test_echo_rejected_by_storescp(storescp, capsys) -> None:  # type: ignore[no-untyped-def]
    peer = storescp("--refuse")
    assert main(["echo", "-aec", PEER_AE, "127.0.0.1", str(peer.port)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"appliance: association rejected") and f"{PEER_AE}@127.0.0.1:{peer.port}" in err


def test_echo_times_out_when_the_peer_never_answers() -> None:
    with socket.socket() as silent:  # accepts TCP (backlog) but never speaks DICOM
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        with pytest.raises(NetworkError, match="did not answer the association request within 1 s"):
            echo(Destination("ANY", "127.0.0.1", port), ClientSettings(timeout=1))


def test_echo_reports_an_abort() -> None:
    with socket.socket() as rude:
        rude.bind(("127.0.0.1", 0))
        rude.listen(1)
        port = rude.getsockname()[1]

        def hang_up() -> None:
            conn, _ = rude.accept()
            conn.recv(65536)
            conn.close()

        t = threading.Thread(target=hang_up)
        t.start()
        with pytest.raises(NetworkError, match="aborted the association request"):
            echo(Destination("ANY", "127.0.0.1", port), ClientSettings(timeout=5))
        t.join()


def test_echo_with_an_unknown_host() -> None:
    with pytest.raises(NetworkError, match="cannot resolve host name"):
        echo(Destination("ANY", "no-such-host.invalid", 104))


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A loopback port whose connects time out, as a host that drops packets: a listening
    socket with its accept queue full (Linux drops the SYNs). Checked before it is used."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers: list[socket.socket] = []
        try:
            while True:
                assert len(fillers) < 8, "the accept queue never filled: connects to the port do not time out"
                s = socket.socket()
                fillers.append(s)
                s.settimeout(0.5)
                try:
                    s.connect(("127.0.0.1", port))
                except TimeoutError:
                    break
            yield port
        finally:
            for s in fillers:
                s.close()


@pytest.mark.parametrize("command", ["echo", "send"])
def test_a_connect_timeout_is_waited_once(command, box, data_dir, blackhole, capsys) -> None:  # type: ignore[no-untyped-def]
    images = ct_series(2)
    for ds in images:
        put(box, ds)
    args: list[str | int] = [command, "--timeout", 2, "127.0.0.1", blackhole]
    if command == "send":
        args += ["--series", images[0].SeriesInstanceUID]
    t0 = time.monotonic()
    assert run_cli(data_dir, *args) == 1
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert f"connection to 127.0.0.1:{blackhole} timed out after 2 s: the host does not answer" in err
    assert 2 <= elapsed < 2 * 1.3, f"{elapsed:.2f} s for a timeout of 2 s"


@pytest.mark.parametrize("command", ["echo", "send"])
@pytest.mark.parametrize("pdu", [100, MIN_PDU - 1, -1, MAX_PDU + 1])
def test_a_max_pdu_out_of_range_is_a_usage_error(command, pdu, data_dir, capsys) -> None:  # type: ignore[no-untyped-def]
    args = [command, "-pdu", str(pdu), "127.0.0.1", "104"]
    if command == "send":
        args += ["--series", "1.2.3"]
    with pytest.raises(SystemExit) as usage:
        run_cli(data_dir, *args)
    assert usage.value.code == 2
    assert (f"argument -pdu/--max-pdu: max PDU {pdu} bytes is out of range; the client AE needs {MIN_PDU} to "
            f"{MAX_PDU} bytes, or 0 for no limit") in capsys.readouterr().err


@pytest.mark.parametrize("command", ["echo", "send"])
@pytest.mark.parametrize("timeout", ["0", "-1", "3601", "soon"])
def test_a_timeout_out_of_range_is_a_usage_error(command, timeout, data_dir, capsys) -> None:  # type: ignore[no-untyped-def]
    args = [command, "--timeout", timeout, "127.0.0.1", "104"]
    if command == "send":
        args += ["--series", "1.2.3"]
    with pytest.raises(SystemExit) as usage:
        run_cli(data_dir, *args)
    assert usage.value.code == 2  # like -pdu: a usage error, not a failed echo or send
    err = capsys.readouterr().err
    assert "argument --timeout:" in err
    assert ("is not a number of seconds" if timeout == "soon" else "is out of range; use 1 to 3600 seconds") in err


def test_client_settings_check_the_max_pdu() -> None:
    for bad in (1024, MIN_PDU - 1, -1, MAX_PDU + 1):
        with pytest.raises(ConfigError, match=f"max PDU {bad} bytes is out of range"):
            ClientSettings(max_pdu=bad).check()
    for good in (0, MIN_PDU, MAX_PDU):
        ClientSettings(max_pdu=good).check()
    assert ClientSettings().max_pdu == DEFAULT_CLIENT_PDU and ClientSettings().calling_ae == CLIENT_AE_TITLE


def test_max_pdu_0_means_no_limit_for_echo_and_send(box, data_dir, storescp, capsys) -> None:  # type: ignore[no-untyped-def]
    images = ct_series(3)
    for ds in images:
        put(box, ds)
    peer = storescp("-d")
    assert run_cli(data_dir, "echo", "-aec", PEER_AE, "-pdu", 0, "127.0.0.1", peer.port) == 0
    assert "succeeded" in capsys.readouterr().out
    series = images[0].SeriesInstanceUID
    assert run_cli(data_dir, "send", "-aec", PEER_AE, "-pdu", 0, "127.0.0.1", peer.port, "--series", series) == 0
    assert "3 of 3 object(s) stored by" in capsys.readouterr().out
    log = peer.stop()
    # What each A-ASSOCIATE-RQ announced: the echo and the send 0 (no limit), the fixture's
    # readiness echoes DCMTK's default.
    announced = re.findall(r"BEGIN A-ASSOCIATE-RQ.*?Their Max PDU Receive Size: +(\d+)", log, re.S)
    assert announced.count("0") == 2 and len(announced) > 2
    assert_received_as_stored(box, peer.received(), {d.SOPInstanceUID for d in images})


# -- export --------------------------------------------------------------------------


def test_a_series_reaches_storescp_identical_in_implicit_le_over_one_association(
    box, data_dir, storescp, capsys  # type: ignore[no-untyped-def]
) -> None:
    images = ct_series(5)
    syntaxes = [TransferSyntax.EXPLICIT_LE, TransferSyntax.EXPLICIT_BE, TransferSyntax.IMPLICIT_LE,
                TransferSyntax.EXPLICIT_BE, TransferSyntax.EXPLICIT_LE]
    for ds, ts in zip(images, syntaxes):
        put(box, ds, ts)
    rs = structure_set(images)
    put(box, rs, TransferSyntax.EXPLICIT_BE)
    other = ct_series(3, study_uid=images[0].StudyInstanceUID)
    for ds in other:
        put(box, ds)
    put(box, structure_set(other))  # references the other series: must not go along
    peer = storescp()

    series = images[0].SeriesInstanceUID
    assert run_cli(data_dir, "send", "-aec", PEER_AE, "127.0.0.1", peer.port, "--series", series) == 0
    out = capsys.readouterr().out
    assert "6 of 6 object(s) stored by" in out and "0 failed, 0 not sent" in out
    assert out.count("\nsent ") + out.startswith("sent ") == 6
    log = peer.stop()
    # One association for the export; the others are the fixture's readiness C-ECHOs.
    assert log.count("Association Received") - log.count("Received Echo Request") == 1
    assert_received_as_stored(box, peer.received(), {d.SOPInstanceUID for d in images} | {rs.SOPInstanceUID})
    # Half of the study stayed behind: it is not delivered, so retention keeps it.
    assert box.marks.get() == {}


def test_a_study_sent_whole_is_recorded_as_delivered(box, data_dir, storescp, capsys) -> None:  # type: ignore[no-untyped-def]
    images = ct_series(3)
    for ds in images:
        put(box, ds)
    peer = storescp()
    study = images[0].StudyInstanceUID
    assert run_cli(data_dir, "send", "-aec", PEER_AE, "127.0.0.1", peer.port, "--study", study) == 0
    mark = box.marks.get()[study]
    assert mark.delivered_to == f"{PEER_AE}@127.0.0.1:{peer.port}"
    assert mark.delivered_at is not None and mark.delivered_at >= box.study_usage()[0].last_received
    assert not list((data_dir / "busy").glob("*")), "the busy mark goes when the send ends"
    from appliance import audit

    [event] = audit.read(data_dir)
    assert event["event"] == "DICOM Instances Transferred" and event["outcome"] == 0
    assert event["studies"] == [{"study_uid": study, "objects": 3}]
    assert event["participants"][1] == {"role": "destination", "ae": PEER_AE, "address": f"127.0.0.1:{peer.port}"}


def test_a_study_sends_its_volumes_and_refuses_the_rest_with_reasons(
    box, data_dir, storescp, capsys  # type: ignore[no-untyped-def]
) -> None:
    images = ct_series(4)
    study = images[0].StudyInstanceUID
    for ds in images:
        put(box, ds)
    rs = structure_set(images)
    put(box, rs)
    scout = ct_series(1, study_uid=study)
    put(box, scout[0])
    uneven = ct_series(3, study_uid=study)
    uneven[2].ImagePositionPatient = [-10.0, -10.0, 9.0]
    for ds in uneven:
        put(box, ds)
    peer = storescp()

    assert run_cli(data_dir, "send", "-aec", PEER_AE, "127.0.0.1", peer.port, "--study", study) == 1
    out = capsys.readouterr().out
    assert f"series {scout[0].SeriesInstanceUID} is not a 3D volume (1 slice; a volume needs at least 2)" in out
    assert f"series {uneven[0].SeriesInstanceUID} is not a 3D volume (uneven slice spacing" in out
    assert "5 of 5 object(s) stored" in out and "2 request(s) refused" in out
    peer.stop()
    assert_received_as_stored(box, peer.received(), {d.SOPInstanceUID for d in images} | {rs.SOPInstanceUID})


def test_xa_and_sc_are_not_sent_over_the_network(box, data_dir, storescp, capsys) -> None:  # type: ignore[no-untyped-def]
    for role in ("xa_ele", "sc_ele"):
        put_file(box, sample(role).path)
    peer = storescp()
    for role in ("xa_ele", "sc_ele"):
        uid = dcmread(sample(role).path).SeriesInstanceUID
        assert run_cli(data_dir, "send", "-aec", PEER_AE, "127.0.0.1", peer.port, "--series", uid) == 1
        err = capsys.readouterr().err
        assert "nothing to send" in err
        assert "XA and SC are not in Table 6 of the conformance statement, so they are not sent over the network" in err
    peer.stop()
    assert peer.received() == {}


def test_only_volumes_are_exported(box) -> None:  # type: ignore[no-untyped-def]
    single = ct_series(1)
    put(box, single[0])
    tilted = ct_series(3)
    tilted[1].ImageOrientationPatient = [1, 0, 0, 0, 0.8, 0.6]
    for ds in tilted:
        put(box, ds)
    plan = plan_send(box, series=[single[0].SeriesInstanceUID, tilted[0].SeriesInstanceUID, "1.2.3.4"])
    assert plan.objects == ()
    reasons = [r.reason for r in plan.refused]
    assert "is not a 3D volume (1 slice; a volume needs at least 2)" in reasons[0]
    assert "inconsistent orientation" in reasons[1]
    assert reasons[2] == "series 1.2.3.4 is not stored on this box"
    with pytest.raises(SendRefused, match="nothing to send: series .* is not a 3D volume"):
        send(box, plan, Destination("ANY", "127.0.0.1", 104))


def test_a_structure_set_asked_for_alone_brings_its_image_series(box) -> None:  # type: ignore[no-untyped-def]
    images = ct_series(3)
    for ds in images:
        put(box, ds)
    rs = structure_set(images)
    put(box, rs)
    plan = plan_send(box, series=[rs.SeriesInstanceUID])
    assert [o.sop_instance_uid for o in plan.objects] == [d.SOPInstanceUID for d in images] + [rs.SOPInstanceUID]
    assert plan.refused == ()


def test_only_needed_contexts_implicit_le_only_and_one_association_at_a_time(box, pypeer) -> None:  # type: ignore[no-untyped-def]
    images = ct_series(3)
    for ds in images:
        put(box, ds)
    plan = plan_send(box, series=[images[0].SeriesInstanceUID])
    peer = pypeer()
    dest = Destination("PYPEER", "127.0.0.1", peer.port)
    reports = []
    threads = [threading.Thread(target=lambda: reports.append(send(box, plan, dest))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.ok for r in reports] == [True] * 3
    assert all(r.outcome is SendOutcome.SENT and r.status == 0 for rep in reports for r in rep.items)
    assert peer.associations == 3 and peer.max_active == 1
    assert set(peer.requested) == {(str(SOPClass.CT_IMAGE), (str(TransferSyntax.IMPLICIT_LE),))}
    assert len(peer.stored) == 9


def test_a_network_failure_mid_study_reports_what_was_not_sent_and_a_rerun_completes(
    box, data_dir, storescp, capsys  # type: ignore[no-untyped-def]
) -> None:
    images = ct_series(4)
    for ds in images:
        put(box, ds)
    series = images[0].SeriesInstanceUID
    broken = storescp("--abort-after", name="broken")
    assert run_cli(data_dir, "send", "-aec", PEER_AE, "127.0.0.1", broken.port, "--series", series) == 1
    out = capsys.readouterr().out
    assert "3 not sent" in out and "the export stopped" in out and "Run the same command again" in out
    assert out.count("not sent  ") == 3

    good = storescp(name="good")
    assert run_cli(data_dir, "send", "-aec", PEER_AE, "127.0.0.1", good.port, "--series", series) == 0
    good.stop()
    assert_received_as_stored(box, good.received(), {d.SOPInstanceUID for d in images})


def test_named_destinations_from_the_config(box, data_dir, storescp, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    images = ct_series(2)
    for ds in images:
        put(box, ds)
    peer = storescp()
    cfg_path = tmp_path / "appliance.toml"
    cfg = config_mod.Config(destinations={"pacs": Destination(PEER_AE, "127.0.0.1", peer.port)})
    config_mod.save(cfg, cfg_path)
    assert config_mod.load(cfg_path) == cfg
    series = images[0].SeriesInstanceUID
    args = ["--config", str(cfg_path), "--data-dir", str(data_dir), "send"]
    assert main([*args, "--to", "pacs", "--series", series]) == 0
    assert "2 of 2 object(s) stored by STORESCP@127.0.0.1" in capsys.readouterr().out
    assert main([*args, "--to", "nowhere", "--series", series]) == 1
    assert "no destination 'nowhere' in the config file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main([*args, "--to", "pacs", "127.0.0.1", "104", "--series", series])
    assert usage.value.code == 2


def test_destination_config_problems_are_gathered() -> None:
    with pytest.raises(ConfigError) as exc:
        config_mod.from_dict({"destinations": {"pacs": {"ae_title": "X" * 17, "port": 0}, "b c": {"host": "h"}}})
    text = str(exc.value)
    for problem in ("destinations.pacs.ae_title 'XXXXXXXXXXXXXXXXX' is 17 characters",
                    "destinations.pacs.host is missing", "destinations.pacs.port 0 is out of range",
                    "[destinations.b c]: a destination name", "destinations.b c.ae_title is empty"):
        assert problem in text
