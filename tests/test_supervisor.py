"""``appliance run`` as a real subprocess, with a real Unix datagram socket as NOTIFY_SOCKET.

It must: send READY=1 once the SCP answers, answer DCMTK's echoscu, move to a new port on
``appliance config set scp.port`` (and stop answering on the old one), let an association in
flight finish under the old settings while new ones get the new ones, bring a kill -9'd SCP
back, feed the watchdog, and stop on SIGTERM with exit code 0 and no child left behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from helpers import dcmtk, free_port, run, wait_for


class Notifications:
    """The receiving end of NOTIFY_SOCKET: a real datagram socket, as systemd has."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[dict[str, str]] = []
        self._lock = threading.Lock()
        # Read all the time, as systemd does: the queue of a datagram socket holds only 10.
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            with self._lock:
                self.messages.append(dict(line.split("=", 1) for line in data.decode("utf-8").splitlines()))

    def drain(self) -> list[dict[str, str]]:
        with self._lock:
            return list(self.messages)

    def seen(self, key: str, value: str | None = None) -> dict[str, str] | None:
        for m in self.drain():
            if key in m and (value is None or m[key] == value):
                return m
        return None

    def statuses(self) -> list[str]:
        return [m["STATUS"] for m in self.drain() if "STATUS" in m]


class Appliance:
    def __init__(self, tmp: Path, port: int, notify: Notifications) -> None:
        self.config = tmp / "appliance.toml"
        self.config.write_text(f'[scp]\nport = {port}\nbind = "127.0.0.1"\n')
        self.data = tmp / "data"
        self.runtime = tmp / "run"
        self.notify = notify
        env = dict(os.environ, NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="2000000")
        env.pop("WATCHDOG_PID", None)
        self.log = tmp / "appliance.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "appliance", "--config", str(self.config), "--data-dir", str(self.data), "-v",
             "run", "--runtime-dir", str(self.runtime), "--no-media"],
            env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
        )

    def stop(self) -> None:
        """SIGTERM it if it still runs (SIGKILL after 40 s), then print its log, which
        pytest shows when the test failed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        print(self.log.read_text())

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "appliance", "--config", str(self.config), "--data-dir", str(self.data)]
        return run([*cmd, args[0], "--runtime-dir", str(self.runtime), *args[1:]])

    def status(self) -> dict:  # type: ignore[type-arg]
        r = self.cli("status", "--json")
        return json.loads(r.stdout)

    def scp_pid(self) -> int:
        return int(self.status()["children"]["scp"])


def echoscu(port: int, aec: str = "ELEKTA_STORAGE") -> bool:
    return run([dcmtk("echoscu"), "-to", "5", "-aec", aec, "127.0.0.1", str(port)]).returncode == 0


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it is gone for our purposes
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@pytest.fixture
def appliance(tmp_path: Path) -> Iterator[Appliance]:
    notify = Notifications(tmp_path / "notify.sock")
    app = Appliance(tmp_path, free_port(), notify)
    yield app
    app.stop()


def test_ready_echo_port_change_restart_and_sigterm(appliance: Appliance) -> None:
    n = appliance.notify
    port = int(appliance.config.read_text().split("port = ")[1].split()[0])
    ready = wait_for(lambda: n.seen("READY", "1"), 60, "READY=1")
    assert "listening ELEKTA_STORAGE:%d" % port in ready["STATUS"]  # type: ignore[index]
    assert ready["MAINPID"] == str(appliance.proc.pid)  # type: ignore[index]
    assert echoscu(port)

    # The watchdog is fed while the self-check passes.
    wait_for(lambda: n.seen("WATCHDOG", "1"), 10, "WATCHDOG=1")

    # A port change takes effect at once, verified with a C-ECHO on the new port.
    new_port = free_port()
    r = appliance.cli("config", "set", "scp.port", str(new_port))
    assert r.returncode == 0, r.stderr
    assert echoscu(new_port)
    wait_for(lambda: not echoscu(port), 20, "the old port to stop answering")
    assert f"port = {new_port}" in appliance.config.read_text()
    assert appliance.cli("config", "get", "scp.port").stdout.strip() == str(new_port)
    wait_for(lambda: any(f":{new_port}" in s for s in n.statuses()), 15, "STATUS with the new port")

    # kill -9 the SCP child: it comes back (same port), the supervisor keeps running.
    pid = appliance.scp_pid()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: appliance.scp_pid() != pid, 30, "a new SCP child")
    assert echoscu(new_port)
    assert appliance.proc.poll() is None
    new_pid = appliance.scp_pid()

    # SIGTERM: ordered stop, exit 0, no child left.
    appliance.proc.send_signal(signal.SIGTERM)
    assert appliance.proc.wait(timeout=40) == 0
    assert n.seen("STOPPING", "1")
    wait_for(lambda: not alive(new_pid), 10, "the SCP child to be gone")
    assert not (appliance.runtime / "config.sock").exists()


def test_the_scp_ends_when_the_supervisor_is_killed(appliance: Appliance) -> None:
    """kill -9 of 'appliance run' (no chance to stop its child): the SCP it started gets
    SIGTERM from the kernel and stops, instead of serving on as an orphan nobody manages."""
    port = int(appliance.config.read_text().split("port = ")[1].split()[0])
    wait_for(lambda: appliance.notify.seen("READY", "1"), 60, "READY=1")
    pid = appliance.scp_pid()
    appliance.proc.send_signal(signal.SIGKILL)
    appliance.proc.wait(10)
    wait_for(lambda: not alive(pid), 20, "the orphaned SCP to stop")
    assert not echoscu(port)
    assert "Storage SCP stopped" in appliance.log.read_text()


def test_in_flight_association_keeps_old_settings_new_ones_get_new(appliance: Appliance) -> None:
    port = int(appliance.config.read_text().split("port = ")[1].split()[0])
    wait_for(lambda: appliance.notify.seen("READY", "1"), 60, "READY=1")
    ae = AE(ae_title="TESTER")
    ae.add_requested_context(Verification)
    before = ae.associate("127.0.0.1", port, ae_title="ELEKTA_STORAGE")
    assert before.is_established
    assert before.acceptor.maximum_length == 262144

    # Same port, new PDU size: a new SCP joins the port, the old one stops accepting.
    r = appliance.cli("config", "set", "scp.max_pdu", "65536")
    assert r.returncode == 0, r.stderr
    after = ae.associate("127.0.0.1", port, ae_title="ELEKTA_STORAGE")
    assert after.is_established
    assert after.acceptor.maximum_length == 65536
    assert after.send_c_echo().Status == 0
    after.release()

    # The association opened before the change still works, under the old settings.
    assert before.send_c_echo().Status == 0
    assert before.acceptor.maximum_length == 262144
    before.release()


def test_invalid_set_is_refused_and_nothing_changes(appliance: Appliance) -> None:
    wait_for(lambda: appliance.notify.seen("READY", "1"), 60, "READY=1")
    text = appliance.config.read_text()
    r = appliance.cli("config", "set", "scp.ae_title", "CT_SCANNER_ROOM_01")
    assert r.returncode == 1
    assert "'CT_SCANNER_ROOM_01' is 18 characters; the limit is 16" in r.stderr
    r = appliance.cli("config", "set", "scp.port", "eleven")
    assert r.returncode == 1 and "scp.port" in r.stderr
    # A port someone else holds is refused before anything is committed.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = appliance.cli("config", "set", "scp.port", str(busy.getsockname()[1]))
    assert r.returncode == 1 and "already in use" in r.stderr
    assert appliance.config.read_text() == text
    assert appliance.status()["scp_answered"]


def test_sighup_reloads_the_file_and_an_invalid_file_is_not_applied(appliance: Appliance) -> None:
    n = appliance.notify
    wait_for(lambda: n.seen("READY", "1"), 60, "READY=1")
    new_port = free_port()
    appliance.config.write_text(f'[scp]\nport = {new_port}\nbind = "127.0.0.1"\nae_title = "RELOADED"\n')
    appliance.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: echoscu(new_port, "RELOADED"), 30, "the reloaded settings")
    assert appliance.status()["listening"] == f"RELOADED:{new_port}"

    appliance.config.write_text("[scp]\nport = 0\n")
    appliance.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "config reload failed" in " ".join(appliance.status()["notes"]), 20, "the failed reload")
    assert echoscu(new_port, "RELOADED")



def test_sighup_with_a_file_that_is_not_utf8_is_reported_and_the_next_reload_works(appliance: Appliance) -> None:
    n = appliance.notify
    wait_for(lambda: n.seen("READY", "1"), 60, "READY=1")
    port = int(appliance.status()["listening"].rsplit(":", 1)[1])
    appliance.config.write_bytes(f'[scp]\nport = {port}\nbind = "127.0.0.1"\nae_title = "RÉSEAU"\n'.encode("latin-1"))
    appliance.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "config reload failed" in " ".join(appliance.status()["notes"]), 20, "the failed reload")
    log = appliance.log.read_text(errors="replace")
    assert "is not UTF-8 text" in log and "save it as UTF-8" in log, log
    assert "unexpected" not in log and "Traceback" not in log, log  # a ConfigError, not the catch-all
    assert appliance.proc.poll() is None and echoscu(port)  # the old settings still serve

    new_port = free_port()
    appliance.config.write_text(f'[scp]\nport = {new_port}\nbind = "127.0.0.1"\nae_title = "RESEAU"\n')
    appliance.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: echoscu(new_port, "RESEAU"), 30, "the settings of the next reload")
    status = appliance.status()
    assert status["listening"] == f"RESEAU:{new_port}"
    assert "config reload failed" not in " ".join(status["notes"])


def test_status_and_config_without_a_running_appliance(tmp_path: Path) -> None:
    cfg = tmp_path / "appliance.toml"
    cfg.write_text("[scp]\nport = 11112\n")
    base = [sys.executable, "-m", "appliance", "--config", str(cfg), "--data-dir", str(tmp_path / "data")]
    rt = ["--runtime-dir", str(tmp_path / "run")]
    r = run([*base, "config", *rt, "set", "media.eject_after_import", "false"])
    assert r.returncode == 0, r.stderr
    assert cfg.read_text() == "[scp]\nport = 11112\n\n[media]\neject_after_import = false\n"
    assert run([*base, "config", *rt, "get", "media.eject_after_import"]).stdout == "false\n"
    assert run([*base, "config", *rt, "get", "scp.ae_title"]).stdout == "ELEKTA_STORAGE\n"
    r = run([*base, "config", *rt, "get", "scp.nope"])
    assert r.returncode == 1 and "known keys under scp" in r.stderr
    r = run([*base, "status", *rt])
    assert r.returncode == 1
    assert "not running" in r.stdout and "0 studies" in r.stdout
    assert "C-ECHO" not in r.stdout  # none was tried: the note says the supervisor is not running
    assert "note:     the supervisor ('appliance run') is not running" in r.stdout


def test_a_stalled_notify_reader_does_not_stall_the_notifier(tmp_path, monkeypatch):
    """Nobody reads this NOTIFY_SOCKET: once its queue (10 datagrams) is full, each message
    waits at most the timeout and is dropped, so the supervisor's stop is never stuck."""
    from appliance.adapters.systemd import Notifier

    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stalled.bind(str(tmp_path / "stalled.sock"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "stalled.sock"))
    notifier = Notifier(timeout=0.05)
    sender = threading.Thread(target=lambda: [notifier.status(f"message {i}") for i in range(40)], daemon=True)
    t = time.monotonic()
    sender.start()
    sender.join(30)
    assert not sender.is_alive(), "sd_notify blocked on a full queue"
    assert time.monotonic() - t < 10
    first = stalled.recv(4096)
    assert first == b"STATUS=message 0"
    stalled.close()


def test_status_shows_what_the_scp_reports_of_itself(appliance: Appliance) -> None:
    """The SCP reports its associations, open files, threads, memory and last store over its
    notify channel; 'appliance status' shows them, so a leak is seen before it stops storing."""
    wait_for(lambda: appliance.notify.seen("READY", "1"), 60, "READY=1")
    port = int(appliance.status()["listening"].rsplit(":", 1)[1])
    r = run([dcmtk("storescu"), "-to", "10", "-aec", "ELEKTA_STORAGE", "127.0.0.1", str(port),
             str(_one_ct(appliance.data.parent))])
    assert r.returncode == 0, r.stderr
    status = wait_for(lambda: (s := appliance.status()) and "last store OK" in s["scp_detail"] and s, 30,
                      "the SCP's report of its last store")
    assert status["ok"] and status["scp_problem"] == ""
    assert "open files" in status["scp_detail"] and "threads" in status["scp_detail"]
    text = appliance.cli("status").stdout
    assert "open files" in text and "last store OK" in text


def _one_ct(folder: Path) -> Path:
    from helpers import ct_series, write_series

    return write_series(ct_series(1), folder / "ct")[0]
