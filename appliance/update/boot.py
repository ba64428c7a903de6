"""Boot assessment: which version runs, what the other slot holds, and blessing a boot that
became healthy. No state file: everything is read from /etc/os-release (IMAGE_VERSION) and
the UKI file names on the ESP, which systemd-boot's boot counting renames:

  appliance_<V>.efi            good
  appliance_<V>+<L>.efi        installed, L tries left, not booted yet
  appliance_<V>+<L>-<D>.efi    on trial: L tries left, D done
  appliance_<V>+0-<D>.efi      bad: never became healthy (sorted last: the other one boots)
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cmp_to_key
from pathlib import Path

from appliance.update import (
    EFIVARS,
    ESP,
    OS_RELEASE,
    PREFIX,
    UpdateError,
    running_version,
)
from appliance.files import fsync_dir
from appliance.update.versions import compare

log = logging.getLogger(__name__)

#: systemd-boot's vendor GUID for its Loader* variables.
LOADER_GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
#: The variable naming the UKI of a counted boot (absent when the boot is not counted).
BOOT_COUNT_VAR = f"LoaderBootCountPath-{LOADER_GUID}"
#: Where the UKIs live on the ESP.
UKI_DIR = Path("EFI") / "Linux"
#: How long boot-check waits for the appliance to become healthy (seconds).
BOOT_CHECK_TIMEOUT = 180.0
#: Seconds between two health checks while waiting.
BOOT_CHECK_INTERVAL = 2.0

_UKI_RE = re.compile(rf"^{PREFIX}(?P<v>[^+/]+?)(?:\+(?P<left>\d+)(?:-(?P<done>\d+))?)?\.efi$")


@dataclass(frozen=True)
class Uki:
    """One UKI on the ESP and its boot-counting state."""

    path: Path
    version: str
    #: Tries left (None: no counter, i.e. good).
    left: int | None
    #: Tries done (None when the name has no '-D').
    done: int | None

    @property
    def state(self) -> str:
        """"good", "trying" (counter running) or "bad" (no tries left)."""
        if self.left is None:
            return "good"
        return "bad" if self.left == 0 else "trying"

    @property
    def good_name(self) -> str:
        return f"{PREFIX}{self.version}.efi"


def parse_uki(path: Path) -> Uki | None:
    """The UKI named by ``path``'s file name, or None when it is not one of ours."""
    m = _UKI_RE.match(path.name)
    if m is None:
        return None
    return Uki(path, m["v"], None if m["left"] is None else int(m["left"]),
               None if m["done"] is None else int(m["done"]))


def ukis(esp: Path = ESP) -> list[Uki]:
    """Our UKIs on the ESP, newest version first."""
    folder = esp / UKI_DIR
    try:
        names = sorted(folder.iterdir())
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise UpdateError(f"cannot read {folder}: {exc.strerror}") from None
    found = [u for p in names if p.is_file() and (u := parse_uki(p)) is not None]
    return sorted(found, key=cmp_to_key(_by_version), reverse=True)


def _by_version(a: Uki, b: Uki) -> int:
    return compare(a.version, b.version)


@dataclass(frozen=True)
class VersionInfo:
    """The running version, the other slot's, and whether an update was rolled back."""

    running: str
    #: The other slot's version as its UKI names it; None when it holds none.
    other: str | None
    #: The other's state: "good" (the fallback), "trying" (installed, boots next),
    #: "bad" (failed to become healthy) or "none".
    other_state: str
    #: Tries left of the UKI on trial: the other's when it is "trying", else the running
    #: one's while this boot is on trial; None when nothing is on trial.
    tries_left: int | None
    #: A newer version than the running one is marked bad: the box fell back to this one.
    rolled_back: bool
    #: The running version's own state: "good", or "trying" until boot-check blesses it.
    running_state: str = "good"
    #: Boots the bad version was tried (from its file name), for the words.
    tries_done: int | None = None

    def lines(self) -> list[str]:
        """The versions in words, one fact a line."""
        if self.running_state == "trying":
            left = f"; {self.tries_left} tr{'y' if self.tries_left == 1 else 'ies'} left" \
                if self.tries_left is not None and self.other_state != "trying" else ""
            out = [f"System version {self.running} (running, on trial until it is healthy{left})"]
        else:
            out = [f"System version {self.running} (running)"]
        if self.other is None:
            out.append("Other slot: empty")
        elif self.other_state == "good":
            out.append(f"Other slot: {self.other} (good, the fallback)")
        elif self.other_state == "trying":
            n = self.tries_left
            tries = f", {n} tr{'y' if n == 1 else 'ies'}" if n is not None else ""
            out.append(f"Other slot: {self.other} (installed, boots next{tries})")
        else:
            out.append(f"Other slot: {self.other} (failed to become healthy, not booted again)")
        if self.rolled_back and self.other is not None:
            boots = f" in {self.tries_done} boot{'s' if self.tries_done != 1 else ''}" if self.tries_done else ""
            out.append(f"Last update: version {self.other} failed to become healthy{boots}; the box rolled back "
                       f"to {self.running}")
        return out

    def status_line(self) -> str:
        """One short line for STATUS= and the console header."""
        line = f"version {self.running}"
        if self.running_state == "trying":
            line += " (on trial)"
        if self.rolled_back and self.other:
            line += f"; update to {self.other} failed, rolled back"
        elif self.other_state == "trying" and self.other:
            line += f"; {self.other} installed, boots next"
        return line


def version_info(esp: Path = ESP, os_release: Path = OS_RELEASE) -> VersionInfo:
    """The versions as the os-release and the ESP's file names say."""
    running = running_version(os_release)
    found = ukis(esp)
    mine = [u for u in found if u.version == running]
    others = [u for u in found if u.version != running]
    # One UKI per slot; should leftovers exist, the newest is the one systemd-boot would try.
    other = next((u for u in others if u.state != "bad"), others[0] if others else None)
    bad_newer = [u for u in others if u.state == "bad" and compare(u.version, running) > 0]
    if bad_newer and (other is None or other.state != "trying"):
        other = bad_newer[0]
    running_state = "trying" if mine and all(u.state == "trying" for u in mine) else "good"
    tries_left: int | None = None
    if other is not None and other.state == "trying":
        tries_left = other.left
    elif running_state == "trying":
        tries_left = mine[0].left
    return VersionInfo(
        running=running,
        other=other.version if other else None,
        other_state=other.state if other else "none",
        tries_left=tries_left,
        rolled_back=bool(bad_newer) and other is not None and other.state == "bad",
        running_state=running_state,
        tries_done=other.done if other is not None and other.state == "bad" else None,
    )


def counted_uki(esp: Path, efivars: Path) -> Path | None:
    """The running UKI on the ESP when this boot is counted (LoaderBootCountPath), else None."""
    var = efivars / BOOT_COUNT_VAR
    try:
        raw = var.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UpdateError(f"cannot read the EFI variable {var}: {exc.strerror}") from None
    # efivarfs: 4 bytes of attributes, then the value: a NUL-terminated UTF-16LE path.
    text = raw[4:].decode("utf-16-le", errors="replace").split("\0", 1)[0].strip()
    parts = [p for p in text.replace("\\", "/").split("/") if p]
    if not parts:
        return None
    return esp.joinpath(*parts)


def bless(esp: Path, efivars: Path) -> str | None:
    """Mark the running UKI good: rename the file the boot loader counts (named by the EFI
    variable) to ``appliance_<V>.efi``; return V, or None when the boot is not counted."""
    path = counted_uki(esp, efivars)
    if path is None:
        return None
    uki = parse_uki(path)
    if uki is None:
        raise UpdateError(f"the boot loader counts {path.name}, which is not an appliance UKI; nothing renamed")
    good = path.with_name(uki.good_name)
    if not path.exists():
        if good.exists():  # blessed already in this boot
            return uki.version
        raise UpdateError(f"the boot loader counts {path}, which is not on the ESP; nothing renamed")
    try:
        os.replace(path, good)
        fsync_dir(path.parent)
    except OSError as exc:
        raise UpdateError(f"cannot rename {path} to {good.name} on the ESP: {exc.strerror}") from None
    return uki.version


def systemctl_reboot() -> None:
    """Reboot the box through systemd."""
    subprocess.run(["systemctl", "reboot"], check=False, timeout=60)


def service_state(unit: str = "appliance.service") -> str:
    """``systemctl is-active`` of ``unit``: "active", "failed", "activating", ..."""
    try:
        done = subprocess.run(["systemctl", "is-active", unit], capture_output=True, text=True, timeout=30,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() or "unknown"


@dataclass(frozen=True)
class BootCheck:
    """The result of :func:`boot_check`."""

    version: str
    healthy: bool
    #: The boot was on trial (LoaderBootCountPath was set).
    counted: bool
    #: What was found, in words (the line that was logged).
    message: str


def boot_check(
    *,
    host: str,
    port: int,
    ae_title: str,
    data_dir: Path,
    esp: Path = ESP,
    efivars: Path = EFIVARS,
    os_release: Path = OS_RELEASE,
    timeout: float = BOOT_CHECK_TIMEOUT,
    interval: float = BOOT_CHECK_INTERVAL,
    echo_timeout: float = 5.0,
    state: Callable[[], str] = service_state,
    reboot: Callable[[], None] = systemctl_reboot,
) -> BootCheck:
    """Wait (at most ``timeout`` s) until the appliance service is active, the SCP at
    ``host``:``port`` answers C-ECHO and a store self-check in ``data_dir`` passes. Healthy and
    counted: bless the running UKI. Unhealthy and counted: log why and call ``reboot`` (the
    boot loader already counted the try). Not counted: only log the result."""
    # The supervisor's own checks (its echo's AE title is always a known peer), from below ops/,
    # which imports this module for the versions.
    from appliance.config import Destination
    from appliance.errors import ApplianceError
    from appliance.net.acceptor import SELF_CHECK_AE_TITLE
    from appliance.net.sender import ClientSettings
    from appliance.net.sender import echo as c_echo
    from appliance.store.disk import self_store

    def echo() -> str:
        try:
            c_echo(Destination(ae_title, host, port), ClientSettings(SELF_CHECK_AE_TITLE, timeout=echo_timeout))
        except ApplianceError as exc:
            return str(exc)
        return ""

    version = running_version(os_release)
    counted = counted_uki(esp, efivars) is not None
    deadline = time.monotonic() + timeout
    problem = "the appliance service did not start"
    while True:
        st = state()
        if st == "failed":
            problem = "the appliance service failed"
            break
        if st == "active":
            problem = echo()
            if problem:
                problem = f"the Storage SCP does not answer C-ECHO ({problem})"
            else:
                problem = self_store(data_dir, "health-check")
                if problem:
                    problem = f"the store self-check fails ({problem})"
            if not problem:
                break
        else:
            problem = f"the appliance service is {st}, not active"
        if time.monotonic() >= deadline:
            problem += f" after {timeout:g} s"
            break
        time.sleep(max(0.0, min(interval, deadline - time.monotonic())))
    if not problem:
        if counted:
            bless(esp, efivars)
            message = f"update: version {version} is healthy and marked good"
        else:
            message = f"update: version {version} is healthy (this boot is not on trial; nothing to mark)"
        log.info("%s", message)
        return BootCheck(version, True, counted, message)
    if counted:
        message = (f"update: version {version} is not healthy: {problem}; restarting, the boot loader has "
                   "counted this try and falls back to the other version when none are left")
        log.error("%s", message)
        reboot()
    else:
        message = f"update: version {version} is not healthy: {problem} (this boot is not on trial; no restart)"
        log.error("%s", message)
    return BootCheck(version, False, counted, message)
