"""The serial console, driven as a technician would: keystrokes in, screens out.

* Over a real pty, against a real ``appliance run``: an invalid AE title is refused with its
  reason; a new port, AE title and PDU take effect at once (DCMTK's echoscu answers on them);
  a destination is added and echoed against a real DCMTK storescp, a dead one fails in words,
  then it is removed. Every line fits 80 columns.
* In-process with text streams, with the file backend: validation messages, the USB queue
  over a real store, CD import results, the log file, reboot/shut down with confirmation
  (``systemctl`` replaced by a script that records its arguments: the hardware boundary).
* Network: the live state of ``lo`` read with pyroute2 equals what iproute2 reports; the
  systemd-networkd file is written under tmp; static and DHCP settings are applied live only
  inside a network namespace with a veth pair the test creates (skipped without ``ip netns``).
"""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import fcntl
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from appliance.ops import health

from appliance.adapters import network
from appliance.config import NetworkConfig, NetworkMode, StoreConfig, load
from appliance.ops.configservice import ConfigFile
from appliance.ops.console import Console
from appliance.ops.consolesettings import ConsoleSettings
from helpers import ct_series, dcmtk, free_port, run, wait_for, write_series
from test_supervisor import Appliance, Notifications, echoscu

APPLIANCE = [sys.executable, "-m", "appliance"]


# -- in-process -------------------------------------------------------------------------------------


class Setup:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.config = tmp / "appliance.toml"
        self.config.write_text("[scp]\nport = 11112\n")
        self.data = tmp / "data"
        self.data.mkdir()
        self.runtime = tmp / "run"  # no service runs there: the file backend

    def console(self, keys: str, **kw: object) -> tuple[str, int]:
        out = io.StringIO()
        settings = ConsoleSettings(ConfigFile(self.config), self.runtime / "config.sock")
        kw.setdefault("journal", None)
        kw.setdefault("live_network", False)
        c = Console(io.StringIO(keys), out, settings, data_dir=self.data,
                    networkd_dir=self.tmp / "networkd", **kw)  # type: ignore[arg-type]
        rc = c.run()
        return out.getvalue(), rc


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


def has(text: str, phrase: str) -> bool:
    """``phrase`` is on the screen, perhaps wrapped at 79 columns."""
    return " ".join(phrase.split()) in " ".join(text.split())


def keys(*lines: str) -> str:
    return "".join(line + "\n" for line in lines)


def test_storage_fields_are_validated_before_saving(setup: Setup) -> None:
    text, rc = setup.console(keys(
        "2",
        "1", "CT_SCANNER_ROOM_01",  # too long
        "1", "BAD\\AE",  # a backslash
        "2", "eleven",
        "2", "70000",
        "3", "100",  # below the minimum PDU
        "5", "maybe",
        "2", "4242",
        "1", "NEW_AE",
        "5", "y",
        "6", "CT1, MR_2",
        "0", "q"))
    assert rc == 0
    assert has(text, "Not saved: scp.ae_title 'CT_SCANNER_ROOM_01' is 18 characters; the limit is 16")
    assert has(text, "has characters outside plain ASCII or a backslash")
    assert has(text, "Not saved: 'eleven' is not a whole number; Port allows 1 to 65535")
    assert has(text, "Not saved: Port 70000 is out of range; allowed: 1 to 65535")
    assert has(text, "Max PDU 100 is out of range; allowed: 4096 to")
    assert has(text, "Not saved: 'maybe' is not yes or no; answer y or n")
    assert has(text, "it applies when the appliance starts (it is not running)")
    cfg = load(setup.config)
    assert (cfg.scp.port, cfg.scp.ae_title, cfg.scp.check_called_ae) == (4242, "NEW_AE", True)
    assert cfg.scp.allowed_calling_aes == ("CT1", "MR_2")
    # Each field shows its value and one help line.
    assert re.search(r"  2  Port +4242\n +TCP port senders connect to", text)


def test_end_of_input_and_unknown_choices(setup: Setup) -> None:
    text, rc = setup.console("x\n2\n9\n")  # then EOF inside a screen
    assert rc == 0
    assert has(text, "'x' is not on the menu; type a number from 1 to 9, a, d, e, f, s, t, u or q.")
    assert has(text, "'9' is not a field; type 1 to 6, or 0 to go back.")


def test_destinations_add_edit_remove_in_the_file(setup: Setup) -> None:
    text, _ = setup.console(keys(
        "3",
        "a", "bad name", "X", "h", "",  # the name is checked with the rest
        "a", "pacs", "PACS", "10.0.0.5", "", "n",
        "a", "ris", "1234", "10.0.0.6", "70000",
        "e", "1", "", "10.0.0.7", "4100",
        "0", "q"))
    assert has(text, "a destination name uses letters, digits, '-' and '_' only")
    assert has(text, "Port 70000 is out of range; allowed: 1 to 65535")
    cfg = load(setup.config)
    assert set(cfg.destinations) == {"pacs"}
    d = cfg.destinations["pacs"]
    assert (d.ae_title, d.host, d.port) == ("PACS", "10.0.0.7", 4100)

    setup.console(keys("3", "a", "ris", "1234", "10.0.0.6", "", "n", "0", "q"))
    assert load(setup.config).destinations["ris"].ae_title == "1234"  # a string, though it looks like a number
    text, _ = setup.console(keys("3", "r", "pacs", "y", "0", "q"))
    assert set(load(setup.config).destinations) == {"ris"}
    assert "[scp]\nport = 11112\n" in setup.config.read_text()  # the rest of the file stays as written


def test_usb_queue_policy_and_last_result(setup: Setup) -> None:
    from appliance.media.importer import run_import
    from appliance.store.ingest import Ingest
    from appliance.store.store import Store
    from appliance.store.queue import ExportQueue

    series = ct_series(3)
    write_series(series, setup.tmp / "series")
    store = Store(setup.data)
    run_import(setup.tmp / "series", Ingest(store, StoreConfig(min_free_mb=0)))
    store.close(clean=False)
    health.record_result(setup.data, health.JobResult("export", False, "the stick is full", "/dev/sdb1"))
    study = str(series[0].StudyInstanceUID)

    text, _ = setup.console(keys(
        "4",
        "a", "1.2.3.4",  # not stored
        "a", "1",
        "a", str(series[0].SeriesInstanceUID),
        "1", "sometimes",
        "1", "all",
        "0", "q"))
    assert has(text, "Last export: FAILED") and has(text, "/dev/sdb1: the stick is full")
    assert has(text, "Not queued: no stored study or series has UID 1.2.3.4")
    assert has(text, f"Queued study {study}.")
    assert has(text, "'sometimes' is not allowed; choose one of: since-last-export, all, queue-only")
    assert load(setup.config).usb.policy == "all"
    state = ExportQueue(setup.data)
    assert [(q.uid, q.level) for q in state.entries()] == [(study, "study"), (str(series[0].SeriesInstanceUID),
                                                                           "series")]
    state.close()

    text, _ = setup.console(keys("4", "r", "1", "0", "q"))
    assert has(text, f"Removed {study} from the queue.")
    state = ExportQueue(setup.data)
    assert [q.level for q in state.entries()] == ["series"]
    state.close()


def test_cd_import_results_and_eject(setup: Setup) -> None:
    health.record_result(setup.data, health.JobResult("import", True, "12 stored, 0 refused", "/dev/sr0"))
    (setup.data / "imports").mkdir()
    (setup.data / "imports" / "20261128T101500Z-DISC_1.txt").write_text("import of DISC_1\n12 stored\n")
    text, _ = setup.console(keys("5", "r1", "", "1", "perhaps", "1", "n", "0", "q"))
    assert has(text, "Last import: OK") and has(text, "/dev/sr0: 12 stored, 0 refused")
    assert has(text, "r1 20261128T101500Z-DISC_1.txt") and has(text, "import of DISC_1")
    assert has(text, "Not saved: 'perhaps' is not yes or no")
    assert load(setup.config).media.eject_after_import is False


def test_status_without_a_running_appliance(setup: Setup) -> None:
    text, _ = setup.console(keys("1", "", "q"))
    assert has(text, "health:   DEGRADED") and has(text, "not running") and has(text, "0 studies")


def test_log_file_tail(setup: Setup) -> None:
    log = setup.tmp / "appliance.log"
    log.write_text("".join(f"<6>appliance.net.scp: line {i}\n" for i in range(40)))
    text, _ = setup.console(keys("7", "", "q"), log_file=log)
    assert has(text, f"== Log ({log})")
    assert has(text, "line 39") and has(text, "line 22") and "line 21\n" not in text


def test_reboot_and_shut_down_need_yes(setup: Setup) -> None:
    record = setup.tmp / "systemctl.args"
    fake = setup.tmp / "systemctl"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {record}\n")
    fake.chmod(0o755)
    text, _ = setup.console(keys("8", "y", "9", "", "8", "yes", "9", "YES", "q"), systemctl=[str(fake)])
    assert text.count("Not done:") == 2
    assert has(text, "Reboot: the box is going down.")
    assert record.read_text() == "reboot\npoweroff\n"

    fake.write_text("#!/bin/sh\necho 'Failed to connect to bus' >&2\nexit 1\n")
    text, _ = setup.console(keys("8", "yes", "q"), systemctl=[str(fake)])
    assert has(text, "Reboot failed:") and has(text, "Failed to connect to bus")


def test_first_start_offers_the_service_password(setup: Setup) -> None:
    shadow = setup.tmp / "shadow"
    shadow.write_text("root:*:19000:0:99999:7:::\ndaemon:*:19000::::::\n")
    record = setup.tmp / "passwd.args"
    fake = setup.tmp / "passwd"
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {record}\n")  # the terminal's side is not ours to test
    fake.chmod(0o755)
    text, _ = setup.console(keys("n", "q"), shadow=shadow, passwd=[str(fake)])
    assert has(text, "none is set yet") and has(text, "Not set;") and not record.exists()
    text, _ = setup.console(keys("", "q"), shadow=shadow, passwd=[str(fake), "root"])
    assert has(text, "Service password set.") and record.read_text() == "root\n"
    shadow.write_text("root:$y$j9T$salt$hash:19000:0:99999:7:::\n")
    text, _ = setup.console(keys("q"), shadow=shadow, passwd=[str(fake)])
    assert not has(text, "First start")


def test_network_validation_and_file(setup: Setup) -> None:
    text, _ = setup.console(keys(
        "6",
        "2", "eth0", "10.1.2.300/24", "", "",  # not an address
        "2", "eth0", "10.1.2.3/24", "10.1.3.1", "",  # a gateway off the subnet
        "2", "eth0", "10.1.2.0", "24", "", "",  # the network address
        "2", "eth0", "10.1.2.3", "255.255.255.0", "10.1.2.1", "10.1.2.1, 9.9.9.9", "y",
        "0", "q"))
    assert has(text, "network.address '10.1.2.300' is not an IP address; use e.g. 192.168.1.50")
    assert has(text, "network.gateway 10.1.3.1 is not a host of 10.1.2.0/24; the gateway must be on the appliance's")
    assert has(text, "network.address 10.1.2.0 is the network address of 10.1.2.0/24")
    n = load(setup.config).network
    assert (n.mode, n.interface, n.address, n.prefix, n.gateway, n.dns) == (
        NetworkMode.STATIC, "eth0", "10.1.2.3", 24, "10.1.2.1", ("10.1.2.1", "9.9.9.9"))
    written = (setup.tmp / "networkd" / network.NETWORK_FILE).read_text()
    assert "[Match]\nName=eth0\n" in written
    assert "Address=10.1.2.3/24\nGateway=10.1.2.1\nDNS=10.1.2.1\nDNS=9.9.9.9\n" in written
    assert has(text, "Not applied now (--no-live-network)")

    setup.console(keys("6", "1", "", "y", "0", "q"))  # DHCP on the same interface
    assert load(setup.config).network.mode == NetworkMode.DHCP
    written = (setup.tmp / "networkd" / network.NETWORK_FILE).read_text()
    assert "DHCP=yes" in written and "Address=" not in written


# -- network: the real live state --------------------------------------------------------------------


def test_lo_as_pyroute2_reads_it_equals_iproute2() -> None:
    ip = json.loads(run(["ip", "-j", "addr", "show", "lo"]).stdout)[0]
    lo = network.state().interface("lo")
    assert lo is not None and lo.loopback
    assert lo.mac == ip["address"]
    assert lo.admin_up == ("UP" in ip["flags"])
    assert {str(a) for a in lo.addresses} == {f"{a['local']}/{a['prefixlen']}" for a in ip["addr_info"]}
    assert "lo" in "\n".join(network.render_state(network.state()))


def _ip_netns_works() -> str | None:
    if os.geteuid() != 0:
        return "creating a network namespace needs root"
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed"
    name = f"appl-probe-{uuid.uuid4().hex[:6]}"
    r = run(["ip", "netns", "add", name])
    if r.returncode != 0:
        return f"'ip netns add' does not work here: {r.stderr.strip()}"
    run(["ip", "netns", "del", name])
    return None


@pytest.fixture
def netns() -> Iterator[str]:
    reason = _ip_netns_works()
    if reason:
        pytest.skip(f"live network settings are only applied inside a test namespace: {reason}")
    name = f"appl-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "add", "v0", "type", "veth", "peer", "name", "v1"], check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "v1", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _ns_console(ns: str, setup: Setup, script: str) -> str:
    cmd = ["ip", "netns", "exec", ns, *APPLIANCE, "--config", str(setup.config), "--data-dir", str(setup.data),
           "console", "--runtime-dir", str(setup.runtime), "--networkd-dir", str(setup.tmp / "networkd"),
           "--no-journal"]
    r = subprocess.run(cmd, input=script, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_static_then_dhcp_live_in_a_namespace(setup: Setup, netns: str) -> None:
    out = _ns_console(netns, setup, keys(
        "6", "2", "v0", "10.77.0.5/24", "10.77.0.1", "10.77.0.1", "y", "0", "q"))
    assert "Applied now: 10.77.0.5/24 set on v0, default route via 10.77.0.1" in out, out
    # Read back, with pyroute2 and with iproute2.
    st = network.state(netns)
    assert "10.77.0.5/24" in set(network.addresses_of(st, "v0"))
    assert [(r.gateway, r.interface) for r in st.routes if r.destination == "default"] == [("10.77.0.1", "v0")]
    ip = json.loads(run(["ip", "-n", netns, "-j", "route", "show", "default"]).stdout)
    assert [(r["gateway"], r["dev"]) for r in ip] == [("10.77.0.1", "v0")]
    assert "Address=10.77.0.5/24" in (setup.tmp / "networkd" / network.NETWORK_FILE).read_text()

    # Another address on the same subnet of v1: refused before anything is saved.
    subprocess.run(["ip", "-n", netns, "addr", "add", "10.77.0.9/24", "dev", "v1"], check=True)
    out = _ns_console(netns, setup, keys("6", "2", "v0", "10.77.0.9/24", "-", "-", "0", "q"))
    assert "Not saved: address 10.77.0.9 is already used by interface v1 of this box" in out, out
    assert load(setup.config).network.address == "10.77.0.5"

    # Back to DHCP: the static address and route go; the file says DHCP.
    out = _ns_console(netns, setup, keys("6", "1", "", "y", "0", "q"))
    assert "static address 10.77.0.5/24 removed" in out, out
    st = network.state(netns)
    assert not [a for a in network.addresses_of(st, "v0") if not a.startswith("fe80:")]  # link-local stays
    assert not [r for r in st.routes if r.destination == "default"]
    assert "DHCP=yes" in (setup.tmp / "networkd" / network.NETWORK_FILE).read_text()
    assert load(setup.config).network == NetworkConfig(interface="v0", mode=NetworkMode.DHCP, address="10.77.0.5",
                                                       prefix=24, gateway="10.77.0.1", dns=("10.77.0.1",))


def test_network_apply_command_in_a_namespace(setup: Setup, netns: str) -> None:
    setup.config.write_text('[network]\ninterface = "v0"\nmode = "static"\naddress = "fd42::5"\nprefix = 64\n')
    r = run(["ip", "netns", "exec", netns, *APPLIANCE, "--config", str(setup.config), "network",
             "--networkd-dir", str(setup.tmp / "nd"), "apply"])
    assert r.returncode == 0, r.stderr
    assert "fd42::5/64 set on v0, no default route" in r.stdout
    assert "fd42::5/64" in set(network.addresses_of(network.state(netns), "v0"))
    r = run(["ip", "netns", "exec", netns, *APPLIANCE, "network", "show"])
    assert "fd42::5/64" in r.stdout and "v0" in r.stdout


# -- over a pty, against a running appliance ---------------------------------------------------------


def w(text: str) -> str:
    """A regex for ``text`` as the console shows it: maybe wrapped at 79 columns."""
    return r"\s+".join(re.escape(word) for word in text.split())


class Terminal:
    """The technician's end of the serial line: a pty, 80x24, keystrokes ending in CR."""

    def __init__(self, cmd: list[str]) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        self.proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
        os.close(slave)
        self.fd = master
        self.text = ""
        self.pos = 0

    def expect(self, pattern: str, timeout: float = 60) -> str:
        """Wait until ``pattern`` (a regex) appears after the last match; return the text up to it."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.compile(pattern).search(self.text, self.pos)
            if m:
                seen = self.text[self.pos:m.end()]
                self.pos = m.end()
                return seen
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {pattern!r} within {timeout} s; the screen shows:\n{self.text[self.pos:]}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # EIO: the console exited
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"the console ended before {pattern!r}:\n{self.text[self.pos:]}")
                self.text += chunk.decode("utf-8", errors="replace")

    def type(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\r")

    def answer(self, dialog: tuple[tuple[str, str], ...]) -> None:
        """For each (prompt, line): wait for the prompt, then type the line (no type-ahead)."""
        for prompt, line in dialog:
            self.expect(prompt)
            self.type(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        os.close(self.fd)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Appliance]:
    app = Appliance(tmp_path, free_port(), Notifications(tmp_path / "notify.sock"))
    yield app
    app.stop()


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    out = tmp_path / "received"
    out.mkdir()
    proc = subprocess.Popen([dcmtk("storescp"), "-aet", "PACS_TEST", "-od", str(out), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: echoscu(port, "PACS_TEST"), 20, "storescp to answer")
    yield port
    proc.terminate()
    proc.wait(10)


def test_pty_console_changes_the_running_scp(running: Appliance, storescp: int, tmp_path: Path) -> None:
    wait_for(lambda: running.notify.seen("READY", "1"), 60, "READY=1")
    t = Terminal([*APPLIANCE, "--config", str(running.config), "--data-dir", str(running.data), "console",
                  "--runtime-dir", str(running.runtime), "--networkd-dir", str(tmp_path / "nd"), "--no-journal"])
    try:
        t.expect("Changes apply at once.")
        t.expect("Choice: ")
        t.type("2")
        t.expect("Field to change: ")
        t.type("1")
        t.expect(r"New AE title \(Enter keeps ELEKTA_STORAGE\): ")
        t.type("CT_SCANNER_ROOM_01")
        t.expect(w("Not saved: scp.ae_title 'CT_SCANNER_ROOM_01' is 18 characters; the limit is 16"))

        new_port = free_port()
        for field, value, applied in (("2", str(new_port), f"scp.port = {new_port} applied"),
                                      ("1", "NEW_AE", "scp.ae_title = NEW_AE applied"),
                                      ("3", "65536", "scp.max_pdu = 65536 applied")):
            t.expect("Field to change: ")
            t.type(field)
            t.expect("New .*: ")
            t.type(value)
            t.expect(w(applied))
        t.expect(rf"Port +{new_port}\r\n")
        assert echoscu(new_port, "NEW_AE")  # at once, no restart of anything by hand
        t.expect("Field to change: ")
        t.type("0")

        # A destination: added, echoed against DCMTK's storescp; a dead one fails in words.
        t.expect("Choice: ")
        t.type("3")
        dialog = (("Choice: ", "a"), ("Name: ", "pacs"), ("AE title: ", "PACS_TEST"), ("Host: ", "127.0.0.1"),
                  (r"Port \(Enter for 104\): ", str(storescp)), (r"Echo pacs now\? \[y/N\]: ", "y"))
        t.answer(dialog)
        t.expect(w("Echo OK: pacs answered. C-ECHO to PACS_TEST@127.0.0.1:") + r"\d+\s+\(as\s+ELEKTA_CLIENT\)\s+succeeded")
        t.answer((("Choice: ", "a"), ("Name: ", "gone"), ("AE title: ", "NOBODY"), ("Host: ", "127.0.0.1"),
                  (r"Port \(Enter for 104\): ", str(free_port())), (r"Echo gone now\? \[y/N\]: ", "n"),
                  ("Choice: ", "t"), (r"Destination \(number or name\): ", "gone")))
        t.expect(w("Echo FAILED: connection refused by 127.0.0.1:"))
        t.answer((("Choice: ", "r"), (r"Destination \(number or name\): ", "gone"),
                  (r"Remove destination gone\? \[y/N\]: ", "y")))
        t.expect(w("Saved: destinations.gone applied"))
        t.expect("Choice: ")
        t.type("0")
        t.expect("Choice: ")
        t.type("q")
        assert t.proc.wait(20) == 0
    finally:
        t.close()
    cfg = load(running.config)
    assert (cfg.scp.port, cfg.scp.ae_title, cfg.scp.max_pdu) == (new_port, "NEW_AE", 65536)
    assert set(cfg.destinations) == {"pacs"}
    assert [line for line in t.text.split("\r\n") if len(line) > 80] == []
