"""The console's Forwarding page: the ``[[forward]]`` rules (what each matches, where it goes,
stable_after, caps), added, edited and deleted; and per destination the forwarding queue
(what waits, what was sent, the last error and the next try, what was set aside and why),
with a retry of what was set aside. The wording of the queue is ``appliance queue ls
--forward``'s (:func:`appliance.jobs.forwarder.forward_lines`).

The rules are written as the whole ``[[forward]]`` list, through the config service when
the appliance runs (its Storage SCP is restarted on them, see
:meth:`~appliance.ops.consolesettings.ConsoleSettings.set_forward`), else to the file; a
list the configuration refuses (an unknown destination, a bad origin, an empty ``to``) is
not saved and the refusal is shown in words."""

from __future__ import annotations

import textwrap
from collections import Counter
from typing import TYPE_CHECKING, Any

from appliance.errors import ApplianceError, ConfigError
from appliance.ops.console.screen import WIDTH, Screen
from appliance.ops.consolesettings import FORWARD_FIELDS, Field, rule_table, rule_value
from appliance.reports import sop_class_label

if TYPE_CHECKING:
    from appliance.config import Config, ForwardRule
    from appliance.store.store import Store

#: Objects set aside the destination page lists one by one (grouped by reason); the rest are counted.
SHOW_SET_ASIDE = 6
#: Set-aside objects read to group them by reason.
READ_SET_ASIDE = 500
#: The fields a new rule asks for first; the caps only if the person wants one.
_MATCH_FIELDS = tuple(f for f in FORWARD_FIELDS if f.key in ("calling_ae", "modality", "sop_class", "origin",
                                                               "to", "stable_after"))
_CAP_FIELDS = tuple(f for f in FORWARD_FIELDS if f.key in ("max_pending", "max_pending_gb", "drop_oldest"))


def rule_summary(r: ForwardRule) -> str:
    """What a rule matches, where it goes, when and with which cap, in one line of words."""
    what = []
    if r.calling_ae:
        what.append("from " + ", ".join(r.calling_ae))
    if r.modality:
        what.append("modality " + ", ".join(r.modality))
    if r.sop_class:
        what.append(", ".join(sop_class_label(c) for c in r.sop_class))
    if r.origin:
        what.append("origin " + ", ".join(r.origin))
    text = ("; ".join(what) or "everything") + " -> " + (", ".join(r.to) or "(nowhere)")
    text += ("; each object as it arrives" if not r.stable_after else
             f"; a series once nothing came for {r.stable_after:g} s")
    caps = [x for x in (f"{r.max_pending} objects" if r.max_pending else "",
                        f"{r.max_pending_gb:g} GB" if r.max_pending_gb else "") if x]
    if caps:
        text += (f"; cap {' and '.join(caps)} per destination, "
                 + ("the oldest dropped" if r.drop_oldest else "reported only"))
    return text


def _shown(f: Field, value: Any) -> str:
    if isinstance(value, (list, tuple)) and not value and f.key != "to":
        return "(any)"
    return f.show(value)


def _queue_line(line: str, name: str) -> str:
    """A line of :func:`~appliance.jobs.forwarder.forward_lines` for the console, whose user
    has no shell: the set-aside objects are on this page."""
    return line.replace(f" (appliance queue ls --forward {name})", "")


def _by_destination(lines: list[str]) -> dict[str, str]:
    """The queue's lines by destination (each starts with the destination's name and a colon)."""
    return {line.split(":", 1)[0]: line for line in lines}


class ForwardingPages(Screen):
    """The forwarding rules and the forwarding queue."""

    def forwarding(self) -> None:
        from appliance.store.store import Store

        store = Store(self.data_dir)
        try:
            while True:
                cfg = self.settings.current()
                self.heading("Forwarding")
                self.say("What arrives and matches a rule is sent on by itself (empty fields match "
                         "anything).")
                rules = cfg.forward
                if not rules:
                    self.say("No rule: nothing is forwarded.")
                else:
                    self.say("Rules:")
                for n, r in enumerate(rules, 1):
                    self._item(f"  {n:<2}", rule_summary(r))
                names = self._queue(store, cfg)
                self.say("  a  Add a rule" + ("    e  Edit a rule    r  Delete a rule" if rules else ""))
                if names:
                    self.say("  v  A destination's queue: what was set aside and why, retry")
                self.say("  0  Back")
                choice = self.ask("Choice: ").lower()
                if choice in ("0", "", "q", "b"):
                    return
                if choice == "a":
                    self._add_rule(cfg)
                elif choice in ("e", "r") and rules:
                    picked = self._pick_rule(len(rules))
                    if picked is None:
                        continue
                    if choice == "e":
                        self._edit_rule(picked)
                    else:
                        self._delete_rule(rules, picked)
                elif choice == "v" and names:
                    name = self._pick(names, "Destination (number or name): ")
                    if name is not None:
                        self._destination_queue(store, cfg, name)
                else:
                    self.say(f"'{choice}' is not on the menu.")
        finally:
            store.close(clean=False)

    # -- the queue ----------------------------------------------------------------------------

    def _queue(self, store: Store, cfg: Config) -> list[str]:
        """Show one line per destination with a queue or a rule; return their names."""
        from appliance.jobs.forwarder import forward_lines

        lines = _by_destination(forward_lines(store))
        names = list(dict.fromkeys([*lines, *(n for r in cfg.forward for n in r.to)]))
        if names:
            self.say("Queue per destination:")
        for n, name in enumerate(names, 1):
            self._item(f"  {n:<2}", _queue_line(lines[name], name) if name in lines else f"{name}: nothing queued yet")
        return names

    def _item(self, label: str, text: str) -> None:
        """Write ``label`` and ``text``, wrapped at 79 columns under the text's start."""
        lead = " " * (len(label) + 1)
        for line in textwrap.wrap(f"{label} {text}", WIDTH, subsequent_indent=lead):
            self.out.write(line + "\n")
        self.out.flush()

    def _destination_queue(self, store: Store, cfg: Config, name: str) -> None:
        from appliance.jobs.forwarder import forward_lines

        while True:
            self.heading(f"Forwarding to {name}")
            d = cfg.destinations.get(name)
            self.say(f"Destination {name}: AE title {d.ae_title} at {d.host}:{d.port}" if d is not None else
                     f"{name} is not a configured destination: its queue waits until it is configured again.")
            states = {s.destination: s for s in store.index.forward_states()}
            lines = _by_destination(forward_lines(store))
            st = states.get(name)
            self.say(_queue_line(lines[name], name) if name in lines else f"{name}: nothing queued yet")
            if st is not None and st.set_aside:
                self._show_set_aside(store, name, st.set_aside)
            can_retry = st is not None and (st.set_aside > 0 or st.failures > 0)
            if can_retry:
                self.say(f"  r  Retry now: queue again what was set aside and try {name} at once")
            self.say("  0  Back")
            choice = self.ask("Choice: ").lower()
            if choice in ("0", "", "q", "b"):
                return
            if choice == "r" and can_retry:
                n = store.index.forward_requeue(name)
                when = ("the appliance tries it at once." if self.settings.running() else
                        "they go when the appliance runs (it is not running).")
                self.say(f"{n} object(s) set aside are queued again for {name}; {when}")
            else:
                self.say(f"'{choice}' is not on the menu.")

    def _show_set_aside(self, store: Store, name: str, total: int) -> None:
        items = store.index.forward_set_aside_items(name, READ_SET_ASIDE)
        # A refusal by status names its object; one for want of a presentation context does not,
        # and is the same for many: those are counted, not listed.
        texts = Counter(reason or f"{uid}: no reason recorded" for uid, reason in items)
        self.say(f"Set aside ({total}), refused for good; they no longer hold the queue up:")
        shown = 0
        for text, count in texts.most_common(SHOW_SET_ASIDE):
            self.say(f"  {f'{count} objects: ' if count > 1 else ''}{text}")
            shown += count
        if total > shown:
            self.say(f"  ... and {total - shown} more")

    # -- rules --------------------------------------------------------------------------------

    def _pick_rule(self, count: int) -> int | None:
        text = self.ask("Rule (number): ")
        if text.isdigit() and 1 <= int(text) <= count:
            return int(text) - 1
        if text:
            self.say(f"'{text}' is not a rule; type 1 to {count}.")
        return None

    def _save_rules(self, rules: list[dict[str, Any]]) -> bool:
        """Check ``rules`` as the whole ``[[forward]]`` list, then save them; say what happened."""
        try:
            self.settings.check_forward(rules)
        except ConfigError as exc:
            self.error(exc)
            return False
        if self.settings.running():
            self.say("Saving: the Storage SCP restarts on the new rules...")
        try:
            result = self.settings.set_forward(rules)
        except ApplianceError as exc:
            self.error(exc)
            return False
        self.say(f"Saved: {result}")
        return True

    def _ask_value(self, f: Field, prompt: str) -> tuple[bool, Any]:
        """Ask for ``f``; return (False, None) for Enter, else (True, the value); raise ConfigError."""
        self.say(f"{f.label}: {f.help}")
        text = self.ask(prompt)
        if not text:
            return False, None
        return True, rule_value(f, text)

    def _add_rule(self, cfg: Config) -> None:
        if not cfg.destinations:
            self.error("no destination is configured; add one on the Export destinations page (3) first")
            return
        self.say(f"A new rule; it applies to what arrives from now on (what is stored already: Send, e). "
                 f"Destinations: {', '.join(sorted(cfg.destinations))}.")
        table: dict[str, Any] = {}
        try:
            for f in _MATCH_FIELDS:
                hint = ("Enter for 0" if f.kind == "number" else ", ".join(sorted(cfg.destinations)) if f.key == "to"
                        else "Enter: any")
                given, value = self._ask_value(f, f"{f.label} ({hint}): ")
                if given:
                    table[f.key] = value
            if self.confirm("Cap the backlog per destination?"):
                for f in _CAP_FIELDS:
                    given, value = self._ask_value(f, f"{f.label} (Enter for {'no' if f.kind == 'bool' else 0}): ")
                    if given:
                        table[f.key] = value
        except ConfigError as exc:
            self.error(exc)
            return
        table.setdefault("to", [])
        if self._save_rules([*(rule_table(r) for r in cfg.forward), table]):
            self._item(f"Rule {len(cfg.forward) + 1}:", rule_summary(self.settings.current().forward[-1]))

    def _delete_rule(self, rules: tuple[ForwardRule, ...], n: int) -> None:
        self._item(f"Rule {n + 1}:", rule_summary(rules[n]))
        if self.confirm(f"Delete rule {n + 1}?"):
            self._save_rules([rule_table(r) for i, r in enumerate(rules) if i != n])
        else:
            self.say("Not deleted.")

    def _edit_rule(self, n: int) -> None:
        while True:
            rules = self.settings.current().forward
            if n >= len(rules):
                self.say(f"Rule {n + 1} is gone (changed elsewhere).")
                return
            rule = rules[n]
            self.heading(f"Forwarding rule {n + 1}")
            self._item(f"Rule {n + 1}:", rule_summary(rule))
            for i, f in enumerate(FORWARD_FIELDS, 1):  # each field's help is shown when it is edited
                self.say(f"  {i:<2} {f.label:<22} {_shown(f, getattr(rule, f.key))}"[:WIDTH])
            self.say("  0  Back")
            choice = self.ask("Field to change: ")
            if choice in ("0", "", "q", "b"):
                return
            if not choice.isdigit() or not 1 <= int(choice) <= len(FORWARD_FIELDS):
                self.say(f"'{choice}' is not a field; type 1 to {len(FORWARD_FIELDS)}, or 0 to go back.")
                continue
            f = FORWARD_FIELDS[int(choice) - 1]
            empties = ", 'none' empties" if f.kind == "list" else ""
            try:
                given, value = self._ask_value(
                    f, f"New {f.label} (Enter keeps {_shown(f, getattr(rule, f.key))}{empties}): ")
            except ConfigError as exc:
                self.error(exc)
                continue
            if not given:
                self.say("Unchanged.")
                continue
            tables = [rule_table(r) for r in rules]
            tables[n] = {**tables[n], f.key: value}
            self._save_rules(tables)
