"""The console's main menu: :class:`Console`, its loop, and the Status and Storage Server pages."""

from __future__ import annotations

import logging
from collections.abc import Callable

from appliance import audit
from appliance.errors import ApplianceError
from appliance.ops.console.destinations import DestinationsPage
from appliance.ops.console.export import ExportPages
from appliance.ops.console.forwarding import ForwardingPages
from appliance.ops.console.media import MediaPages
from appliance.ops.console.network import NetworkPage
from appliance.ops.console.screen import Quit
from appliance.ops.console.security import SecurityPages
from appliance.ops.console.storage import StoragePages
from appliance.ops.console.system import SystemPages
from appliance.ops.console.update import UpdatePages
from appliance.ops.consolesettings import SCP_FIELDS

log = logging.getLogger(__name__)


class Console(UpdatePages, DestinationsPage, ExportPages, ForwardingPages, MediaPages, NetworkPage, SecurityPages,
              StoragePages, SystemPages):
    """The menu, reading lines from ``inp`` and writing to ``out``."""

    def run(self) -> int:
        """Show the main menu until the input ends or the user quits; return 0."""
        screens: dict[str, tuple[str, Callable[[], None]]] = {
            "1": ("Status", self.status),
            "2": ("Storage Server", self.storage),
            "3": ("Export destinations", self.destinations),
            "4": ("USB export", self.usb),
            "5": ("CD import", self.cd),
            "6": ("Network", self.network),
            "7": ("Log", self.log),
            "8": ("Reboot", self.reboot),
            "9": ("Shut down", self.poweroff),
            "d": ("Storage: delete, protect, retention", self.studies),
            "e": ("Send studies or series to a destination", self.export),
            "a": ("Audit trail: who sent, took, deleted or changed what", self.audit_trail),
            "f": ("Forwarding: rules, queue per destination", self.forwarding),
            "t": ("Security: TLS certificate, TLS port, known peers", self.security),
            "u": ("Updates and factory reset", self.updates),
            "s": ("Service shell (root password)", self.service_shell),
        }
        audit.record(self.data_dir, audit.Event("login", "E", participants=(
            audit.Participant("person", user="serial console", requestor=True),),
            detail="a console session started (the menu needs no password; the service shell does)"))
        try:
            self._first_boot_password()
            while True:
                try:
                    cfg_line = self._title()
                except ApplianceError as exc:
                    cfg_line = f"configuration problem: {exc}"
                running, version_lines = self.version_header()
                self.heading(f"appliance {running} - serial console")
                self.say(cfg_line)
                for line in version_lines:
                    self.say(line)
                for key, (name, _fn) in screens.items():
                    self.say(f"  {key}  {name}")
                self.say("  q  Quit")
                choice = self.ask("Choice: ").lower()
                if choice in ("q", "quit", "exit"):
                    return 0
                if choice not in screens:
                    if choice:
                        self.say(f"'{choice}' is not on the menu; type a number from 1 to 9, a, d, e, f, s, t, u "
                                 "or q.")
                    continue
                try:
                    screens[choice][1]()
                except Quit:
                    raise
                except KeyboardInterrupt:
                    self.say("(interrupted)")
                except ApplianceError as exc:
                    self.say(f"Error: {exc}")
                except Exception as exc:  # noqa: BLE001 - the console must outlive any bug
                    log.exception("console screen %s failed", screens[choice][0])
                    self.say(f"Internal error: {exc!r}; the console goes on (see the Log screen).")
        except Quit:
            return 0

    def _title(self) -> str:
        cfg = self.settings.current()
        where = "Changes apply at once." if self.settings.running() else (
            "The appliance is not running: changes apply when it starts.")
        return f"Storage Server {cfg.scp.ae_title} on port {cfg.scp.port}. {where}"

    def status(self) -> None:
        self.heading("Status")
        self.say("Checking (a C-ECHO to the Storage Server and a test write to the store)...")
        h = self.settings.status(self.data_dir)
        for line in h.render().splitlines():  # with the sends started here and the last one's result
            self.say(line)
        self.pause()

    def storage(self) -> None:
        self.field_screen("Storage Server", SCP_FIELDS)
