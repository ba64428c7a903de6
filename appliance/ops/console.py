"""``appliance console``: the configuration menu on the serial line (ttyS0, 115200 8N1).

A line-oriented numbered menu for a VT100 or a dumb terminal: 80x24, no colours, no cursor
addressing; every screen fits in 24 lines and every line in 80 columns. Each field shows its
current value and one line of help. Every entry is checked against the whole configuration
before anything is saved, and an error says what was wrong and what is allowed.

Changes go through the config service of ``appliance run`` when it runs, so they take effect
at once (a new port or AE title restarts the Storage SCP); otherwise they are written to the
config file and apply at the next start. The network setting is also written as a
systemd-networkd file and applied at once (:mod:`appliance.adapters.network`).

The console depends on nothing but its two streams and local files and sockets: a wrong
gateway or an address conflict costs the box its network, never this menu.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

from appliance import __version__, config
from appliance.config import Config, Destination, NetworkMode
from appliance.errors import ApplianceError, ConfigError
from appliance.ops import health
from appliance.ops.consolesettings import (
    DEST_FIELDS,
    EJECT_FIELD,
    POLICY_FIELD,
    SCP_FIELDS,
    ConsoleSettings,
    Field,
    reason,
    toml_str,
    value_of,
)

log = logging.getLogger(__name__)

WIDTH = 79  # a character short of 80: some terminals wrap at the last column
#: Lines of the journal or log file the Log screen shows.
LOG_LINES = 18
#: What the Log screen runs to read the journal (the log file is used when it fails).
JOURNAL_COMMAND = ("journalctl", "--no-pager", "--quiet", "-o", "short", "-u", "appliance.service",
                   "-u", "appliance-console@*.service", "-n", str(LOG_LINES))
#: What "Service shell" runs: login asks for root's password (set at first boot).
SHELL_COMMAND = ("login", "root")
#: What sets that password when the box has none yet.
PASSWD_COMMAND = ("passwd", "root")
SHADOW = Path("/etc/shadow")


def root_password_missing(shadow: Path = SHADOW) -> bool:
    """True when root has no usable password in ``shadow`` (empty, ``*`` or locked ``!``)."""
    try:
        for line in shadow.read_text(encoding="utf-8").splitlines():
            if line.startswith("root:"):
                pw = line.split(":")[1]
                return pw in ("", "*") or pw.startswith("!")
    except OSError:
        return False
    return True

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def run_command(cmd: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=60, check=False)


class _Quit(Exception):
    """The terminal closed its input (EOF)."""


# -- the console -------------------------------------------------------------------------------


class Console:
    """The menu, reading lines from ``inp`` and writing to ``out``."""

    def __init__(
        self,
        inp: TextIO,
        out: TextIO,
        settings: ConsoleSettings,
        *,
        data_dir: Path,
        networkd_dir: Path | None = None,
        systemctl: Sequence[str] = ("systemctl",),
        journal: Sequence[str] | None = JOURNAL_COMMAND,
        log_file: Path | None = None,
        shell: Sequence[str] = SHELL_COMMAND,
        runner: Runner = run_command,
        live_network: bool = True,
        shadow: Path | None = None,
        passwd: Sequence[str] = PASSWD_COMMAND,
    ) -> None:
        self.inp = inp
        self.out = out
        self.settings = settings
        self.data_dir = data_dir
        self.networkd_dir = networkd_dir
        self.systemctl = tuple(systemctl)
        self.journal = tuple(journal) if journal else None
        self.log_file = log_file
        self.shell = tuple(shell)
        self.runner = runner
        #: Apply network settings to the interfaces at once (False: only write the file).
        self.live_network = live_network
        #: Where to see whether root has a password yet (None: do not ask at start).
        self.shadow = shadow
        self.passwd = tuple(passwd)

    # -- terminal I/O -----------------------------------------------------------------------

    def say(self, text: str = "") -> None:
        """Write ``text``, each line wrapped at 79 columns (continuations indented 2 more)."""
        for line in text.split("\n"):
            lead = line[: len(line) - len(line.lstrip())]
            for w in textwrap.wrap(line, WIDTH, subsequent_indent=lead + "  ") or [""]:
                self.out.write(w + "\n")
        self.out.flush()

    def ask(self, prompt: str) -> str:
        """Show ``prompt``, read one line; raise _Quit at end of input."""
        self.out.write(prompt)
        self.out.flush()
        line = self.inp.readline()
        if not line:
            raise _Quit
        return "".join(ch for ch in line.strip() if ch.isprintable())

    def confirm(self, question: str) -> bool:
        return self.ask(f"{question} [y/N]: ").lower() in ("y", "yes")

    def pause(self) -> None:
        self.ask("Press Enter to go back. ")

    def error(self, exc: ApplianceError | str) -> None:
        text = reason(exc) if isinstance(exc, ApplianceError) else exc
        self.say(f"Not saved: {text}")

    def heading(self, title: str) -> None:
        self.say("")
        self.say(f"== {title} " + "=" * max(0, WIDTH - len(title) - 4))

    # -- the loop ---------------------------------------------------------------------------

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
            "s": ("Service shell (root password)", self.service_shell),
        }
        try:
            self._first_boot_password()
            while True:
                try:
                    cfg_line = self._title()
                except ApplianceError as exc:
                    cfg_line = f"configuration problem: {exc}"
                self.heading(f"appliance {__version__} - serial console")
                self.say(cfg_line)
                for key, (name, _fn) in screens.items():
                    self.say(f"  {key}  {name}")
                self.say("  q  Quit")
                choice = self.ask("Choice: ").lower()
                if choice in ("q", "quit", "exit"):
                    return 0
                if choice not in screens:
                    if choice:
                        self.say(f"'{choice}' is not on the menu; type a number from 1 to 9, s or q.")
                    continue
                try:
                    screens[choice][1]()
                except _Quit:
                    raise
                except KeyboardInterrupt:
                    self.say("(interrupted)")
                except ApplianceError as exc:
                    self.say(f"Error: {exc}")
                except Exception as exc:  # noqa: BLE001 - the console must outlive any bug
                    log.exception("console screen %s failed", screens[choice][0])
                    self.say(f"Internal error: {exc!r}; the console goes on (see the Log screen).")
        except _Quit:
            return 0

    def _first_boot_password(self) -> None:
        """On a box whose root has no password yet, offer to set it before the menu."""
        if self.shadow is None or not root_password_missing(self.shadow):
            return
        self.heading("First start: service password")
        self.say("The service shell (menu item s) is a root shell behind a password, and none is set "
                 "yet. Choose it now; give it to service staff only.")
        if self.ask("Set the service password now? [Y/n]: ").lower() in ("n", "no"):
            self.say("Not set; the service shell stays closed and this question comes back at the next start.")
            return
        try:
            r = subprocess.run(list(self.passwd), check=False)  # on the terminal itself
        except OSError as exc:
            self.say(f"Cannot run {' '.join(self.passwd)}: {exc.strerror}")
            return
        self.say("Service password set." if r.returncode == 0 else
                 "The password was not set; this question comes back at the next start.")

    def _title(self) -> str:
        cfg = self.settings.current()
        where = "Changes apply at once." if self.settings.running() else (
            "The appliance is not running: changes apply when it starts.")
        return f"Storage Server {cfg.scp.ae_title} on port {cfg.scp.port}. {where}"

    # -- field editing ------------------------------------------------------------------------

    def _show_fields(self, cfg: Config, fields: Sequence[Field], first: int = 1) -> None:
        for n, f in enumerate(fields, first):
            value = f.show(value_of(cfg, f.key))
            self.say(f"  {n:<2} {f.label:<22} {value}"[:WIDTH])
            self.say(f"     {f.help}"[:WIDTH])

    def edit(self, f: Field, current: Any) -> bool:
        """Ask for a new value of ``f``; check and save it. Return True when something changed."""
        shown = f.show(current)
        self.say(f"{f.label}: {f.help}")
        text = self.ask(f"New {f.label} (Enter keeps {shown}): ")
        if not text:
            self.say("Unchanged.")
            return False
        try:
            value = f.parse(text)
            self.settings.check({f.key: value})
        except ConfigError as exc:
            self.error(exc)
            return False
        return self.save({f.key: value})

    def save(self, changes: dict[str, str | None]) -> bool:
        try:
            result = self.settings.change(changes)
        except ApplianceError as exc:
            self.error(exc)
            return False
        self.say(f"Saved: {result}")
        return True

    def field_screen(self, title: str, fields: Sequence[Field], intro: Callable[[Config], None] | None = None) -> None:
        while True:
            cfg = self.settings.current()
            self.heading(title)
            if intro is not None:
                intro(cfg)
            self._show_fields(cfg, fields)
            self.say("  0  Back")
            choice = self.ask("Field to change: ")
            if choice in ("0", "", "q", "b"):
                return
            if not choice.isdigit() or not 1 <= int(choice) <= len(fields):
                self.say(f"'{choice}' is not a field; type 1 to {len(fields)}, or 0 to go back.")
                continue
            f = fields[int(choice) - 1]
            self.edit(f, value_of(cfg, f.key))

    # -- screens --------------------------------------------------------------------------------

    def status(self) -> None:
        self.heading("Status")
        self.say("Checking (a C-ECHO to the Storage Server and a test write to the store)...")
        h = self.settings.status(self.data_dir)
        for line in h.render().splitlines():
            self.say(line)
        self.pause()

    def storage(self) -> None:
        self.field_screen("Storage Server", SCP_FIELDS)

    def destinations(self) -> None:
        while True:
            cfg = self.settings.current()
            self.heading("Export destinations")
            names = sorted(cfg.destinations)
            if not names:
                self.say("No destinations yet.")
            else:
                self.say(f"     {'Name':<16} {'AE title':<17} {'Host':<28} Port")
            for n, name in enumerate(names, 1):
                d = cfg.destinations[name]
                self.say(f"  {n:<2} {name:<16} {d.ae_title:<17} {d.host:<28} {d.port}"[:WIDTH])
            self.say("  a  Add a destination")
            if names:
                self.say("  e  Edit    r  Remove    t  Echo (test the connection)")
            self.say("  0  Back")
            choice = self.ask("Choice: ").lower()
            if choice in ("0", "", "q", "b"):
                return
            if choice == "a":
                self._add_destination(cfg)
            elif choice in ("e", "r", "t") and names:
                picked = self._pick(names, "Destination (number or name): ")
                if picked is None:
                    continue
                if choice == "e":
                    self._edit_destination(picked, cfg.destinations[picked])
                elif choice == "r":
                    if self.confirm(f"Remove destination {picked}?"):
                        self.save({f"destinations.{picked}": None})
                else:
                    self._echo(picked, cfg.destinations[picked])
            else:
                self.say(f"'{choice}' is not on the menu.")

    def _pick(self, names: Sequence[str], prompt: str) -> str | None:
        text = self.ask(prompt)
        if text.isdigit() and 1 <= int(text) <= len(names):
            return names[int(text) - 1]
        if text in names:
            return text
        if text:
            self.say(f"'{text}' is not in the list; give its number (1 to {len(names)}) or its name.")
        return None

    def _add_destination(self, cfg: Config) -> None:
        self.say("Name: letters, digits, '-' and '_' (used as 'appliance send --to NAME').")
        name = self.ask("Name: ")
        if not name:
            return
        if name in cfg.destinations:
            self.error(f"a destination named '{name}' exists already; choose Edit to change it")
            return
        values: dict[str, str] = {}
        for f in DEST_FIELDS:
            self.say(f"{f.label}: {f.help}")
            text = self.ask(f"{f.label}{' (Enter for 104)' if f.key == 'port' else ''}: ")
            if f.key == "port" and not text:
                text = "104"
            try:
                values[f.key] = f.parse(text) if f.kind == "int" else toml_str(text)
            except ConfigError as exc:
                self.error(exc)
                return
        changes: dict[str, str | None] = {f"destinations.{name}.{k}": v for k, v in values.items()}
        try:
            self.settings.check(changes)
        except ConfigError as exc:
            self.error(exc)
            return
        if self.save(changes) and self.confirm(f"Echo {name} now?"):
            self._echo(name, self.settings.current().destinations[name])

    def _edit_destination(self, name: str, d: Destination) -> None:
        changes: dict[str, str | None] = {}
        for f in DEST_FIELDS:
            current = getattr(d, f.key)
            text = self.ask(f"{f.label} (Enter keeps {current}): ")
            if not text:
                continue
            try:
                changes[f"destinations.{name}.{f.key}"] = f.parse(text)
            except ConfigError as exc:
                self.error(exc)
                return
        if not changes:
            self.say("Unchanged.")
            return
        try:
            self.settings.check(changes)
        except ConfigError as exc:
            self.error(exc)
            return
        self.save(changes)

    def _echo(self, name: str, d: Destination) -> None:
        from appliance.net import sender

        self.say(f"Sending a C-ECHO to {name} ({d.ae_title} at {d.host}:{d.port}); this takes up to "
                 f"{sender.DEFAULT_ECHO_TIMEOUT:g} s...")
        try:
            result = sender.echo(d)
        except ApplianceError as exc:
            self.say(f"Echo FAILED: {exc}")
            return
        self.say(f"Echo OK: {name} answered. {result}")

    def usb(self) -> None:
        from appliance.store.queue import ExportQueue
        from appliance.store.store import Store

        store = Store(self.data_dir)
        state = ExportQueue(self.data_dir)
        try:
            while True:
                cfg = self.settings.current()
                self.heading("USB export")
                last = health.last_results(self.data_dir).get("export")
                self.say(f"Last export: {_result(last)}")
                queue = state.entries()
                self.say(f"Queue ({len(queue)}): " + ("empty; the default policy applies" if not queue else
                                                       "a stick gets these"))
                for n, q in enumerate(queue[:8], 1):
                    self.say(f"  {n:<2} {q.level:<6} {q.uid}"[:WIDTH])
                if len(queue) > 8:
                    self.say(f"     ... and {len(queue) - 8} more")
                self._show_fields(cfg, [POLICY_FIELD])
                self.say("  a  Add a study or series to the queue")
                if queue:
                    self.say("  r  Remove from the queue")
                self.say("  0  Back")
                choice = self.ask("Choice: ").lower()
                if choice in ("0", "", "q", "b"):
                    return
                if choice == "1":
                    self.edit(POLICY_FIELD, cfg.usb.policy.value)
                elif choice == "a":
                    self._queue_add(store, state)
                elif choice == "r" and queue:
                    uid = self._pick([q.uid for q in queue], "Remove which (number or UID): ")
                    if uid is not None and state.remove(uid):
                        self.say(f"Removed {uid} from the queue.")
                else:
                    self.say(f"'{choice}' is not on the menu.")
        finally:
            state.close()
            store.close(clean=False)

    def _queue_add(self, store: Any, state: Any) -> None:
        rows = store.recent_studies(9)
        if rows:
            self.say("Latest studies (date, modalities, objects, study UID):")
        for n, r in enumerate(rows, 1):
            self.say(f"  {n}  {r.study_date or '-':<8} {r.modalities or '-':<8} {r.instances:>5}  {r.study_uid}"[:WIDTH])
        text = self.ask("Number, or a study or series UID: ")
        if not text:
            return
        uid = rows[int(text) - 1].study_uid if text.isdigit() and 1 <= int(text) <= len(rows) else text
        level = store.level_of(uid)
        if level is None:
            self.say(f"Not queued: no stored study or series has UID {uid}; pick a number from the list or "
                     "type a stored UID.")
            return
        if state.add(uid, level):
            self.say(f"Queued {level} {uid}.")
        else:
            self.say(f"{uid} was already queued.")

    def cd(self) -> None:
        while True:
            cfg = self.settings.current()
            self.heading("CD import")
            last = health.last_results(self.data_dir).get("import")
            self.say(f"Last import: {_result(last)}")
            reports = sorted((self.data_dir / "imports").glob("*.txt"), reverse=True)[:5]
            if reports:
                self.say("Latest reports:")
            for n, p in enumerate(reports, 1):
                self.say(f"  r{n} {p.name}"[:WIDTH])
            self._show_fields(cfg, [EJECT_FIELD])
            self.say("  0  Back")
            choice = self.ask("Choice: ").lower()
            if choice in ("0", "", "q", "b"):
                return
            if choice == "1":
                self.edit(EJECT_FIELD, cfg.media.eject_after_import)
            elif re.fullmatch(r"r\d", choice) and 1 <= int(choice[1:]) <= len(reports):
                self._page(reports[int(choice[1:]) - 1].read_text(encoding="utf-8", errors="replace").splitlines())
            else:
                self.say(f"'{choice}' is not on the menu.")

    def _page(self, lines: list[str]) -> None:
        """Show ``lines`` 20 at a time."""
        for start in range(0, max(len(lines), 1), 20):
            for line in lines[start:start + 20]:
                self.out.write(line[:WIDTH] + "\n")
            if start + 20 < len(lines):
                if self.ask("Enter for more, q to stop: ").lower() == "q":
                    return
        self.pause()

    # -- network --------------------------------------------------------------------------------

    def network(self) -> None:
        from appliance.adapters import network

        directory = self.networkd_dir or network.DEFAULT_NETWORKD_DIR
        while True:
            cfg = self.settings.current()
            self.heading("Network (systemd-networkd)")
            try:
                st = network.state()
                lines = network.render_state(st, WIDTH)
            except ApplianceError as exc:
                st, lines = None, [f"cannot read the interfaces: {exc}"]
            for line in lines[:12]:
                self.say(line)
            if len(lines) > 12:
                self.say(f"... {len(lines) - 12} more lines: choose 4")
            self.say(f"Setting: {network.describe(cfg.network)}")
            self.say(f"         kept in {directory / network.NETWORK_FILE}")
            self.say("  1  Use DHCP")
            self.say("  2  Use a static address")
            self.say("  3  Apply the setting again (rewrite the file, apply now)")
            self.say("  4  Show every interface, address and route")
            self.say("  0  Back")
            choice = self.ask("Choice: ")
            if choice in ("0", "", "q", "b"):
                return
            if choice == "1":
                self._set_network(cfg, NetworkMode.DHCP, st)
            elif choice == "2":
                self._set_network(cfg, NetworkMode.STATIC, st)
            elif choice == "3":
                self._apply_network(cfg.network)
            elif choice == "4":
                extra = [f"route: {r}" for r in (st.routes if st else ())]
                self._page(lines + extra)
            else:
                self.say(f"'{choice}' is not on the menu.")

    def _set_network(self, cfg: Config, mode: NetworkMode, st: Any) -> None:
        from appliance.adapters import network

        n = cfg.network
        suggested = n.interface or (network.default_interface(st) if st is not None else "")
        self.say("Interface: the network port's name, as listed above (e.g. eth0)."
                 + (" Empty: every wired interface." if mode is NetworkMode.DHCP else ""))
        iface = self.ask(f"Interface (Enter for {suggested or 'every wired interface'}): ") or suggested
        changes: dict[str, str | None] = {"network.mode": mode.value, "network.interface": iface}
        if mode is NetworkMode.STATIC:
            self.say("Address: IPv4 or IPv6, optionally with /prefix, e.g. 192.168.1.50/24.")
            address = self.ask(f"Address (Enter keeps {n.address or 'none'}): ") or (
                f"{n.address}/{n.prefix}" if n.address else "")
            prefix = ""
            if "/" in address:
                address, prefix = address.split("/", 1)
            if not prefix:
                prefix = self.ask(f"Prefix length, e.g. 24 for 255.255.255.0 (Enter keeps {n.prefix}): ") or str(n.prefix)
            if re.fullmatch(r"\d+\.\d+\.\d+\.\d+", prefix):  # a netmask: 255.255.255.0
                try:
                    prefix = str(ipaddress.ip_network(f"0.0.0.0/{prefix}").prefixlen)
                except ValueError:
                    self.error(f"netmask {prefix} is not valid; use a prefix length such as 24, or 255.255.255.0")
                    return
            if not prefix.isdigit():
                self.error(f"prefix '{prefix}' is not a whole number; use 1 to 32 (IPv4) or 1 to 128 (IPv6)")
                return
            self.say("Gateway: the router on this subnet; '-' for none.")
            gateway = self.ask(f"Gateway (Enter keeps {n.gateway or 'none'}): ") or n.gateway
            self.say("DNS servers: addresses separated by commas; '-' for none.")
            dns = self.ask(f"DNS (Enter keeps {', '.join(n.dns) or 'none'}): ")
            dns_list = list(n.dns) if not dns else [] if dns == "-" else [d.strip() for d in dns.split(",") if d.strip()]
            changes.update({
                "network.address": address,
                "network.prefix": prefix,
                "network.gateway": "" if gateway == "-" else gateway,
                "network.dns": json.dumps(dns_list),
            })
        try:
            new = self.settings.check(changes)
        except ConfigError as exc:
            self.error(exc)
            return
        from appliance.adapters import network as _network

        if self.live_network:
            try:
                clash = _network.conflict(new.network)
            except ApplianceError:
                clash = None  # the interfaces cannot be read: nothing to clash with that we know of
            if clash:
                self.error(clash)
                return
        if not self.confirm(f"Use {_network.describe(new.network)}?"):
            self.say("Unchanged.")
            return
        if self.save(changes):
            self._apply_network(new.network)

    def _apply_network(self, n: config.NetworkConfig) -> None:
        from appliance.adapters import network

        directory = self.networkd_dir or network.DEFAULT_NETWORKD_DIR
        try:
            path = network.write_networkd(n, directory)
            self.say(f"Written {path}: applies at every boot.")
        except ApplianceError as exc:
            self.say(f"Not written: {exc}")
        if not self.live_network:
            self.say("Not applied now (--no-live-network): it applies at the next boot.")
            return
        try:
            self.say(f"Applied now: {network.apply_live(n)}")
        except ApplianceError as exc:
            self.say(f"Not applied now: {exc}")
        self.say("The serial console does not depend on the network: if the box is now unreachable, "
                 "correct the setting here.")

    # -- log, power, shell -------------------------------------------------------------------------

    def log(self) -> None:
        lines, source = self._log_lines()
        self.heading(f"Log ({source})")
        for line in lines[-LOG_LINES:]:
            self.out.write(line[:WIDTH] + "\n")
        self.pause()

    def _log_lines(self) -> tuple[list[str], str]:
        if self.journal and shutil.which(self.journal[0]):
            try:
                r = self.runner(self.journal)
                lines = [line for line in r.stdout.splitlines() if line.strip()]
                if r.returncode == 0 and lines and not lines[0].startswith("No journal files"):
                    return lines, "journal"
            except (OSError, subprocess.TimeoutExpired) as exc:
                log.warning("cannot read the journal: %s", exc)
        if self.log_file is not None:
            try:
                with open(self.log_file, "rb") as f:
                    f.seek(max(0, os.fstat(f.fileno()).st_size - 64 * 1024))
                    text = f.read().decode("utf-8", errors="replace")
                return text.splitlines()[-LOG_LINES:], str(self.log_file)
            except OSError as exc:
                return [f"cannot read {self.log_file}: {exc.strerror}"], "no log"
        return ["no journal here, and no log file given (appliance console --log-file FILE)"], "no log"

    def _power(self, verb: str, action: str) -> None:
        self.heading(verb)
        self.say(f"The Storage Server stops; associations in flight get 10 s to finish. The box will {action}.")
        if self.ask(f"Type yes to {verb.lower()}: ").lower() != "yes":
            self.say(f"Not done: {verb.lower()} needs the answer 'yes'.")
            return
        cmd = [*self.systemctl, "reboot" if verb == "Reboot" else "poweroff"]
        try:
            r = self.runner(cmd)
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.say(f"{verb} failed: cannot run {' '.join(cmd)}: {exc}")
            return
        if r.returncode != 0:
            why = (r.stderr or r.stdout).strip().splitlines()
            self.say(f"{verb} failed: {' '.join(cmd)} answered {why[-1] if why else r.returncode}")
        else:
            self.say(f"{verb}: the box is going down.")

    def reboot(self) -> None:
        self._power("Reboot", "start again in about a minute")

    def poweroff(self) -> None:
        self._power("Shut down", "switch off; press its power button to start it")

    def service_shell(self) -> None:
        self.heading("Service shell")
        self.say("For service staff: a root shell behind the root password set at first boot. "
                 "Type 'exit' to come back to this menu.")
        if not self.confirm("Open the service shell?"):
            return
        try:
            subprocess.run(list(self.shell), check=False)  # on the terminal itself
        except OSError as exc:
            self.say(f"Cannot start {' '.join(self.shell)}: {exc.strerror}")


def _result(r: health.JobResult | None) -> str:
    if r is None:
        return "none yet"
    return f"{'OK' if r.ok else 'FAILED'} {r.finished_at} {r.device}: {r.summary}"
