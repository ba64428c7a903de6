"""The console's terminal and field editing: lines in and out at 79 columns, questions,
and a menu field checked and saved through :class:`~appliance.ops.consolesettings.ConsoleSettings`."""

from __future__ import annotations

import subprocess
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from appliance.config import Config
from appliance.errors import ApplianceError, ConfigError
from appliance.ops.consolesettings import ConsoleSettings, Field, reason, value_of

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

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def run_command(cmd: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=60, check=False)


class Quit(Exception):
    """The terminal closed its input (EOF)."""


class Screen:
    """The console's state and terminal, reading lines from ``inp`` and writing to ``out``;
    the pages (:mod:`appliance.ops.console.menu`) build on it."""

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
        """Show ``prompt``, read one line; raise Quit at end of input."""
        self.out.write(prompt)
        self.out.flush()
        line = self.inp.readline()
        if not line:
            raise Quit
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

    def check_and_save(self, changes: dict[str, str | None]) -> bool:
        """Validate ``changes`` against the whole configuration, then save them; a problem is
        said in words and nothing is saved. True if saved."""
        try:
            self.settings.check(changes)
        except ConfigError as exc:
            self.error(exc)
            return False
        return self.save(changes)

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

    def _pick(self, names: Sequence[str], prompt: str) -> str | None:
        text = self.ask(prompt)
        if text.isdigit() and 1 <= int(text) <= len(names):
            return names[int(text) - 1]
        if text in names:
            return text
        if text:
            self.say(f"'{text}' is not in the list; give its number (1 to {len(names)}) or its name.")
        return None

    def _page(self, lines: list[str]) -> None:
        """Show ``lines`` 20 at a time."""
        for start in range(0, max(len(lines), 1), 20):
            for line in lines[start:start + 20]:
                self.out.write(line[:WIDTH] + "\n")
            if start + 20 < len(lines):
                if self.ask("Enter for more, q to stop: ").lower() == "q":
                    return
        self.pause()
