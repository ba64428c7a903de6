"""The console's Send page, driven as a technician would over a real pty: find a stored study
by its patient, see each series' 3D verdict and what the sender's plan sends (the RT
Structure Set with its volume) and refuses (a one-slice series, with the reason), choose a
destination that is a real DCMTK storescp, confirm, watch the progress to the result in
words, and find the objects at storescp. A send to a slow peer is left running: the menu
comes back, Status shows "sending N of M to NAME", then the result.

In-process: the study list's pages and filters, and the send job's status file when the job
is killed, never starts, or names an unknown destination.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt

from appliance.conformance import TABLE_2, SOPClass, TransferSyntax
from appliance.jobs import results, sendjob
from appliance.ops.configservice import ConfigFile
from appliance.ops.console import Console
from appliance.ops.console.export import StudyFilter, date_range
from appliance.ops.consolesettings import ConsoleSettings
from appliance.store.store import Store
from helpers import ct_series, run, wait_for
from test_console import APPLIANCE, Terminal, w
from test_console_delete import quit_console
from test_sender import PEER_AE, Storescp, put, storescp, structure_set  # noqa: F401 - storescp is a fixture


class Box:
    """A store with two patients' studies, a config file naming destinations; no appliance runs.

    Jane Doe's study: a 4-slice CT volume, an RT Structure Set on it, a one-slice scout.
    Rick Roe's study (received last, so first in the list): a 3-slice CT volume, dated 2025."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.config = tmp / "appliance.toml"
        self.config.write_text("[scp]\nport = 11112\n")
        self.data = tmp / "data"
        self.volume = ct_series(4, patient="Doe^Jane")
        self.study = str(self.volume[0].StudyInstanceUID)
        self.rtstruct = structure_set(self.volume)
        self.scout = ct_series(1, study_uid=self.study, patient="Doe^Jane")
        self.scout[0].SeriesNumber = 4
        other = ct_series(3, patient="Roe^Rick")
        for ds in other:
            ds.PatientID, ds.StudyDate = "PAT-2", "20250301"
        self.other_study = str(other[0].StudyInstanceUID)
        store = Store(self.data)
        try:
            for ds in [*self.volume, self.rtstruct, *self.scout, *other]:
                put(store, ds)
        finally:
            store.close(clean=False)

    @property
    def sent(self) -> set[str]:
        """What a send of Jane Doe's study sends: the volume and its structure set."""
        return {str(d.SOPInstanceUID) for d in [*self.volume, self.rtstruct]}

    def destination(self, name: str, ae: str, port: int) -> None:
        with open(self.config, "a") as f:
            f.write(f'\n[destinations.{name}]\nae_title = "{ae}"\nhost = "127.0.0.1"\nport = {port}\n')

    def console(self) -> Terminal:
        t = Terminal([*APPLIANCE, "--config", str(self.config), "--data-dir", str(self.data), "console",
                      "--runtime-dir", str(self.tmp / "run"), "--no-journal"])
        t.expect("Choice: ")
        t.type("e")
        return t

    def status(self) -> str:
        """What ``appliance status`` prints."""
        return run([*APPLIANCE, "--config", str(self.config), "--data-dir", str(self.data), "status",
                    "--runtime-dir", str(self.tmp / "run")]).stdout

    def stop_jobs(self) -> None:
        for s in sendjob.running(self.data):
            if s.pid is not None:
                os.kill(s.pid, signal.SIGTERM)


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Box]:
    b = Box(tmp_path)
    yield b
    b.stop_jobs()


STUDY_PROMPT = r"Study \(number or UID\), or a letter: "


def test_find_a_study_by_patient_see_the_plan_and_send_it_to_storescp(box: Box, storescp) -> None:  # type: ignore[no-untyped-def]
    peer: Storescp = storescp()
    box.destination("pacs", PEER_AE, peer.port)
    t = box.console()
    try:
        seen = t.expect(STUDY_PROMPT)
        assert "Last send: none yet" in seen
        assert re.search(w("2 studies, latest received first. Filter: none."), seen)
        assert re.search(r"1 20250301 PAT-2 +Roe Rick +CT .*\r\n +2 20261128 VOL-1 +Doe Jane +CT,RTSTRUCT +3 +6 ",
                         seen)

        # Filtered by part of the patient's name: only her study is left.
        t.type("f")
        t.answer(((r"Patient name or ID, or part of it \(now: any\): ", "jane"),
                  (r"Modality, e\.g\. CT, MR, PT, RTSTRUCT \(now: any\): ", ""),
                  (r"Study date YYYYMMDD, YYYYMM, YYYY or FROM-TO \(now: any\): ", "")))
        seen = t.expect(STUDY_PROMPT)
        assert re.search(w("1 study, latest received first. Filter: patient 'jane'."), seen)
        assert "VOL-1" in seen and "PAT-2" not in seen

        # The study's series: the store's 3D verdict, and what the sender's plan does with each.
        t.type("1")
        seen = t.expect("Send what: ")
        assert f"Study {box.study}" in seen
        assert re.search(r"\d +CT +3 +4  yes  sent, with RT Structure Set \(1\)", seen)
        assert re.search(r"\d +CT +4 +1  no   not sent: is not a 3D volume \(1 slice; a\s+volume needs at least 2\)",
                         seen)
        assert re.search(r"\d +RTSTRUCT +99 +1  -    sent with series \d", seen)
        assert "Send the whole study: 5 object(s)" in seen

        t.type("a")
        seen = t.expect(r"Send to \(number or name; Enter cancels\): ")
        flat = " ".join(seen.split())
        assert "The plan: 5 object(s)" in flat and "Implicit VR Little Endian" in flat
        assert f"4 CT Image object(s), with RT Structure Set (1): series {box.volume[0].SeriesInstanceUID}" in flat
        assert (f"Not sent: study {box.study}: series {box.scout[0].SeriesInstanceUID} is not a 3D volume "
                "(1 slice; a volume needs at least 2)") in flat
        assert re.search(rf"1 +pacs +{PEER_AE} +127\.0\.0\.1:{peer.port}", seen)
        t.type("1")
        t.expect(re.escape(f"Send 5 object(s), 0.0 MB, to pacs ({PEER_AE} at 127.0.0.1:{peer.port})."))
        t.answer(((r"Start the send now\? \[y/N\]: ", "y"),))

        seen = t.expect(w("Finished: OK - pacs stored all 5 object(s); 1 request(s) refused by the plan, not sent."))
        assert re.search(w("sending: 5 of 5 object(s) sent,") + r"\s+[\d.]+\s+of\s+[\d.]+\s+MB,\s+[\d.]+\s+MB/s",
                         seen)
        seen = t.expect("Press Enter to go back. ")
        assert re.search(w(f"5 of 5 object(s) stored by {PEER_AE}@127.0.0.1:{peer.port} (as ELEKTA_CLIENT, one "
                           "association): 5 succeeded"), seen)
        t.answer((("", ""), ("Send what: ", "0")))
        seen = t.expect(STUDY_PROMPT)
        assert re.search(w("Last send: OK") + r".*" + w(f"pacs ({PEER_AE}@127.0.0.1:{peer.port}): pacs stored all 5"),
                         " ".join(seen.split()))
        t.type("0")
        quit_console(t, 0)
    finally:
        t.close()
    peer.stop()
    assert set(peer.received()) == box.sent
    assert all(ds.file_meta.TransferSyntaxUID == TransferSyntax.IMPLICIT_LE for ds in peer.received().values())
    last = results.last_results(box.data)["send"]
    assert last.ok and last.device == f"pacs ({PEER_AE}@127.0.0.1:{peer.port})"


class SlowPeer:
    """A pynetdicom Storage SCP that stores ``free`` objects at once, then holds each C-STORE
    until :attr:`gate` opens (a peer on a slow link, under the test's control)."""

    def __init__(self, free: int) -> None:
        self.gate = threading.Event()
        self.free = free
        self.lock = threading.Lock()
        self.arrived: list[str] = []
        self.stored: list[str] = []
        ae = AE(ae_title="SLOWPACS")
        for row in TABLE_2:
            ae.add_supported_context(row.abstract_syntax, [str(TransferSyntax.IMPLICIT_LE)])
        ae.add_supported_context(str(SOPClass.VERIFICATION), [str(TransferSyntax.IMPLICIT_LE)])
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = int(self.server.server_address[1])

    def _store(self, event) -> int:  # type: ignore[no-untyped-def]
        uid = str(event.request.AffectedSOPInstanceUID)
        with self.lock:
            self.arrived.append(uid)
            held = len(self.arrived) > self.free
        if held:
            self.gate.wait(50)  # the sender waits 60 s for a response
        with self.lock:
            self.stored.append(uid)
        return 0x0000

    def stop(self) -> None:
        self.gate.set()
        self.server.shutdown()


@pytest.fixture
def slow_peer() -> Iterator[SlowPeer]:
    p = SlowPeer(free=2)
    yield p
    p.stop()


def test_a_send_left_running_shows_in_status_then_its_result(box: Box, slow_peer: SlowPeer) -> None:
    box.destination("slow", "SLOWPACS", slow_peer.port)
    t = box.console()
    try:
        t.answer(((STUDY_PROMPT, box.study), ("Send what: ", "a"),
                  (r"Send to \(number or name; Enter cancels\): ", "slow"), (r"Start the send now\? \[y/N\]: ", "y")))
        t.expect(w("Sending to slow. Press Enter to go back to the menu: the send goes on, and Status (1) shows it."))
        t.expect(w("sending: 2 of 5 object(s) sent"))
        t.type("")
        t.expect(w("The send to slow goes on; Status (1) shows how far it is."))
        t.answer((("Choice: ", "1"),))
        seen = t.expect("Press Enter to go back. ")
        assert re.search(w(f"now: sending 2 of 5 to slow (SLOWPACS@127.0.0.1:{slow_peer.port}):"), seen)
        assert re.search(w("last send: none yet"), seen)
        t.type("")
        assert len(slow_peer.stored) == 2
        # appliance status says the same, from the same Health as STATUS= (no supervisor runs here).
        shown = box.status()
        assert f"now:      sending 2 of 5 to slow (SLOWPACS@127.0.0.1:{slow_peer.port}):" in shown
        assert "last send: none yet" in shown

        slow_peer.gate.set()
        wait_for(lambda: not sendjob.running(box.data), 60, "the send to end")
        t.answer((("Choice: ", "1"),))
        seen = t.expect("Press Enter to go back. ")
        assert "now:      sending" not in seen
        assert re.search(w("last send: OK") + r"\s+\S+\s+" + w(f"slow (SLOWPACS@127.0.0.1:{slow_peer.port}): slow "
                                                                "stored all 5 object(s); 1 request(s) refused"), seen)
        t.type("")
        quit_console(t, 0)
        shown = box.status()
        assert "now:      sending" not in shown and re.search(r"last send: OK \S+ slow \(SLOWPACS@", shown), shown
    finally:
        t.close()
    assert set(slow_peer.stored) == box.sent


# -- in-process ---------------------------------------------------------------------------------


def run_console(box: Box, *lines: str) -> str:
    out = io.StringIO()
    settings = ConsoleSettings(ConfigFile(box.config), box.tmp / "run" / "config.sock")
    Console(io.StringIO("".join(line + "\n" for line in lines)), out, settings, data_dir=box.data,
            journal=None, live_network=False).run()
    return out.getvalue()


def has(text: str, phrase: str) -> bool:
    return " ".join(phrase.split()) in " ".join(text.split())


def test_the_study_list_pages_and_filters(box: Box) -> None:
    store = Store(box.data)
    try:
        for n in range(10):
            for ds in ct_series(2, patient=f"Many^Patient{n:02d}"):
                ds.PatientID = f"MANY-{n:02d}"
                put(store, ds)
    finally:
        store.close(clean=False)
    text = run_console(box, "e", "n", "n", "p", "f", "-", "mr", "", "c",
                       "f", "", "", "2026-13", "f", "", "", "20261399", "f", "", "", "2025", "c",
                       "f", "", "", "20261101-", "99", "1.2.3.4", "0", "q")
    # Latest first: the ten last imported fill page 1, Jane Doe's study (the first) is 12th.
    assert has(text, "12 studies, latest received first. Filter: none.")
    assert re.search(r" 1 20261128 MANY-09 +Many Patient09 ", text)
    assert re.search(r" 12 20261128 VOL-1 +Doe Jane +CT,RTSTRUCT ", text)
    assert has(text, "Page 1 of 2: n next, p previous.") and has(text, "Page 2 of 2: n next, p previous.")
    assert has(text, "0 studies, latest received first. Filter: modality MR.")
    assert has(text, "Date not used: '13' is not a date; give YYYYMMDD, YYYYMM or YYYY, or a range such as "
                     "20260101-20261231.")
    assert has(text, "Date not used: '20261399' is not a date of the calendar")
    assert has(text, "1 study, latest received first. Filter: study date 2025.")
    assert has(text, "11 studies, latest received first. Filter: study date 20261101-.")
    assert has(text, "'99' is not on the list; give a number from 1 to 11, or a UID.")
    assert has(text, "'1.2.3.4' is not on the menu, and no stored study or series has that UID.")


def test_filter_words() -> None:
    assert date_range("2026") == ("20260000", "20269999")
    assert date_range("202611-20261205") == ("20261100", "20261205")
    assert date_range("-2025") == ("00000000", "20259999")
    with pytest.raises(ValueError, match="ends before it starts"):
        date_range("2026-2025")
    assert str(StudyFilter("doe", "ct", "2026")) == "patient 'doe', modality CT, study date 2026"


def test_no_destination_and_nothing_to_send(box: Box) -> None:
    text = run_console(box, "e", "1", "a", "1", "0", "0", "q")
    assert has(text, "No destination is configured: add one on page 3 (Export destinations) first.")
    # Only the scout, alone: the plan refuses it, nothing can be sent.
    text = run_console(box, "e", box.study, str(box.scout[0].SeriesInstanceUID), "", "0", "0", "q")
    assert has(text, f"Nothing of this can be sent: series {box.scout[0].SeriesInstanceUID}: is not a 3D volume")


def test_a_job_that_died_or_never_started_is_failed_in_words(box: Box) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    s = sendjob.SendStatus(to="pacs", state=sendjob.JobState.SENDING, pid=dead.pid, done=3, total=9, log="x.log")
    settled = sendjob.settled(s)
    assert settled.state is sendjob.JobState.FAILED and settled.ok is False
    assert settled.result == ("the send stopped after 3 of 9 object(s) without a result (killed, or the box "
                              "restarted); see x.log")
    # Our own process is alive, but it is no send job: a process ID taken again does not count.
    assert sendjob.settled(replace(s, pid=os.getpid())).finished
    never = sendjob.SendStatus(to="pacs", state=sendjob.JobState.STARTING, started_at="2026-01-01T00:00:00+00:00")
    assert sendjob.settled(never).result.startswith("the send did not start within 60 s")
    assert not sendjob.settled(replace(never, started_at=sendjob._now())).finished


def test_the_job_under_systemd_gets_a_unit_of_its_own(tmp_path: Path) -> None:
    cmd = sendjob.command(tmp_path, tmp_path / "s.json", "pacs", config_path=None, studies=["1.2"])
    assert cmd[1:] == ["-m", "appliance.jobs.sendjob", "--data-dir", str(tmp_path), "--status",
                       str(tmp_path / "s.json"), "--to", "pacs", "--study", "1.2"]
    assert sendjob.detached(cmd, tmp_path / "s.log", "send-x", systemd=False) == cmd
    assert sendjob.detached(cmd, tmp_path / "s.log", "send-x", systemd=True) == [
        "systemd-run", "--quiet", "--collect", "--unit=appliance-send-x",
        f"--property=StandardOutput=append:{tmp_path / 's.log'}",
        f"--property=StandardError=append:{tmp_path / 's.log'}", "--", *cmd]


def test_a_job_to_an_unknown_destination_fails_in_words(box: Box) -> None:
    path = sendjob.start(box.data, "nowhere", config_path=box.config, studies=[box.study])
    wait_for(lambda: (s := sendjob.read(path)) is not None and s.finished, 60, "the job to end")
    s = sendjob.read(path)
    assert s is not None and s.state is sendjob.JobState.FAILED and s.ok is False
    assert s.result == "no destination 'nowhere' in the configuration (known: none are configured)"
    last = results.last_results(box.data)["send"]
    assert (last.ok, last.device, last.summary) == (False, "nowhere", s.result)
    assert "FAILED: no destination 'nowhere'" in Path(s.log).read_text()
