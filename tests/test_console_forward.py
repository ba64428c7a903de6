"""The console's Forwarding page over a real pty, as a technician drives it.

* Without a running appliance (the file backend): a rule (calling AE CT_SIM, modality CT, to
  a configured destination) is added, listed in words and written to the config file as a
  ``[[forward]]`` table; rules the configuration refuses (an unknown destination, a bad
  origin, an empty ``to``) are refused with its message and the file is left as it was; a
  field is edited; a rule is deleted after a yes; a destination's waiting objects (queued by
  a Store with the rules, as a CD import queues them) are shown.
* Against a real ``appliance run``: the rule saved on the console restarts the Storage SCP,
  which queues what DCMTK's storescu sends from CT_SIM (and not from another AE); the queue of
  a destination whose port is closed shows what waits, the last error and the next try; a
  DCMTK storescp that takes only MR makes the forwarder set the CT objects aside, shown with
  the reason; once it takes CT, a retry on the console sends them. The last send started
  from the console shows in the supervisor's ``STATUS=``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from appliance.config import ForwardRule, StoreConfig, load
from appliance.jobs import sendjob
from appliance.media.importer import run_import
from appliance.store.index import ForwardState
from appliance.store.ingest import Ingest
from appliance.store.store import Store
from helpers import ct_series, dcmtk, free_port, run, wait_for, write_series
from test_console import APPLIANCE, Terminal, w
from test_console_delete import quit_console
from test_forward import PEER_AE, Peer, _mr_only
from test_supervisor import Notifications

#: The prompts of the rule dialog, in order, with the answers of a rule "from CT_SIM, CT, to PLANNING".
RULE_PROMPTS = (r"Calling AE titles \(Enter: any\): ", r"Modalities \(Enter: any\): ", r"SOP classes \(Enter: any\): ",
                r"Origins \(Enter: any\): ", r"Send to \(\w+(, \w+)*\): ", r"Stable after \(s\) \(Enter for 0\): ",
                r"Cap the backlog per destination\? \[y/N\]: ")


def add_rule(t: Terminal, calling: str = "", modality: str = "", origin: str = "", to: str = "") -> None:
    t.answer((("Choice: ", "a"), *zip(RULE_PROMPTS, (calling, modality, "", origin, to, "", "n"))))


def forward_tables(path: Path) -> list[dict[str, object]]:
    tables: list[dict[str, object]] = tomllib.loads(path.read_text()).get("forward", [])
    return tables


class FileBox:
    """A config file with two destinations (nothing listens at either) and a data folder; no appliance runs."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.config = tmp / "appliance.toml"
        self.config.write_text("[scp]\nport = 11112\n\n"
                               f'[destinations.PLANNING]\nae_title = "RX"\nhost = "127.0.0.1"\nport = {free_port()}\n\n'
                               f'[destinations.PACS]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {free_port()}\n')
        self.data = tmp / "data"

    def console(self) -> Terminal:
        t = Terminal([*APPLIANCE, "--config", str(self.config), "--data-dir", str(self.data), "console",
                      "--runtime-dir", str(self.tmp / "run"), "--no-journal"])
        t.answer((("Choice: ", "f"),))
        return t


def test_rules_added_refused_edited_deleted_in_the_file(tmp_path: Path) -> None:
    box = FileBox(tmp_path)
    # Three CT objects from a CD, queued for PLANNING as the CD import queues them.
    store = Store(box.data)
    try:
        store.set_forwarding((ForwardRule(origin=("cd",), to=("PLANNING",)),))
        write_series(ct_series(3, patient="Doe^Jane"), tmp_path / "cd")
        run_import(tmp_path / "cd", Ingest(store, StoreConfig(min_free_mb=0)))
    finally:
        store.close(clean=False)

    t = box.console()
    try:
        t.expect("No rule: nothing is forwarded.")
        # The queue: what waits, nothing sent (no appliance runs to send it).
        t.expect(r"1  PLANNING: 3 waiting \([\d.]+ MB, oldest \d+ s\); 0 sent")

        add_rule(t, calling="CT_SIM", modality="ct", to="PLANNING")
        t.expect(r"Saved: written to [^;]*appliance\.toml; " + w("the rules apply when the appliance starts (it is not running)"))
        t.expect(w("Rule 1: from CT_SIM; modality CT -> PLANNING; each object as it arrives"))
        t.expect(r"Rules:\r\n  1  from CT_SIM; modality CT -> PLANNING; each object as it arrives\r\n")
        assert forward_tables(box.config) == [{"calling_ae": ["CT_SIM"], "modality": ["CT"], "to": ["PLANNING"]}]
        assert load(box.config).forward == (ForwardRule(calling_ae=("CT_SIM",), modality=("CT",), to=("PLANNING",)),)

        # Refused with the configuration's own words; the file is left as it was.
        before = box.config.read_bytes()
        add_rule(t, to="NOPE")
        t.expect(w("Not saved: forward rule 2: destination 'NOPE' is not configured ([destinations.NOPE]); "
                   "known: PACS, PLANNING"))
        add_rule(t, origin="network, usb", to="PACS")
        t.expect(w("Not saved: forward rule 2: origin 'usb' is not one of network, cd"))
        add_rule(t)
        t.expect(w("Not saved: forward rule 2: 'to' is empty; name one or more destinations"))
        t.answer((("Choice: ", "a"), (RULE_PROMPTS[0], ""), (RULE_PROMPTS[1], "US")))
        t.expect(w("Not saved: the box stores no US: a rule for it would never match"))
        assert box.config.read_bytes() == before

        # A field edited: a series at a time, once nothing came for 30 s.
        t.answer((("Choice: ", "e"), (r"Rule \(number\): ", "1"), ("Field to change: ", "6"),
                  (r"New Stable after \(s\) \(Enter keeps 0\): ", "30")))
        t.expect(w("Rule 1: from CT_SIM; modality CT -> PLANNING; a series once nothing came for 30 s"))
        t.answer((("Field to change: ", "0"),))
        assert load(box.config).forward[0].stable_after == 30

        # A second rule; then the first deleted, only after a yes.
        add_rule(t, origin="cd", to="PACS, PLANNING")
        t.expect(w("Rule 2: origin cd -> PACS, PLANNING; each object as it arrives"))
        t.answer((("Choice: ", "r"), (r"Rule \(number\): ", "1"), (r"Delete rule 1\? \[y/N\]: ", "n")))
        t.expect("Not deleted.")
        assert len(load(box.config).forward) == 2
        t.answer((("Choice: ", "r"), (r"Rule \(number\): ", "1"), (r"Delete rule 1\? \[y/N\]: ", "yes")))
        t.expect(r"Rules:\r\n  1  origin cd -> PACS, PLANNING; each object as it arrives\r\n")
        assert load(box.config).forward == (ForwardRule(origin=("cd",), to=("PACS", "PLANNING")),)

        # A destination's queue: nothing set aside, no retry offered.
        t.answer((("Choice: ", "v"), (r"Destination \(number or name\): ", "PLANNING")))
        seen = t.expect("Choice: ")
        assert "PLANNING: 3 waiting" in seen and "Set aside" not in seen and "Retry now" not in seen
        t.type("0")
        quit_console(t, 1)
    finally:
        t.close()
    # The last rule deleted leaves no [[forward]] at all.
    t = box.console()
    try:
        t.answer((("Choice: ", "r"), (r"Rule \(number\): ", "1"), (r"Delete rule 1\? \[y/N\]: ", "y")))
        t.expect("No rule: nothing is forwarded.")
        quit_console(t, 1)
    finally:
        t.close()
    assert "forward" not in tomllib.loads(box.config.read_text()) and load(box.config).forward == ()


# -- against appliance run -------------------------------------------------------------------------


class RunningBox:
    """``appliance run`` on a config naming two destinations: PLANNING (DCMTK storescp at
    ``planning_port``) and DOWN (a port nothing listens on)."""

    def __init__(self, tmp: Path, planning_port: int) -> None:
        self.port = free_port()
        self.config = tmp / "appliance.toml"
        self.config.write_text(f'[scp]\nport = {self.port}\nbind = "127.0.0.1"\n\n'
                               f'[destinations.PLANNING]\nae_title = "{PEER_AE}"\nhost = "127.0.0.1"\n'
                               f'port = {planning_port}\n\n'
                               f'[destinations.DOWN]\nae_title = "DOWN"\nhost = "127.0.0.1"\nport = {free_port()}\n')
        self.data = tmp / "data"
        self.runtime = tmp / "run"
        self.notify = Notifications(tmp / "notify.sock")
        env = dict(os.environ, NOTIFY_SOCKET=str(self.notify.path), WATCHDOG_USEC="2000000")
        env.pop("WATCHDOG_PID", None)
        self.log = tmp / "appliance.log"
        self.proc = subprocess.Popen(
            [*APPLIANCE, "--config", str(self.config), "--data-dir", str(self.data), "-v", "run",
             "--runtime-dir", str(self.runtime), "--no-media"],
            env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        wait_for(lambda: self.notify.seen("READY", "1"), 60, "READY=1")

    def status(self) -> dict[str, object]:
        r = run([*APPLIANCE, "--config", str(self.config), "--data-dir", str(self.data), "status",
                 "--runtime-dir", str(self.runtime), "--json"])
        d: dict[str, object] = json.loads(r.stdout)
        return d

    def scp_pid(self) -> int:
        children = self.status()["children"]
        assert isinstance(children, dict)
        return int(children["scp"])

    def queue(self) -> dict[str, ForwardState]:
        """The forwarding queue's state per destination, as the index has it now."""
        store = Store(self.data)
        try:
            return {s.destination: s for s in store.index.forward_states()}
        finally:
            store.close(clean=False)

    def send(self, files: list[Path], aet: str) -> None:
        r = run([dcmtk("storescu"), "-aet", aet, "-aec", "ELEKTA_STORAGE", "127.0.0.1", str(self.port),
                 *map(str, files)], timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr

    def console(self) -> Terminal:
        return Terminal([*APPLIANCE, "--config", str(self.config), "--data-dir", str(self.data), "console",
                         "--runtime-dir", str(self.runtime), "--no-journal"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        print(self.log.read_text())


@pytest.fixture
def planning(tmp_path: Path) -> Iterator[Peer]:
    """DCMTK storescp as PLANNING that takes only MR (and Verification): CT is refused at negotiation."""
    p = Peer(free_port(), tmp_path / "planning", tmp_path / "planning.log")
    p.out.mkdir()
    with open(p.log, "ab") as f:
        p.proc = subprocess.Popen([dcmtk("storescp"), "-aet", PEER_AE, "-od", str(p.out), "-xf",
                                   str(_mr_only(tmp_path)), "StorageSCP", str(p.port)], stdout=f,
                                  stderr=subprocess.STDOUT)
    wait_for(lambda: run([dcmtk("echoscu"), "-aec", PEER_AE, "127.0.0.1", str(p.port)]).returncode == 0,
             20, "storescp to answer")
    yield p
    p.kill()


@pytest.fixture
def box(tmp_path: Path, planning: Peer) -> Iterator[RunningBox]:
    b = RunningBox(tmp_path, planning.port)
    yield b
    for s in sendjob.running(b.data):
        if s.pid is not None:
            os.kill(s.pid, signal.SIGTERM)
    b.stop()


def test_a_rule_saved_on_the_console_forwards_from_the_running_scp(box: RunningBox, planning: Peer,
                                                                    tmp_path: Path) -> None:
    ct = write_series(ct_series(3, patient="Doe^Jane"), tmp_path / "ct")
    scp_before = box.scp_pid()
    t = box.console()
    try:
        t.expect("Changes apply at once.")
        t.answer((("Choice: ", "f"),))
        t.expect("No rule: nothing is forwarded.")
        add_rule(t, calling="CT_SIM", modality="CT", to="PLANNING, DOWN")
        t.expect(w("Saving: the Storage SCP restarts on the new rules..."))
        t.expect(w("Saved: applied: the Storage SCP queues what arrives by them from now on"))
        t.expect(w("1 from CT_SIM; modality CT -> PLANNING, DOWN; each object as it arrives"))
        assert load(box.config).forward == (ForwardRule(calling_ae=("CT_SIM",), modality=("CT",),
                                                        to=("PLANNING", "DOWN")),)
        assert box.scp_pid() != scp_before, "the Storage SCP was restarted on the rules"

        # The new SCP queues what CT_SIM sends, and not what another AE sends.
        box.send(ct, "CT_SIM")
        box.send(write_series(ct_series(2), tmp_path / "other"), "MR_ROOM")
        def settled() -> bool:
            st = box.queue()
            return {"PLANNING", "DOWN"} <= set(st) and st["PLANNING"].set_aside == 3 and st["DOWN"].failures > 0
        wait_for(settled, 30, "CT objects set aside for PLANNING and DOWN failing")

        # The page again: DOWN's backlog with its error and next try; PLANNING's set aside.
        t.answer((("Choice: ", "x"),))
        seen = t.expect("Choice: ")
        assert re.search(w("DOWN: 3 waiting (") + r"[\d.]+\s+MB,\s+oldest\s+\d+\s+s\);\s+0\s+sent;\s+last\s+error\s+"
                         r"[\d-]+\s+[\d:]+\s+UTC:\s+" + w("connection refused by 127.0.0.1:") + r"\d+:[^()]*\([^()]*\)\s+"
                         r"\(next\s+try\s+in\s+\d+\s+s\)", seen), seen
        assert re.search(w("PLANNING: 0 waiting, 3 set aside; 0 sent; last error"), seen), seen
        assert "queue ls" not in seen  # the console's user has no shell: the objects are on this page

        t.type("v")
        t.answer(((r"Destination \(number or name\): ", "PLANNING"),))
        seen = t.expect("Choice: ")
        assert re.search(w(f"Destination PLANNING: AE title {PEER_AE} at 127.0.0.1:{planning.port}"), seen)
        assert re.search(w("Set aside (3), refused for good; they no longer hold the queue up:") + r"\s+"
                         + w("3 objects: PLANNING accepts no CT Image Storage in this object's transfer syntax"), seen)
        assert "Retry now" in seen

        # PLANNING now takes CT: the retry sends what was set aside, at once.
        planning.kill()
        planning.start()
        t.type("r")
        t.expect(w("3 object(s) set aside are queued again for PLANNING; the appliance tries it at once."))
        wanted = {str(dcmread(f).SOPInstanceUID) for f in ct}
        wait_for(lambda: planning.uids() == wanted, 30, "the set-aside objects at PLANNING")
        wait_for(lambda: box.queue()["PLANNING"].sent == 3, 30, "PLANNING's acknowledgements")
        t.answer((("Choice: ", "x"),))
        seen = t.expect("Choice: ")
        assert re.search(w("PLANNING: 0 waiting; 3 sent; last sent"), seen), seen
        assert "Set aside" not in seen
        t.type("0")
        quit_console(t, 1)
    finally:
        t.close()

    # A send started from the console (to DOWN: it fails) shows in STATUS= and appliance status.
    study = str(dcmread(ct[0]).StudyInstanceUID)
    sendjob.start(box.data, "DOWN", config_path=box.config, studies=[study])
    wait_for(lambda: any("last send FAILED" in s for s in box.notify.statuses()), 60, "STATUS= with the last send")
    status = box.status()
    last = status["last_send"]
    assert isinstance(last, dict) and not last["ok"] and "DOWN" in last["device"]


def test_the_forward_list_is_set_whole_by_config_set(tmp_path: Path) -> None:
    """What the console does, from the command line: the config service's ``forward`` key takes
    the whole list (JSON or TOML), is validated with the rest of the file, and [] removes it."""
    box = FileBox(tmp_path)
    cmd = [*APPLIANCE, "--config", str(box.config), "config", "--runtime-dir", str(tmp_path / "run"), "set", "forward"]
    before = box.config.read_bytes()
    r = run([*cmd, '[{to = ["NOPE"]}]'])
    assert r.returncode == 1 and "forward rule 1: destination 'NOPE' is not configured" in r.stderr, r.stderr
    r = run([*cmd, "PLANNING"])
    assert r.returncode == 1 and "forward takes the whole list of [[forward]] tables" in r.stderr, r.stderr
    assert box.config.read_bytes() == before
    assert run([*cmd, '[{modality = ["CT"], to = ["PLANNING"]}]']).returncode == 0
    assert load(box.config).forward == (ForwardRule(modality=("CT",), to=("PLANNING",)),)
    assert run([*cmd, "[]"]).returncode == 0
    assert "forward" not in tomllib.loads(box.config.read_text())
