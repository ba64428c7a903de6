"""The console's Export destinations page: list, add, edit, remove and echo them."""

from __future__ import annotations

from appliance.config import Config, Destination
from appliance.errors import ApplianceError, ConfigError
from appliance.ops.console.screen import WIDTH, Screen
from appliance.ops.consolesettings import DEST_FIELDS, toml_str


class DestinationsPage(Screen):
    """The destinations the box sends to (``appliance send --to NAME``)."""

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
        if self.check_and_save(changes) and self.confirm(f"Echo {name} now?"):
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
        self.check_and_save(changes)

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
