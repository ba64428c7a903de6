"""Factory reset: the data partition formatted anew, then a reboot into the running system.

Everything the box keeps is on the data partition (``/var/lib/appliance``: the store, its
index, the configuration, the TLS keys, the audit trail); the system slots and the ESP are
not touched. The reset is behind two checks, made by :meth:`FactoryReset.check`: the word
:data:`CONFIRM_WORD` typed, and the service (root) password checked against ``/etc/shadow``
(a root without a password is refused: there is nobody to check). Then
:meth:`FactoryReset.run` stops the appliance, unmounts the partition, formats it as
systemd-repart formats the image's (image/mkosi.repart/20-data.conf; the GPT partition label
``appliance-data``, which fstab mounts by, is left as it is) and reboots, saying each step.
A step that fails stops the reset there: before the format the appliance is started again
and nothing is lost.

The commands go through ``runner``, and the device, mount point and shadow file are
parameters, so tests format a file image with the real ``mkfs.ext4``.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import ApplianceError

log = logging.getLogger(__name__)

with warnings.catch_warnings():  # crypt is deprecated from Python 3.11 on; Debian 12 has 3.11
    warnings.simplefilter("ignore", DeprecationWarning)
    import crypt as _crypt

#: The data partition, by its GPT partition label (what fstab mounts), and where it is mounted.
DATA_DEVICE = Path("/dev/disk/by-partlabel/appliance-data")
DATA_MOUNT = Path("/var/lib/appliance")
SHADOW = Path("/etc/shadow")
#: What the person types to confirm.
CONFIRM_WORD = "ERASE"
#: The units that write the data partition: the appliance, and the sends started on the console
#: (transient units ``appliance-send-...``, :func:`appliance.jobs.sendjob.detached`).
UNITS = ("appliance.service", "appliance-send-*.service")
#: As systemd-repart makes the image's data partition (ext4, 256-byte inodes, no reserved
#: blocks, 4 KiB blocks), with the file system label it gives it.
MKFS = ("mkfs.ext4", "-F", "-q", "-L", "appliance-data", "-I", "256", "-m", "0", "-b", "4096", "-T", "default")
#: The folders the image's data partition starts with, and their modes: the configuration's
#: (``/etc/appliance`` links to it). systemd makes ``/var/lib/appliance`` itself (StateDirectory).
SKELETON = (("config", 0o750),)

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def run_command(cmd: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``, capturing its output; a format of a big disk may take minutes."""
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=900, check=False)


class ResetError(ApplianceError):
    """The factory reset was refused, or a step of it failed (said in words)."""


def root_hash(shadow: Path = SHADOW) -> str:
    """Root's password hash in ``shadow``; "" when root has none (empty, ``*``, locked ``!``)."""
    try:
        lines = shadow.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ResetError(f"cannot read {shadow} to check the service password: {exc.strerror or exc} "
                         "(the console runs as root on the box)") from None
    for line in lines:
        if line.startswith("root:"):
            pw = line.split(":")[1]
            return "" if pw in ("", "*") or pw.startswith("!") else pw
    return ""


def check_password(password: str, shadow: Path = SHADOW) -> None:
    """Raise ResetError unless ``password`` is root's password in ``shadow``."""
    hashed = root_hash(shadow)
    if not hashed:
        raise ResetError("the box has no service (root) password, so nobody can confirm a factory reset; set one "
                         "first (the menu offers it at its start, or passwd in the service shell)")
    got = _crypt.crypt(password, hashed)
    if got is None:
        raise ResetError(f"the service password's hash in {shadow} is of a kind this system cannot check")
    if not hmac.compare_digest(got, hashed):
        raise ResetError("wrong service password: nothing was erased")


@dataclass(frozen=True)
class FactoryReset:
    """The data partition ``device`` mounted at ``mountpoint``, formatted through ``runner``."""

    device: Path = DATA_DEVICE
    mountpoint: Path = DATA_MOUNT
    shadow: Path = SHADOW
    runner: Runner = run_command
    systemctl: tuple[str, ...] = ("systemctl",)

    def check(self, word: str, password: str) -> None:
        """Raise ResetError unless ``word`` is :data:`CONFIRM_WORD` and ``password`` root's."""
        if word != CONFIRM_WORD:
            raise ResetError(f"the confirmation was '{word}', not {CONFIRM_WORD}: nothing was erased")
        check_password(password, self.shadow)

    def run(self, say: Callable[[str], None]) -> None:
        """Stop the appliance, unmount and format the data partition, reboot; ``say`` each step.
        Raise ResetError at the first step that fails (the appliance is started again when the
        partition was not formatted yet)."""
        say(f"1/4 Stopping the appliance ({', '.join(UNITS)})...")
        self._step([*self.systemctl, "stop", *UNITS], "stop the appliance")
        say(f"2/4 Unmounting the data partition from {self.mountpoint}...")
        try:
            self._step(["umount", str(self.mountpoint)], f"unmount {self.mountpoint} (a program still uses it?)")
        except ResetError:
            self._restart(say)
            raise
        say(f"3/4 Formatting the data partition {self.device} (ext4, label appliance-data)...")
        try:
            with tempfile.TemporaryDirectory(prefix="appliance-reset-") as skel:
                Path(skel).chmod(0o755)
                for name, mode in SKELETON:
                    (Path(skel) / name).mkdir(mode=mode)
                    (Path(skel) / name).chmod(mode)
                self._step([*MKFS, "-d", skel, str(self.device)], f"format {self.device}")
        except ResetError:
            say("The data partition is not formatted. Reboot the box: it mounts it again as it was.")
            raise
        log.warning("factory reset: %s formatted; the store, the configuration, the keys and the audit trail "
                    "are gone", self.device)
        say("4/4 Rebooting into this system version with the default configuration...")
        self._step([*self.systemctl, "reboot"], "reboot (the data partition is formatted: reboot the box)")

    def _restart(self, say: Callable[[str], None]) -> None:
        say("Nothing was erased; starting the appliance again.")
        with contextlib.suppress(ResetError):
            self._step([*self.systemctl, "start", "appliance.service"], "start the appliance")

    def _step(self, cmd: Sequence[str], what: str) -> None:
        try:
            r = self.runner(cmd)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ResetError(f"cannot {what}: {' '.join(cmd)}: {exc}") from None
        if r.returncode != 0:
            why = (r.stderr or r.stdout or "").strip().splitlines()
            raise ResetError(f"cannot {what}: {cmd[0]} answered {why[-1] if why else f'exit code {r.returncode}'}")


__all__ = ["CONFIRM_WORD", "DATA_DEVICE", "FactoryReset", "ResetError", "check_password"]
