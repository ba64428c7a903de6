"""The console's system pages: the log, reboot and shut down, the service shell, and the
service password asked for at the first start."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

from appliance import audit
from appliance.errors import ApplianceError
from appliance.ops.console.screen import LOG_LINES, SHADOW, WIDTH, Screen

log = logging.getLogger(__name__)


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


class SystemPages(Screen):
    """The log, power and service shell pages, and the first start's password question."""

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
        if r.returncode == 0:
            self._keep_service_password()

    def _keep_service_password(self) -> None:
        """Keep root's password on the data partition, so that an update keeps it too."""
        if self.shadow is None:
            return
        from appliance.ops.servicepassword import sync

        try:
            sync(self.data_dir, self.shadow)
        except ApplianceError as exc:
            self.say(f"Note: {exc}; the next system update will ask for the service password again.")

    def audit_trail(self) -> None:
        """The last events of the audit trail, newest last, one per line (wrapped)."""
        events = audit.read(self.data_dir, 200)
        self.heading(f"Audit trail ({len(events)} latest events; appliance audit prints all)")
        if not events:
            self.say("No event yet.")
        lines: list[str] = []
        for e in events:
            text = audit.line(e)
            lines.append(text[:WIDTH])
            rest = text[WIDTH:]
            while rest:
                lines.append("    " + rest[:WIDTH - 4])
                rest = rest[WIDTH - 4:]
        for line in lines[-LOG_LINES:]:
            self.out.write(line + "\n")
        self.pause()

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
            r = subprocess.run(list(self.shell), check=False)  # on the terminal itself
        except OSError as exc:
            self.say(f"Cannot start {' '.join(self.shell)}: {exc.strerror}")
            return
        audit.record(self.data_dir, audit.Event(
            "login", "E", outcome=audit.SUCCESS if r.returncode == 0 else audit.MINOR,
            outcome_text="" if r.returncode == 0 else f"the service shell ended with exit code {r.returncode} "
                                                      "(a wrong password, or the shell's last command failed)",
            participants=(audit.Participant("person", user="service shell (root)", requestor=True),),
            detail="the service shell was opened from the serial console"))
        self._keep_service_password()  # passwd in the shell changes it
