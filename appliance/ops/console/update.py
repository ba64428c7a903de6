"""The console's Updates page (menu item u): the system version (running, the other slot, a
rollback), an update offered by an inserted USB stick and installed after the word INSTALL,
an update being installed and the last one's result, the ``[update]`` settings as fields, a
check of the update server, and the factory reset.

The console does not install: it writes the request that starts the root-run installer
(:func:`appliance.update.request.write_request`, the contract of issue 21), which says how
far it is in ``progress.json``; this page shows it. The factory reset is
:mod:`appliance.ops.factoryreset`, behind the word ERASE and the service password.
"""

from __future__ import annotations

import logging
import termios
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from appliance import audit
from appliance.ops import health
from appliance.ops.console.system import SystemPages
from appliance.ops.consolesettings import ConsoleSettings, Field, value_of
from appliance.ops.factoryreset import CONFIRM_WORD, FactoryReset, ResetError
from appliance.update import (
    ESP,
    KEYS_DIR,
    OS_RELEASE,
    RUN_DIR,
    UpdateError,
    running_version,
)
from appliance.update.boot import version_info
from appliance.update.release import read_release
from appliance.update.request import (
    clear_offer,
    read_offer,
    read_progress,
    write_request,
)
from appliance.update.versions import compare

log = logging.getLogger(__name__)

#: The word that confirms an install.
INSTALL_WORD = "INSTALL"
#: Seconds the update server gets to answer the check.
CHECK_TIMEOUT = 30.0



@dataclass(frozen=True)
class UrlField(Field):
    """The update server's URL, checked by the configuration; ``none`` or ``-`` empties it."""

    def parse(self, text: str) -> str:
        return "" if text.lower() in ("none", "-") else text


UPDATE_FIELDS = (
    UrlField("update.url", "Update server URL",
             "http(s) folder holding a release (SHA256SUMS ...); none: no server."),
    Field("update.auto_from_usb", "Install from USB", "yes: a stick's update installs without asking first.",
          "bool"),
    Field("update.boot_tries", "Boot tries",
          "Boots a new version gets to become healthy before the box rolls back.", "int"),
)


@dataclass(frozen=True)
class UpdatePlaces:
    """Where the page reads the versions and writes requests (the box's paths by default)."""

    esp: Path = ESP
    os_release: Path = OS_RELEASE
    run_dir: Path = RUN_DIR
    keys_dir: Path = KEYS_DIR


class UpdatePages(SystemPages):
    """The Updates page: versions, the offer, progress, settings, the server check, factory reset."""

    def __init__(self, inp: TextIO, out: TextIO, settings: ConsoleSettings, *,
                 update_places: UpdatePlaces | None = None, factory_reset: FactoryReset | None = None,
                 **kw: Any) -> None:
        super().__init__(inp, out, settings, **kw)
        self.update_places = update_places or UpdatePlaces()
        self.factory_reset = factory_reset or FactoryReset()

    # -- what the menu header shows -------------------------------------------------------------

    def version_header(self) -> tuple[str, list[str]]:
        """The running version for the menu's title, and lines under it: the slots in one line,
        an offered update."""
        p = self.update_places
        _lines, status = health.version_lines(p.esp, p.os_release, p.run_dir)
        running = status.split(";")[0].removeprefix("version ").split(" ")[0]
        extra = [f"System {status}."]
        offer = read_offer(p.run_dir)
        if offer is not None:
            extra.append(f"An update to version {offer[1]} is on the USB stick: u to install it.")
        return running, extra

    # -- the page -------------------------------------------------------------------------------

    def updates(self) -> None:
        while True:
            cfg = self.settings.current()
            p = self.update_places
            self.heading("Updates and factory reset")
            lines, _status = health.version_lines(p.esp, p.os_release, p.run_dir)
            for line in lines:
                self.say(line)
            offer = read_offer(p.run_dir)
            if offer is not None:
                self.say(f"An update to version {offer[1]} is on the USB stick ({offer[0]}).")
            self._show_fields(cfg, UPDATE_FIELDS)
            if offer is not None:
                self.say(f"  i  Install version {offer[1]} from the USB stick")
            installed = self._installed()
            if installed is not None:
                self.say(f"  n  Reboot now to start version {installed}")
            self.say("  c  Check the update server now")
            self.say("  r  Factory reset: erase the store and the configuration")
            self.say("  0  Back")
            choice = self.ask("Choice: ").lower()
            if choice in ("0", "", "q", "b"):
                return
            if choice.isdigit() and 1 <= int(choice) <= len(UPDATE_FIELDS):
                f = UPDATE_FIELDS[int(choice) - 1]
                self.edit(f, value_of(cfg, f.key))
            elif choice == "i" and offer is not None:
                self._install_offer(*offer)
            elif choice == "n" and installed is not None:
                self.reboot()
            elif choice == "c":
                self._check_server(cfg.update.url)
            elif choice == "r":
                self._factory_reset()
            else:
                self.say(f"'{choice}' is not on the menu; type 1 to {len(UPDATE_FIELDS)}"
                         + (", i" if offer is not None else "") + (", n" if installed is not None else "")
                         + ", c, r or 0.")

    def _busy(self) -> bool:
        """Say so and return True while an update is being installed."""
        p = read_progress(self.update_places.run_dir)
        if p is not None and not p.finished:
            self.say(f"An update is being installed ({p.message}); wait for it to end.")
            return True
        return False

    def _installed(self) -> str | None:
        """The version installed in the other slot that boots next, or None."""
        p = self.update_places
        try:
            info = version_info(esp=p.esp, os_release=p.os_release)
        except (UpdateError, OSError):
            return None
        return info.other if info.other_state == "trying" else None

    def _running(self) -> str | None:
        try:
            return running_version(self.update_places.os_release)
        except UpdateError:
            return None

    def _install_offer(self, source: str, version: str) -> None:
        if self._busy():
            return
        running = self._running()
        if running is not None and compare(version, running) <= 0:
            self.say(f"Not installed: version {version} on the stick is not newer than the running {running}.")
            return
        self.say(f"An update to version {version} is on the USB stick: install it?")
        text = self.ask(f"Type {INSTALL_WORD} to confirm: ")
        if text != INSTALL_WORD:
            self.say(f"Not installed: the answer was not {INSTALL_WORD}.")
            return
        self._request(source, version, "the USB stick")
        clear_offer(self.update_places.run_dir)

    def _request(self, source: str, version: str, where: str) -> None:
        write_request(source, by="console", run_dir=self.update_places.run_dir)
        log.info("update requested: version %s from %s (%s), confirmed on the console", version, where, source)
        audit.record(self.data_dir, audit.Event(
            "config", "U", participants=(audit.Participant("person", user="serial console", requestor=True),),
            detail=f"an update to system version {version} from {where} ({source}) was asked for"))
        self.say(f"Update to version {version} asked for: the box writes it to its other slot now; this page "
                 "shows how far it is. When it is done, reboot (n on this page, or 8 on the menu) to start it. The store "
                 "and the configuration stay.")

    def _check_server(self, url: str) -> None:
        if not url:
            self.say("No update server is set: set its URL first (field 1).")
            return
        if self._busy():
            return
        self.say(f"Asking {url} ...")
        try:
            release = read_release(url, keys_dir=self.update_places.keys_dir, timeout=CHECK_TIMEOUT)
        except UpdateError as exc:
            self.say(f"The update server: {exc}")
            return
        running = self._running()
        if running is not None and compare(release.version, running) <= 0:
            self.say(f"The update server has version {release.version} (signed); this box runs {running}: "
                     "nothing newer.")
            return
        newer = f", newer than the running {running}" if running is not None else ""
        self.say(f"The update server has version {release.version} (signed){newer}.")
        self.say(f"Install version {release.version} from the update server?")
        text = self.ask(f"Type {INSTALL_WORD} to confirm: ")
        if text != INSTALL_WORD:
            self.say(f"Not installed: the answer was not {INSTALL_WORD}.")
            return
        self._request(url, release.version, "the update server")

    # -- factory reset --------------------------------------------------------------------------

    def _secret(self, prompt: str) -> str:
        """Read a line without echoing it where the input is a terminal."""
        try:
            fd: int | None = self.inp.fileno() if self.inp.isatty() else None
        except (AttributeError, OSError, ValueError):
            fd = None
        old = None
        if fd is not None:
            old = termios.tcgetattr(fd)
            quiet = list(old)
            quiet[3] &= ~termios.ECHO
            termios.tcsetattr(fd, termios.TCSADRAIN, quiet)
        try:
            self.out.write(prompt)
            self.out.flush()
            line = self.inp.readline()
        finally:
            if fd is not None and old is not None:
                termios.tcsetattr(fd, termios.TCSADRAIN, old)
                self.out.write("\n")
                self.out.flush()
        return line.rstrip("\r\n")

    def _factory_reset(self) -> None:
        self.heading("Factory reset")
        running = self._running()
        self.say("This erases the data partition: every stored study, the configuration (network included), the "
                 "TLS keys and the audit trail. Then the box restarts with the default configuration, on "
                 + (f"system version {running}" if running else "the system it runs now")
                 + ". Nothing can bring the erased data back.")
        if self._busy():
            return
        word = self.ask(f"Type {CONFIRM_WORD} to erase everything: ")
        if word != CONFIRM_WORD:
            self.say(f"Not done: the answer was not {CONFIRM_WORD}. Nothing was erased.")
            return
        password = self._secret("Service (root) password: ")
        person = (audit.Participant("person", user="serial console", requestor=True),)
        try:
            self.factory_reset.check(word, password)
        except ResetError as exc:
            audit.record(self.data_dir, audit.Event(
                "security", "E", outcome=audit.MINOR, outcome_text=str(exc), participants=person,
                detail="a factory reset was refused"))
            log.warning("factory reset refused: %s", exc)
            self.say(f"Not done: {exc}")
            return
        audit.record(self.data_dir, audit.Event(
            "config", "D", participants=person,
            detail="factory reset: the data partition (store, configuration, keys, audit trail) is erased"))
        log.warning("factory reset confirmed on the console: erasing the data partition")
        try:
            self.factory_reset.run(self.say)
        except ResetError as exc:
            self.say(f"Factory reset stopped: {exc}")
            return
        self.say("Factory reset done: the box is restarting.")
