"""Updates from the operator's side (issue 21): the console's page u, driven in-process with
text streams and the file backend as the other console tests are, and the media job on a
stick holding an update.

Releases are real: artefacts in a folder, their ``SHA256SUMS`` signed with an Ed25519 key
made by ``openssl genpkey`` (its public half the only trusted key), served over HTTP by a
real server on loopback for the server check. The box's versions come from an os-release
file and a folder standing for the ESP; offers, requests and progress are the real files in
a run folder of the test's. The factory reset formats a real ext4 file image.

* The menu header and the page show the running version, the other slot and an offer.
* An offer confirmed with INSTALL writes the request and withdraws the offer; any other
  answer writes nothing; an offer older than the running version is not installed.
* The settings are checked before saving (a URL that is not http(s) refused in words).
* "Check the update server": the signed version there, whether it is newer, INSTALL asks for it.
* The factory reset: refused on a wrong word, a wrong password, no password, while an
  update is installed; done on the right ones (the image is a fresh ext4).
* The media job: a stick with an update is not exported to, its release is checked and
  offered (or asked for with ``auto_from_usb``); a tampered one is refused; a plain stick
  is exported to as before.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import os
import re
import select
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import wait_for
from test_console import Setup, has, keys
from test_factoryreset import PASSWORD, Recorder, ls, old_data_partition, shadow_file

from appliance import audit
from appliance.adapters.devices import Change, MediaEvent, MediumKind
from appliance.config import load
from appliance.jobs.media import UPDATE_STICK, MediaJobs
from appliance.ops import health
from appliance.ops.configservice import ConfigFile
from appliance.ops.console import Console
from appliance.ops.console.update import UpdatePlaces
from appliance.ops.consolesettings import ConsoleSettings
from appliance.ops.factoryreset import FactoryReset
from appliance.store.store import Store
from appliance.update import STICK_FOLDER
from appliance.update.request import (
    Progress,
    read_offer,
    read_request,
    write_offer,
    write_progress,
)

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")

RUNNING = "0.1.0"


# -- a box and a release ------------------------------------------------------------------------


class Box:
    """The box's version files and run folder, a trusted key, and the console on them."""

    def __init__(self, tmp: Path, running: str | None = RUNNING) -> None:
        self.setup = Setup(tmp)
        self.tmp = tmp
        self.esp = tmp / "efi"
        self.os_release = tmp / "os-release"
        if running is not None:
            (self.esp / "EFI" / "Linux").mkdir(parents=True)
            (self.esp / "EFI" / "Linux" / f"appliance_{running}.efi").write_bytes(b"MZ uki")
            self.os_release.write_text(f'ID=debian\nVERSION_ID="12"\nIMAGE_ID=appliance\nIMAGE_VERSION={running}\n')
        else:
            self.os_release.write_text('ID=debian\nVERSION_ID="12"\n')
        self.run_dir = tmp / "run-update"
        self.keys = tmp / "keys"
        self.signing_key = make_key(tmp / "signing", self.keys)
        self.places = UpdatePlaces(esp=self.esp, os_release=self.os_release, run_dir=self.run_dir,
                                   keys_dir=self.keys)

    def console(self, *lines: str, **kw: object) -> str:
        text, rc = self.setup.console(keys(*lines), update_places=self.places, **kw)
        assert rc == 0
        return text


def make_key(folder: Path, trusted: Path) -> Path:
    """An Ed25519 private key in ``folder``, its public half in the trusted keys folder ``trusted``."""
    folder.mkdir(parents=True)
    trusted.mkdir(parents=True, exist_ok=True)
    key = folder / "release.key"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(key)], check=True, capture_output=True)
    subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout", "-out", str(trusted / f"{folder.name}.pem")],
                   check=True, capture_output=True)
    return key


def make_release(folder: Path, version: str, key: Path) -> Path:
    """Version ``version``'s artefacts in ``folder``: a root image (zstd), a UKI, SHA256SUMS and its signature."""
    folder.mkdir(parents=True, exist_ok=True)
    root = folder / f"appliance_{version}.root.raw"
    root.write_bytes(version.encode() * 4096)
    if shutil.which("zstd"):
        subprocess.run(["zstd", "-q", "--rm", "-f", str(root)], check=True)
    else:
        root.rename(root.with_name(root.name + ".zst"))
    (folder / f"appliance_{version}.efi").write_bytes(b"MZ" + version.encode() * 100)
    names = [f"appliance_{version}.efi", f"appliance_{version}.root.raw.zst"]
    (folder / "SHA256SUMS").write_text("".join(
        f"{hashlib.sha256((folder / n).read_bytes()).hexdigest()}  {n}\n" for n in names))
    subprocess.run(["openssl", "pkeyutl", "-sign", "-rawin", "-inkey", str(key), "-in", str(folder / "SHA256SUMS"),
                    "-out", str(folder / "SHA256SUMS.sig")], check=True, capture_output=True)
    return folder


@pytest.fixture
def box(tmp_path: Path) -> Box:
    return Box(tmp_path)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on loopback serving a folder: (its base URL, the folder)."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/appliance/", root / "appliance"
    finally:
        httpd.shutdown()
        httpd.server_close()


def page(text: str) -> str:
    """The last Updates page shown, from its heading to its prompt."""
    part = text.split("== Updates and factory reset ")[-1]
    return "== Updates and factory reset " + part.split("Choice: ")[0]


# -- versions and the offer ---------------------------------------------------------------------


def test_the_menu_and_the_page_show_the_versions_and_the_offer(box: Box) -> None:
    write_offer("/dev/sdb1", "0.1.1", run_dir=box.run_dir)
    text = box.console("u", "0", "q")
    assert "\n== appliance 0.1.0 - serial console =" in text
    assert has(text, "System version 0.1.0.")
    assert has(text, "An update to version 0.1.1 is on the USB stick: u to install it.")
    assert "  u  Updates and factory reset\n" in text
    shown = page(text)
    for line in ("System version 0.1.0 (running)", "Other slot: empty",
                 "An update to version 0.1.1 is on the USB stick (/dev/sdb1).",
                 "  i  Install version 0.1.1 from the USB stick", "  c  Check the update server now",
                 "  r  Factory reset: erase the store and the configuration"):
        assert line in shown, shown
    assert re.search(r"  1  Update server URL +\(empty\)\n", shown)
    assert re.search(r"  2  Install from USB +no\n", shown)
    assert re.search(r"  3  Boot tries +3\n", shown)
    lines = shown.split("\n")
    assert len(lines) <= 24 and all(len(line) <= 79 for line in lines), shown


def test_a_machine_without_the_image_shows_the_package_version(tmp_path: Path) -> None:
    from appliance import __version__

    box = Box(tmp_path, running=None)
    text = box.console("u", "0", "q")
    assert f"\n== appliance {__version__} - serial console =" in text
    assert has(page(text), f"{__version__} (the package); no update slots (not running from the appliance image)")
    lines, status = health.version_lines(box.esp, box.os_release, box.run_dir)
    assert status == f"version {__version__}" and "no update slots" in lines[0]


def test_an_offer_confirmed_with_install_writes_the_request(box: Box) -> None:
    write_offer("/dev/sdb1", "0.1.1", run_dir=box.run_dir)
    text = box.console("u", "i", "INSTALL", "0", "q")
    assert "Choice: An update to version 0.1.1 is on the USB stick: install it?\nType INSTALL to confirm: " in text
    assert has(text, "Update to version 0.1.1 asked for: the box writes it to its other slot now")
    request = read_request(box.run_dir)
    assert request is not None and (request["source"], request["by"], request["force"]) == (
        "/dev/sdb1", "console", False)
    assert read_offer(box.run_dir) is None  # asked for: no longer offered
    assert "u to install it" not in text.rsplit("== appliance", 1)[-1]
    assert any("update to system version 0.1.1" in e.get("detail", "") for e in audit.read(box.setup.data))


@pytest.mark.parametrize("answer", ["install", "yes", "y", ""])
def test_any_other_answer_installs_nothing(box: Box, answer: str) -> None:
    write_offer("/dev/sdb1", "0.1.1", run_dir=box.run_dir)
    text = box.console("u", "i", answer, "0", "q")
    assert has(text, "Not installed: the answer was not INSTALL.")
    assert read_request(box.run_dir) is None
    assert read_offer(box.run_dir) == ("/dev/sdb1", "0.1.1")


def test_an_offer_not_newer_than_the_running_version_is_not_installed(box: Box) -> None:
    write_offer("/dev/sdb1", "0.0.9", run_dir=box.run_dir)
    text = box.console("u", "i", "0", "q")
    assert has(text, "Not installed: version 0.0.9 on the stick is not newer than the running 0.1.0.")
    assert "Type INSTALL" not in text
    assert read_request(box.run_dir) is None


def test_an_update_being_installed_is_shown(box: Box) -> None:
    write_progress(Progress("0.1.1", "writing", 40, False, None, "writing version 0.1.1 to slot B: 40 %",
                            time.time()), run_dir=box.run_dir)
    text = box.console("u", "0", "q")
    assert has(page(text), "Updating: writing version 0.1.1 to slot B: 40 %")
    assert has(text, "System version 0.1.0; updating to 0.1.1: 40 %.")
    write_progress(Progress("0.1.1", "failed", 40, True, False, "update failed: the slot could not be written",
                            time.time()), run_dir=box.run_dir)
    assert has(page(box.console("u", "0", "q")), "Last update: FAILED: update failed: the slot could not be written")


def test_an_installed_update_is_started_by_a_reboot_from_the_page(box: Box) -> None:
    (box.esp / "EFI" / "Linux" / "appliance_0.1.1+3.efi").write_bytes(b"MZ uki")  # as the installer leaves it
    write_progress(Progress("0.1.1", "done", 100, True, True, "update done: version 0.1.1 is installed in slot B",
                            time.time()), run_dir=box.run_dir)
    runner = Recorder()
    text = box.console("u", "n", "yes", "0", "q", runner=runner)
    assert has(text, "System version 0.1.0; 0.1.1 installed, boots next.")
    shown = page(text)
    assert "Other slot: 0.1.1 (installed, boots next, 3 tries)" in shown
    assert "Last update: done: update done: version 0.1.1 is installed in slot B" in shown
    assert "  n  Reboot now to start version 0.1.1\n" in shown
    assert "Type yes to reboot: " in text and has(text, "Reboot: the box is going down.")
    assert runner.calls == [["systemctl", "reboot"]]
    (box.tmp / "other").mkdir()
    assert "  n  Reboot" not in page(Box(box.tmp / "other").console("u", "0", "q"))  # nothing installed


# -- settings -----------------------------------------------------------------------------------


def test_the_settings_are_checked_before_saving(box: Box) -> None:
    before = box.setup.config.read_bytes()
    text = box.console("u", "1", "ftp://updates.example/appliance/", "1", "https://", "1", "updates.example",
                       "3", "three", "3", "11", "0", "q")
    assert has(text, "Not saved: update.url 'ftp://updates.example/appliance/' is not an http:// or https:// URL; "
                     "give the address of the folder holding the release (SHA256SUMS)")
    assert has(text, "Not saved: update.url 'https://' is not an http:// or https:// URL")
    assert has(text, "Not saved: update.url 'updates.example' is not an http:// or https:// URL")
    assert has(text, "Not saved: 'three' is not a whole number")
    assert has(text, "Not saved: update.boot_tries 11 is out of range; use 1 to 10")
    assert box.setup.config.read_bytes() == before
    text = box.console("u", "1", "https://updates.example/appliance/", "2", "y", "3", "5", "0", "q")
    assert has(text, "it applies when the appliance starts (it is not running)")
    cfg = load(box.setup.config).update
    assert (cfg.url, cfg.auto_from_usb, cfg.boot_tries) == ("https://updates.example/appliance/", True, 5)
    assert re.search(r"  2  Install from USB +yes\n", page(text))
    box.console("u", "1", "none", "0", "q")
    assert load(box.setup.config).update.url == ""


# -- the update server --------------------------------------------------------------------------


def test_the_update_server_is_checked_and_its_newer_version_asked_for(box: Box,
                                                                      server: tuple[str, Path]) -> None:
    url, folder = server
    text = box.console("u", "c", "0", "q")
    assert has(text, "No update server is set: set its URL first (field 1).")
    make_release(folder, "0.1.1", box.signing_key)
    text = box.console("u", "1", url, "c", "INSTALL", "0", "q")
    assert has(text, "The update server has version 0.1.1 (signed), newer than the running 0.1.0.")
    assert "\nInstall version 0.1.1 from the update server?\nType INSTALL to confirm: " in text
    request = read_request(box.run_dir)
    assert request is not None and (request["source"], request["by"]) == (url, "console")


def test_the_update_server_with_nothing_newer_or_a_bad_signature(box: Box, server: tuple[str, Path]) -> None:
    url, folder = server
    box.setup.config.write_text(f'[scp]\nport = 11112\n\n[update]\nurl = "{url}"\n')
    make_release(folder, RUNNING, box.signing_key)
    text = box.console("u", "c", "0", "q")
    assert has(text, "The update server has version 0.1.0 (signed); this box runs 0.1.0: nothing newer.")
    assert "Type INSTALL" not in text
    shutil.rmtree(folder)
    make_release(folder, "0.2.0", make_key(box.tmp / "stranger", box.tmp / "untrusted"))
    text = box.console("u", "c", "0", "q")
    assert has(text, "The update server: the signature of SHA256SUMS does not match any trusted key")
    assert read_request(box.run_dir) is None


# -- factory reset ------------------------------------------------------------------------------


@pytest.fixture
def data_partition(tmp_path: Path) -> Path:
    if shutil.which("mkfs.ext4") is None or shutil.which("debugfs") is None:
        pytest.skip("needs e2fsprogs")
    return old_data_partition(tmp_path)


def reset_for(box: Box, image: Path, runner: Recorder, shadow: Path | None = None) -> FactoryReset:
    return FactoryReset(device=image, mountpoint=box.tmp / "var-lib-appliance", runner=runner,
                        shadow=shadow or shadow_file(box.tmp))


def test_factory_reset_refused_on_a_wrong_word_or_password(box: Box, data_partition: Path) -> None:
    before = data_partition.read_bytes()
    runner = Recorder()
    reset = reset_for(box, data_partition, runner)
    text = box.console("u", "r", "erase", "0", "q", factory_reset=reset)
    assert "Type ERASE to erase everything: " in text
    assert has(text, "Not done: the answer was not ERASE. Nothing was erased.")
    assert "Service (root) password: " not in text
    text = box.console("u", "r", "ERASE", "not the password", "0", "q", factory_reset=reset)
    assert "Service (root) password: " in text and "not the password" not in text
    assert has(text, "Not done: wrong service password: nothing was erased")
    (box.tmp / "locked").mkdir()
    no_password = reset_for(box, data_partition, runner, shadow_file(box.tmp / "locked", field="!*"))
    text = box.console("u", "r", "ERASE", "", "0", "q", factory_reset=no_password)
    assert has(text, "Not done: the box has no service (root) password, so nobody can confirm a factory reset; "
                     "set one first (the menu offers it at its start, or passwd in the service shell)")
    assert runner.calls == []
    assert data_partition.read_bytes() == before
    refused = [e for e in audit.read(box.setup.data) if e.get("detail") == "a factory reset was refused"]
    assert len(refused) == 2 and all(e["outcome"] == audit.MINOR for e in refused)


def test_factory_reset_refused_while_an_update_is_installed(box: Box, data_partition: Path) -> None:
    write_progress(Progress("0.1.1", "writing", 10, False, None, "writing version 0.1.1 to slot B: 10 %",
                            time.time()), run_dir=box.run_dir)
    runner = Recorder()
    text = box.console("u", "r", "0", "q", factory_reset=reset_for(box, data_partition, runner))
    assert has(text, "An update is being installed (writing version 0.1.1 to slot B: 10 %); wait for it to end.")
    assert "Type ERASE" not in text and runner.calls == []


def test_factory_reset_formats_the_data_partition_and_reboots(box: Box, data_partition: Path) -> None:
    runner = Recorder()
    text = box.console("u", "r", "ERASE", PASSWORD, "0", "q", factory_reset=reset_for(box, data_partition, runner))
    assert has(text, "This erases the data partition: every stored study, the configuration (network included), "
                     "the TLS keys and the audit trail. Then the box restarts with the default configuration, on "
                     "system version 0.1.0.")
    steps = ["1/4 Stopping the appliance", "2/4 Unmounting the data partition",
             f"3/4 Formatting the data partition {data_partition} (ext4, label appliance-data)...",
             "4/4 Rebooting into this system version with the default configuration...",
             "Factory reset done: the box is restarting."]
    for step in steps:  # a long path is wrapped anywhere
        assert "".join(step.split()) in "".join(text.split()), step
    assert runner.names() == ["systemctl stop", f"umount {box.tmp / 'var-lib-appliance'}", "mkfs.ext4 -F",
                              "systemctl reboot"]
    assert ls(data_partition) == {"lost+found", "config"} and ls(data_partition, "/config") == set()
    assert any(e.get("detail", "").startswith("factory reset: the data partition") and e["action"] == "D"
               for e in audit.read(box.setup.data))


# -- the media job on an update stick -----------------------------------------------------------


def stick_event(stick: Path, label: str = "UPDATES") -> MediaEvent:
    return MediaEvent(MediumKind.USB, Change.INSERTED, str(stick), "vfat", label, f"1234-ABCD/{label}")


def run_job(jobs: MediaJobs, event: MediaEvent, n: int) -> None:
    jobs.submit(event)
    wait_for(lambda: jobs.idle() and len(jobs.results) == n, 60, "the media job")


@pytest.fixture
def jobs_on(box: Box, store: Store) -> Iterator[MediaJobs]:
    jobs = MediaJobs(store, lambda: load(box.setup.config), update_keys=box.keys, update_run_dir=box.run_dir,
                     os_release=box.os_release)
    jobs.start()
    yield jobs
    jobs.stop()


def test_a_stick_with_an_update_is_offered_not_exported(box: Box, store: Store, jobs_on: MediaJobs,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    stick = box.tmp / "stick"
    make_release(stick / STICK_FOLDER, "0.1.1", box.signing_key)
    before = sorted(p.relative_to(stick) for p in stick.rglob("*"))
    with caplog.at_level("INFO", logger="appliance.jobs.media"):
        run_job(jobs_on, stick_event(stick), 1)
    result = jobs_on.results[0]
    assert (result.kind, result.ok) == (UPDATE_STICK, True), result
    said = "update offered: version 0.1.1 on USB stick 'UPDATES'; install it on the console (menu u)"
    assert result.summary == said
    assert said in caplog.messages
    assert sorted(p.relative_to(stick) for p in stick.rglob("*")) == before  # no DICOMDIR, nothing written
    assert read_offer(box.run_dir) == (str(stick), "0.1.1")
    assert read_request(box.run_dir) is None
    last = health.last_results(store.data_dir)[UPDATE_STICK]
    assert last.ok and last.summary == said
    assert "last update stick OK" in health.offline(store).status_line()
    # The console then offers it, and INSTALL asks for it.
    box.console("u", "i", "INSTALL", "0", "q")
    request = read_request(box.run_dir)
    assert request is not None and request["source"] == str(stick)


def test_a_removed_stick_withdraws_its_offer(box: Box, jobs_on: MediaJobs) -> None:
    stick = box.tmp / "stick"
    make_release(stick / STICK_FOLDER, "0.1.1", box.signing_key)
    run_job(jobs_on, stick_event(stick), 1)
    assert read_offer(box.run_dir) == (str(stick), "0.1.1")
    jobs_on.submit(MediaEvent(MediumKind.USB, Change.REMOVED, str(stick)))
    assert read_offer(box.run_dir) is None
    assert "u to install it" not in box.console("q")


def test_a_stick_with_the_running_version_is_not_offered(box: Box, jobs_on: MediaJobs) -> None:
    box.setup.config.write_text("[scp]\nport = 11112\n\n[update]\nauto_from_usb = true\n")
    stick = box.tmp / "stick"
    make_release(stick / STICK_FOLDER, RUNNING, box.signing_key)  # left in after the update, at the next boot
    run_job(jobs_on, stick_event(stick), 1)
    result = jobs_on.results[0]
    assert (result.kind, result.ok) == (UPDATE_STICK, True)
    assert result.summary == ("update not offered: version 0.1.0 on USB stick 'UPDATES' is not newer than the "
                              "running 0.1.0")
    assert read_offer(box.run_dir) is None and read_request(box.run_dir) is None
    assert not (stick / "DICOMDIR").exists()


def test_with_auto_from_usb_the_update_is_asked_for_at_once(box: Box, jobs_on: MediaJobs) -> None:
    box.setup.config.write_text("[scp]\nport = 11112\n\n[update]\nauto_from_usb = true\n")
    stick = box.tmp / "stick"
    make_release(stick / STICK_FOLDER, "0.1.1", box.signing_key)
    run_job(jobs_on, stick_event(stick), 1)
    assert jobs_on.results[0].summary == ("update requested: version 0.1.1 from USB stick 'UPDATES' (install "
                                          "automatically from USB is on)")
    request = read_request(box.run_dir)
    assert request is not None and (request["source"], request["by"]) == (str(stick), "usb auto")
    assert read_offer(box.run_dir) is None


def test_a_tampered_update_stick_is_refused_and_not_exported(box: Box, store: Store, jobs_on: MediaJobs,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    stick = box.tmp / "stick"
    folder = make_release(stick / STICK_FOLDER, "0.1.1", box.signing_key)
    sums = bytearray((folder / "SHA256SUMS").read_bytes())
    sums[3] ^= 0x01  # one flipped bit in a sum
    (folder / "SHA256SUMS").write_bytes(bytes(sums))
    with caplog.at_level("WARNING", logger="appliance.jobs.media"):
        run_job(jobs_on, stick_event(stick), 1)
    result = jobs_on.results[0]
    assert result.kind == UPDATE_STICK and not result.ok
    assert result.summary.startswith("update refused: the signature of SHA256SUMS does not match any trusted key")
    assert result.summary in caplog.messages
    assert not (stick / "DICOMDIR").exists()
    assert read_offer(box.run_dir) is None and read_request(box.run_dir) is None
    assert "last update stick FAILED" in health.offline(store).status_line()


def test_a_plain_stick_is_exported_to_as_before(box: Box, jobs_on: MediaJobs) -> None:
    stick = box.tmp / "plain"
    stick.mkdir()
    run_job(jobs_on, stick_event(stick, "PLAIN"), 1)
    assert jobs_on.results[0].kind == "export", jobs_on.results[0]
    assert read_offer(box.run_dir) is None


def test_the_service_password_is_not_echoed_on_a_terminal(box: Box, data_partition: Path) -> None:
    """On a real pty: what is typed is echoed by the terminal, but for the password."""
    master, slave = os.openpty()
    inp = os.fdopen(slave, "r", encoding="utf-8")
    out = io.StringIO()
    runner = Recorder()
    console = Console(inp, out, ConsoleSettings(ConfigFile(box.setup.config), box.setup.runtime / "config.sock"),
                      data_dir=box.setup.data, journal=None, live_network=False, update_places=box.places,
                      factory_reset=reset_for(box, data_partition, runner))

    def typist() -> None:
        os.write(master, b"u\nr\nERASE\n")
        try:  # the prompt is written once echo is off
            wait_for(lambda: "Service (root) password: " in out.getvalue(), 10, "the password prompt")
        finally:  # whatever happened, the console gets to its end
            os.write(master, PASSWORD.encode() + b"\n0\nq\n")

    thread = threading.Thread(target=typist)
    thread.start()
    try:
        assert console.run() == 0
    finally:
        thread.join(30)
    echoed = b""
    while select.select([master], [], [], 0)[0]:
        echoed += os.read(master, 4096)
    inp.close()
    os.close(master)
    assert b"ERASE" in echoed and PASSWORD.encode() not in echoed
    assert runner.names()[-1] == "systemctl reboot"
    assert ls(data_partition) == {"lost+found", "config"}


def test_a_rollback_is_said_on_the_page_and_in_the_status_line(box: Box) -> None:
    # 0.1.1 was installed and never became healthy in its 3 tries: systemd-boot went back to 0.1.0.
    (box.esp / "EFI" / "Linux" / "appliance_0.1.1+0-3.efi").write_bytes(b"MZ uki")
    text = box.console("u", "0", "q")
    assert has(text, "System version 0.1.0; update to 0.1.1 failed, rolled back.")
    shown = page(text)
    assert "Other slot: 0.1.1 (failed to become healthy, not booted again)" in shown
    assert has(shown, "Last update: version 0.1.1 failed to become healthy in 3 boots; the box rolled back to 0.1.0")
    lines, status = health.version_lines(box.esp, box.os_release, box.run_dir)
    assert status == "version 0.1.0; update to 0.1.1 failed, rolled back" and len(lines) == 3


class LoopStick:
    """A stick on a real block device: an ext4 made from ``content`` on a read-only loop device."""

    def __init__(self, tmp: Path) -> None:
        self.content = tmp / "stick-content"
        self.content.mkdir()
        self.image = tmp / "stick.img"
        self.device: Path | None = None

    def attach(self) -> Path:
        subprocess.run(["truncate", "-s", "16M", str(self.image)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-L", "UPDATES", "-d", str(self.content), str(self.image)], check=True)
        done = subprocess.run(["losetup", "-f", "--show", "-r", str(self.image)], capture_output=True, text=True,
                              check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot attach a loop device here: {done.stderr.strip()}")
        self.device = Path(done.stdout.strip())
        probe = self.image.with_name("probe")
        probe.mkdir()
        if subprocess.run(["mount", "-o", "ro", str(self.device), str(probe)], capture_output=True,
                          check=False).returncode != 0:
            pytest.skip("this kernel cannot mount an ext4 stick")
        subprocess.run(["umount", str(probe)], check=True)
        return self.device


@pytest.fixture
def loop_stick(tmp_path: Path) -> Iterator[LoopStick]:
    if shutil.which("losetup") is None or shutil.which("mkfs.ext4") is None:
        pytest.skip("needs losetup and mkfs.ext4")
    stick = LoopStick(tmp_path)
    yield stick
    if stick.device is not None:
        subprocess.run(["losetup", "-d", str(stick.device)], check=False)


def test_an_update_stick_on_a_block_device_is_mounted_read_only_to_look(box: Box, jobs_on: MediaJobs,
                                                                        loop_stick: LoopStick) -> None:
    make_release(loop_stick.content / STICK_FOLDER, "0.1.1", box.signing_key)
    device = loop_stick.attach()
    run_job(jobs_on, stick_event(device), 1)
    result = jobs_on.results[0]
    assert result.summary == "update offered: version 0.1.1 on USB stick 'UPDATES'; install it on the console (menu u)"
    assert read_offer(box.run_dir) == (str(device), "0.1.1")
    assert "appliance-peek" not in Path("/proc/mounts").read_text()  # looked at, and unmounted
