"""Forwarding rules and the durable outbound queue, against DCMTK storescp as the destination:
what a rule matches arrives, whole and byte for byte; a destination that is down, killed
mid-batch, or a box killed mid-send loses nothing and re-sends only what was not acknowledged."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from appliance import config
from appliance.config import Config, Destination, ForwardRule, ScpConfig, StoreConfig
from appliance.jobs import forwarder as fwd
from appliance.jobs.forwarder import Forwarder, forward_lines
from appliance.net.scp import StorageServer
from appliance.store.ingest import Ingest
from appliance.store.store import Store

from helpers import ROOT, ct_series, dcmtk, free_port, run, wait_for, write_series

PEER_AE = "PLANNING_AE"


@dataclass
class Peer:
    """DCMTK storescp writing what it receives to ``out`` (every transfer syntax accepted)."""

    port: int
    out: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Peer:
        self.out.mkdir(exist_ok=True)
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen([dcmtk("storescp"), "-v", "-aet", PEER_AE, "+xa", "-od", str(self.out),
                                          str(self.port)], stdout=f, stderr=subprocess.STDOUT)
        wait_for(lambda: run([dcmtk("echoscu"), "-aec", PEER_AE, "127.0.0.1", str(self.port)]).returncode == 0,
                 what="storescp to answer")
        return self

    def kill(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)

    def uids(self) -> set[str]:
        """The SOP Instance UIDs of the files it wrote; one it is still writing is left out
        (storescp writes under the final name: the forwarder keeps pace with our polling)."""
        found = set()
        for p in self.out.iterdir():
            if p.is_file():
                try:
                    found.add(str(dcmread(p, stop_before_pixels=True).SOPInstanceUID))
                except (InvalidDicomError, AttributeError, EOFError):
                    continue
        return found

    def requests(self) -> int:
        """How many C-STORE requests it received (over all its runs)."""
        return self.log.read_text(errors="replace").count("Received Store Request")


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[Callable[..., Peer]]:
    made: list[Peer] = []

    def make(start: bool = True) -> Peer:
        p = Peer(free_port(), tmp_path / f"peer{len(made)}", tmp_path / f"peer{len(made)}.log")
        made.append(p)
        return p.start() if start else p

    yield make
    for p in made:
        p.kill()


def box_config(peer_port: int, **rule: object) -> Config:
    return config.from_dict({
        "destinations": {"PLANNING": {"ae_title": PEER_AE, "host": "127.0.0.1", "port": peer_port}},
        "forward": [{"to": ["PLANNING"], **rule}],
    })


class Box:
    """Our SCP and a Forwarder on one store, as ``appliance run`` has them."""

    def __init__(self, data: Path, cfg: Config, poll: float = 0.1, linger: float = fwd.LINGER) -> None:
        self.cfg = cfg
        self.store = Store(data)
        self.store.set_forwarding(cfg.forward)
        self.store.open_for_service()
        self.server = StorageServer(ScpConfig(bind="127.0.0.1", port=0), Ingest(self.store, StoreConfig(min_free_mb=0)))
        self.port = self.server.start().port
        # Retries after 0.2 s, at most 1 s apart (the box's are 5 s to an hour).
        self.forwarder = Forwarder(self.store, lambda: self.cfg, poll=poll, backoff_first=0.2, backoff_most=1.0,
                                   linger=linger)
        self.forwarder.start()

    def send(self, files: list[Path], aet: str = "CT_SIM") -> None:
        r = run([dcmtk("storescu"), "-aet", aet, "-aec", "ELEKTA_STORAGE", "127.0.0.1", str(self.port),
                 *map(str, files)], timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr

    def stop(self) -> None:
        self.forwarder.stop()
        self.server.stop(grace=2)
        self.store.close()


def test_a_rule_by_calling_ae_and_modality_forwards_what_it_matches_byte_for_byte(tmp_path, peer):
    p = peer()
    box = Box(tmp_path / "data", box_config(p.port, calling_ae=["CT_SIM"], modality=["CT"]))
    try:
        ct = write_series(ct_series(40, rows=64, cols=64), tmp_path / "ct")
        other = write_series(ct_series(5, rows=8, cols=8), tmp_path / "other")
        box.send(ct, aet="CT_SIM")
        box.send(other, aet="MR_ROOM")  # another calling AE: not forwarded
        wanted = {str(dcmread(f).SOPInstanceUID) for f in ct}
        wait_for(lambda: p.uids() == wanted, timeout=60, what="the CT series at the destination")
        wait_for(lambda: box.store.index.forward_states()[0].pending == 0, what="an empty queue")
        # Byte for byte: the data set the destination wrote is the one stored.
        for f in ct[:3]:
            uid = str(dcmread(f).SOPInstanceUID)
            stored = dcmread(box.store.locate(uid))
            got = dcmread(p.out / next(x.name for x in p.out.iterdir() if uid in x.name))
            assert stored.PixelData == got.PixelData and stored.file_meta.TransferSyntaxUID == \
                got.file_meta.TransferSyntaxUID
        state = box.store.index.forward_states()[0]
        assert state.sent == 40 and state.set_aside == 0
        assert "PLANNING: 0 waiting; 40 sent; last sent" in forward_lines(box.store)[0]
        # Every object of the study arrived: retention may delete it.
        study = str(dcmread(ct[0]).StudyInstanceUID)
        wait_for(lambda: study in box.store.marks.get(), what="the study recorded as delivered after its batch")
        assert box.store.marks.get()[study].delivered_to == "forwarded to PLANNING"
        assert p.requests() == 40, "nothing sent twice"
        # The audit trail has each batch: from the client AE to the destination, per study.
        from appliance import audit

        sent = [e for e in audit.read(box.store.data_dir) if e["event"] == "DICOM Instances Transferred"]
        assert sum(st["objects"] for e in sent for st in e["studies"]) == 40
        assert all(e["participants"][1]["ae"] == PEER_AE and e["outcome"] == 0 for e in sent)
    finally:
        box.stop()


def test_what_is_queued_leaves_at_once_not_at_the_next_look_at_the_whole_queue(tmp_path, peer):
    """The index written (here by the SCP in this process; in the box by its SCP process)
    wakes the forwarder: with the whole queue looked at only once an hour, each of three
    objects sent one after the other still arrives, over one association that waited for
    the next (linger, one audit event), and the association ends once none comes."""
    p = peer()
    box = Box(tmp_path / "data", box_config(p.port), poll=3600, linger=30)
    try:
        for n, ds in enumerate(ct_series(3, rows=8, cols=8), 1):
            box.send(write_series([ds], tmp_path / f"ct{n}"))
            wait_for(lambda n=n: len(p.uids()) == n, timeout=20, what=f"object {n} at the destination")
        assert p.log.read_text().count("Association Received") == 2, "one association (and the fixture's echo)"
    finally:
        box.stop()
    releases = p.log.read_text().count("Association Release")
    assert releases == 2, "the fixture's echo, and ours at stop"
    from appliance import audit

    sent = [e for e in audit.read(box.store.data_dir) if e["event"] == "DICOM Instances Transferred"]
    assert [sum(st["objects"] for st in e["studies"]) for e in sent] == [3], "one event for the association"
    box2 = Box(tmp_path / "data2", box_config(p.port), poll=3600, linger=0.05)
    try:
        box2.send(write_series(ct_series(1, rows=8, cols=8), tmp_path / "ct-linger"))
        wait_for(lambda: p.log.read_text().count("Association Release") == 3, what="a release once nothing came")
    finally:
        box2.stop()


def test_an_association_the_destination_closed_while_it_waited_is_not_a_failure(tmp_path, peer):
    """The destination restarted while the association waited for the next object: the
    next object goes over a new association at once, no failure or backoff recorded."""
    p = peer()
    box = Box(tmp_path / "data", box_config(p.port), poll=3600, linger=60)
    try:
        first, second = ct_series(2, rows=8, cols=8)
        box.send(write_series([first], tmp_path / "ct1"))
        wait_for(lambda: len(p.uids()) == 1, timeout=20, what="the first object at the destination")
        p.kill()
        p.start()
        box.send(write_series([second], tmp_path / "ct2"))
        wait_for(lambda: box.store.index.forward_states()[0].sent == 2, timeout=20,
                 what="the second object taken by the destination")
        state = box.store.index.forward_states()[0]
        assert (state.failures, state.last_error) == (0, None)
        assert len(p.uids()) == 2
    finally:
        box.stop()


def test_a_destination_down_keeps_its_backlog_and_gets_it_when_back(tmp_path, peer):
    p = peer(start=False)
    box = Box(tmp_path / "data", box_config(p.port))
    try:
        files = write_series(ct_series(30, rows=32, cols=32), tmp_path / "ct")
        box.send(files)
        wait_for(lambda: box.store.index.forward_states()[0].failures >= 2, what="failed tries")
        st = box.store.index.forward_states()[0]
        assert st.pending == 30 and "cannot connect" in (st.last_error or "") or "refused" in (st.last_error or "")
        assert any("FORWARDING" in x or "failing" in x for x in fwd.problems(box.store))
        p.start()
        wanted = {str(dcmread(f).SOPInstanceUID) for f in files}
        wait_for(lambda: p.uids() == wanted, timeout=60, what="the backlog at the destination")
        assert p.requests() == 30
        assert fwd.problems(box.store) == []
    finally:
        box.stop()


def test_a_destination_killed_mid_batch_gets_the_rest_and_only_the_unacknowledged_again(tmp_path, peer):
    p = peer()
    box = Box(tmp_path / "data", box_config(p.port))
    try:
        files = write_series(ct_series(300, rows=64, cols=64), tmp_path / "ct")
        # The CT goes in while the forwarder sends it on, which keeps pace with it: killed
        # once part of it arrived, the destination misses the rest.
        sending = threading.Thread(target=box.send, args=(files,))
        sending.start()
        wait_for(lambda: p.requests() >= 60, timeout=60, what="part of the batch at the destination")
        p.kill(signal.SIGKILL)
        arrived = p.requests()
        sending.join(300)
        assert arrived < 300
        p.start()
        wanted = {str(dcmread(f).SOPInstanceUID) for f in files}
        wait_for(lambda: p.uids() == wanted, timeout=120, what="every object at the destination")
        # Only an object in flight when it was killed (written, not acknowledged) can come twice.
        assert 300 <= p.requests() <= 301
        assert box.store.index.forward_states()[0].pending == 0
    finally:
        box.stop()


def test_a_permanent_refusal_is_set_aside_and_does_not_block(tmp_path, peer):
    p = peer()
    cfg = box_config(p.port)
    box = Box(tmp_path / "data", cfg)
    try:
        files = write_series(ct_series(3, rows=8, cols=8), tmp_path / "ct")
        # The destination takes only MR: every CT is refused (no accepted context) -> set aside.
        p.kill()
        with open(p.log, "ab") as f:
            p.proc = subprocess.Popen([dcmtk("storescp"), "-aet", PEER_AE, "-od", str(p.out),
                                       "-xf", str(_mr_only(tmp_path)), "StorageSCP", str(p.port)],
                                      stdout=f, stderr=subprocess.STDOUT)
        wait_for(lambda: run([dcmtk("echoscu"), "-aec", PEER_AE, "127.0.0.1", str(p.port)]).returncode == 0,
                 what="storescp")
        box.send(files)
        wait_for(lambda: box.store.index.forward_states() and box.store.index.forward_states()[0].set_aside == 3,
                 what="the objects set aside")
        assert box.store.index.forward_states()[0].pending == 0
        r = run([sys.executable, "-m", "appliance", "--data-dir", str(box.store.data_dir), "queue", "ls", "--forward"])
        assert "3 set aside" in r.stdout and "accepts no CT Image Storage" in r.stdout, r.stdout + r.stderr
        r = run([sys.executable, "-m", "appliance", "--data-dir", str(box.store.data_dir), "queue", "retry",
                 "--forward", "PLANNING"])
        assert "3 object(s) set aside are queued again" in r.stdout
    finally:
        box.stop()


def _mr_only(tmp_path: Path) -> Path:
    cfg = tmp_path / "mr-only.cfg"
    cfg.write_text("""
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = OppositeEndianExplicit
TransferSyntax3 = LittleEndianImplicit

[[PresentationContexts]]
[StorageSCP]
PresentationContext1 = MRImageStorage\\Uncompressed
PresentationContext2 = VerificationSOPClass\\Uncompressed

[[Profiles]]
[StorageSCP]
PresentationContexts = StorageSCP
""")
    return cfg


def test_stable_after_sends_a_series_once_it_is_complete(tmp_path, peer):
    p = peer()
    box = Box(tmp_path / "data", box_config(p.port, stable_after=2.0))
    try:
        series = ct_series(10, rows=8, cols=8)
        box.send(write_series(series[:5], tmp_path / "a"))
        assert box.store.index.forward_batch("PLANNING", time.time(), 100, 10**9) == [], "not stable yet"
        second = write_series(series[5:], tmp_path / "b")
        before_second = time.time()
        box.send(second)
        # The new objects pushed the whole series' wait back: nothing of it is due until 2 s
        # after the last of them was stored, and then all of it is.
        assert box.store.index.forward_batch("PLANNING", before_second + 1.9, 100, 10**9) == []
        assert len(box.store.index.forward_batch("PLANNING", time.time() + 2.1, 100, 10**9)) == 10
        wait_for(lambda: len(p.uids()) == 10, timeout=20, what="the whole series")
        assert time.time() - before_second >= 1.9, "sent before the series was stable"
        assert p.log.read_text().count("Association Received") == 2, "one association (and the fixture's echo)"
    finally:
        box.stop()


def test_backlog_cap_drops_the_oldest_only_when_the_rule_says_so(tmp_path, peer):
    p = peer(start=False)
    for drop in (False, True):
        data = tmp_path / f"data-{drop}"
        box = Box(data, box_config(p.port, max_pending=5, drop_oldest=drop))
        try:
            box.send(write_series(ct_series(8, rows=8, cols=8), tmp_path / f"ct-{drop}"))
            box.forwarder.enforce_caps()
            st = box.store.index.forward_states()[0]
            if drop:
                assert st.pending == 5 and st.dropped == 3
            else:
                assert st.pending == 8 and "above the cap of 5 objects" in box.forwarder.over_cap()["PLANNING"]
        finally:
            box.stop()


def test_forward_rules_are_validated():
    with pytest.raises(config.ConfigError, match="destination 'NOPE' is not configured"):
        config.from_dict({"forward": [{"to": ["NOPE"]}]})
    with pytest.raises(config.ConfigError, match=r"must be written \[\[forward\]\]"):
        config.from_dict({"forward": {"to": ["X"]}})
    with pytest.raises(config.ConfigError, match="origin 'usb'"):
        config.from_dict({"destinations": {"X": {"ae_title": "X", "host": "h", "port": 1}},
                          "forward": [{"to": ["X"], "origin": ["usb"]}]})
    rule = ForwardRule(calling_ae=("CT_SIM",), modality=("CT", "RTSTRUCT"), to=("X",))
    assert rule.matches("CT_SIM", "CT", "1.2", "network") and not rule.matches("MR", "CT", "1.2", "network")
    assert not rule.matches(None, "CT", "1.2", "cd:DISC")
    assert ForwardRule(origin=("cd",), to=("X",)).matches(None, "MR", "1.2", "cd:DISC")
    assert Destination  # the config's type for destinations


def test_appliance_run_killed_mid_send_loses_nothing(tmp_path, peer):
    """A power cut of the box (kill -9 of appliance run and its SCP) while it forwards: after
    a restart, everything arrives; only what was in flight can come twice."""
    p = peer()
    port = free_port()
    cfgfile = tmp_path / "appliance.toml"
    cfgfile.write_text(f"""
[scp]
port = {port}
bind = "127.0.0.1"

[destinations.PLANNING]
ae_title = "{PEER_AE}"
host = "127.0.0.1"
port = {p.port}

[[forward]]
calling_ae = ["CT_SIM"]
to = ["PLANNING"]
""")
    data = tmp_path / "data"
    log = tmp_path / "run.log"

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-m", "appliance", "--config", str(cfgfile), "--data-dir", str(data),
                                 "run", "--runtime-dir", str(tmp_path / "rt"), "--no-media"],
                                stdout=open(log, "ab"), stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        wait_for(lambda: run([dcmtk("echoscu"), "-aec", "ELEKTA_STORAGE", "127.0.0.1", str(port)]).returncode == 0,
                 timeout=60, what="appliance run to answer")
        return proc

    proc = start()
    series = ct_series(300, rows=64, cols=64)
    files = write_series(series, tmp_path / "ct")
    uid_of = {str(f): str(ds.SOPInstanceUID) for f, ds in zip(files, series)}
    try:
        # The CT arrives while the box forwards it (the forwarder keeps pace with the SCP), and
        # the box dies in the middle of both: what the box acknowledged must all arrive.
        sender = subprocess.Popen([dcmtk("storescu"), "-v", "-aet", "CT_SIM", "-aec", "ELEKTA_STORAGE", "127.0.0.1",
                                   str(port), *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
        wait_for(lambda: p.requests() >= 20, timeout=60, what="forwarding to start")
        os.killpg(proc.pid, signal.SIGKILL)  # the supervisor, its SCP: the whole box
        proc.wait(10)
        out, _ = sender.communicate(timeout=60)
        acked, current = set(), None
        for line in out.splitlines():
            if m := re.search(r"Sending file: (\S+)", line):
                current = m.group(1)
            elif "Received Store Response (Success)" in line and current:
                acked.add(uid_of[current])
        assert 20 <= len(acked) < 300, f"the kill came after {len(acked)} of 300 acknowledged: nothing to test"
        proc = start()
        wait_for(lambda: acked <= p.uids(), timeout=180, what="every acknowledged object at the destination")

        def drained() -> bool:
            r = run([sys.executable, "-m", "appliance", "--data-dir", str(data), "queue", "ls", "--forward"])
            return "PLANNING: 0 waiting; " in r.stdout

        wait_for(drained, timeout=120, what="the forward queue to empty")
        assert p.uids() <= set(uid_of.values())
        assert p.requests() - len(p.uids()) <= 1, "more than the one object in flight came twice"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
