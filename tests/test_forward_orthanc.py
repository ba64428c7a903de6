"""Orthanc (Debian's ``orthanc`` package) as a forwarding destination of the real program
(``appliance run``): a CT sent to the box by DCMTK storescu arrives at Orthanc whole, each
object once; with Orthanc down the backlog waits in the box's queue with the error in words,
survives a reboot of the box, and arrives when Orthanc is back.

Orthanc runs on free ports with its storage and index in the test's folder, from a generated
configuration. Orthanc 1.10 has no setting for the address its DICOM port binds to (it listens
on every address); its HTTP server refuses other hosts (``RemoteAccessAllowed`` false), and its
DICOM port takes C-STORE only from the box's AE title on 127.0.0.1 (``DicomModalities`` with
``DicomCheckModalityHost``), so nothing else can store into it while the test runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from appliance.conformance import CLIENT_AE_TITLE

from helpers import ROOT, ct_series, dcmtk, free_port, run, wait_for, write_series


def _orthanc() -> str | None:
    # Debian installs it in /usr/sbin, which is not on every user's PATH.
    return shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")


ORTHANC = _orthanc()
ORTHANC_AE = "ORTHANC_TEST"

pytestmark = pytest.mark.skipif(
    ORTHANC is None, reason="Orthanc is not installed (Debian's orthanc package; scripts/test installs it)")

# No proxy from the environment for a server on loopback.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Orthanc:
    """Debian's Orthanc on free loopback ports, storage and index under ``folder``, log in ``folder/orthanc.log``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.log = folder / "orthanc.log"
        self.config = folder / "orthanc.json"
        self.proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)
        self.config.write_text(json.dumps({
            "Name": "appliance-test",
            "DicomAet": ORTHANC_AE,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"),
            "DicomCheckCalledAet": False,
            # C-STORE only from the box, on loopback; C-ECHO from anyone (the readiness check).
            "DicomAlwaysAllowStore": False,
            "DicomAlwaysAllowEcho": True,
            "DicomCheckModalityHost": True,
            "DicomModalities": {"box": [CLIENT_AE_TITLE, "127.0.0.1", 104]},
            "Plugins": [],
        }, indent=2))

    def start(self) -> Orthanc:
        assert ORTHANC is not None
        with open(self.log, "ab") as out:
            # --verbose: one line per C-STORE received ("Incoming Store request") and what became of it.
            # TCP_NODELAY=1: Orthanc's DCMTK then answers without waiting on delayed ACKs (~40 ms an object).
            self.proc = subprocess.Popen([ORTHANC, "--verbose", str(self.config)], stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, "TCP_NODELAY": "1"})
        wait_for(lambda: self._answers(), timeout=30, what="Orthanc to answer C-ECHO and HTTP")
        return self

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"Orthanc exited with status {self.proc.returncode}:\n"
                                 + self.log.read_text(errors="replace")[-2000:])
        if run([dcmtk("echoscu"), "-aec", ORTHANC_AE, "127.0.0.1", str(self.dicom_port)]).returncode != 0:
            return False
        try:
            return bool(self.get("/system"))
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def get(self, path: str) -> Any:
        with _HTTP.open(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
            return json.loads(r.read())

    def sop_instance_uids(self) -> list[str]:
        """Every SOP Instance UID Orthanc holds (one per instance: Orthanc keys instances by UID)."""
        return [i["MainDicomTags"]["SOPInstanceUID"] for i in self.get("/instances?expand")]

    def received(self) -> tuple[int, int]:
        """(C-STORE requests received, of which already stored) over all runs, from its log."""
        text = self.log.read_text(errors="replace")
        return text.count("Incoming Store request"), text.count("Already stored")


class ApplianceRun:
    """``appliance run`` as a subprocess in its own session (the box), its log in ``log``."""

    def __init__(self, tmp_path: Path, orthanc: Orthanc) -> None:
        self.port = free_port()
        self.data = tmp_path / "data"
        self.runtime = tmp_path / "rt"
        self.log = tmp_path / "run.log"
        self.config = tmp_path / "appliance.toml"
        self.config.write_text(f"""
[scp]
port = {self.port}
bind = "127.0.0.1"

[destinations.PLANNING]
ae_title = "{ORTHANC_AE}"
host = "127.0.0.1"
port = {orthanc.dicom_port}

[[forward]]
calling_ae = ["CT_SIM"]
to = ["PLANNING"]
""")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ApplianceRun:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "appliance", "--config", str(self.config), "--data-dir", str(self.data),
                 "run", "--runtime-dir", str(self.runtime), "--no-media"],
                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                env={**os.environ, "PYTHONPATH": str(ROOT)})
        wait_for(lambda: run([dcmtk("echoscu"), "-aec", "ELEKTA_STORAGE", "127.0.0.1", str(self.port)]).returncode
                 == 0, timeout=60, what="appliance run to answer")
        return self

    def stop(self) -> int:
        """SIGTERM, as systemd stops it at a reboot; return its exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def send(self, files: list[Path]) -> None:
        # TCP_NODELAY=1: without it DCMTK waits ~40 ms for a delayed ACK after each object.
        r = subprocess.run([dcmtk("storescu"), "-aet", "CT_SIM", "-aec", "ELEKTA_STORAGE", "127.0.0.1",
                            str(self.port), *map(str, files)], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "TCP_NODELAY": "1"})
        assert r.returncode == 0, r.stdout + r.stderr

    def forward_queue(self) -> str:
        r = run([sys.executable, "-m", "appliance", "--data-dir", str(self.data), "queue", "ls", "--forward"])
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout


def test_orthanc_gets_every_object_once_and_a_backlog_survives_its_outage_and_a_reboot_of_the_box(tmp_path):
    orthanc = Orthanc(tmp_path / "orthanc").start()
    box = ApplianceRun(tmp_path, orthanc).start()
    try:
        first = write_series(ct_series(300, rows=32, cols=32), tmp_path / "ct1")
        wanted = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in first}
        box.send(first)
        wait_for(lambda: orthanc.get("/statistics")["CountInstances"] >= 300, timeout=60,
                 what="300 instances at Orthanc")
        uids = orthanc.sop_instance_uids()
        assert len(uids) == 300 and set(uids) == wanted, "every object, nothing else"
        assert orthanc.received() == (300, 0), "each object sent once"
        assert "from AET ELEKTA_CLIENT on IP 127.0.0.1" in orthanc.log.read_text(errors="replace")
        wait_for(lambda: "PLANNING: 0 waiting; 300 sent" in box.forward_queue(), what="an empty queue")

        # Orthanc down: the next series waits in the box's queue, with the reason in words.
        orthanc.stop()
        second = write_series(ct_series(100, rows=32, cols=32), tmp_path / "ct2")
        wanted |= {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in second}
        box.send(second)

        def failed() -> str:
            q = box.forward_queue()
            return q if "last error" in q else ""

        queue = str(wait_for(failed, timeout=30, what="the failure in the forwarding queue"))
        assert "PLANNING: 100 waiting" in queue, queue
        assert f"connection refused by 127.0.0.1:{orthanc.dicom_port}" in queue, queue

        # A reboot of the box (SIGTERM, start again) keeps the backlog; Orthanc back gets it.
        assert box.stop() == 0, box.log.read_text(errors="replace")[-2000:]
        box.start()
        assert "PLANNING: 100 waiting" in box.forward_queue()
        orthanc.start()
        wait_for(lambda: orthanc.get("/statistics")["CountInstances"] >= 400, timeout=45,
                 what="the backlog at Orthanc after its restart and the box's")
        uids = orthanc.sop_instance_uids()
        assert len(uids) == 400 and set(uids) == wanted
        assert orthanc.received() == (400, 0), "each object sent once"
        wait_for(lambda: "PLANNING: 0 waiting; 400 sent" in box.forward_queue(), what="an empty queue")
    finally:
        box.stop()
        orthanc.stop()
