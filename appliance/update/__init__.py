"""Updating the box (issue 21): A/B root slots, signed releases, boot counting and blessing.

Debian 12's systemd 252 ships neither systemd-sysupdate nor (outside the ``systemd-boot``
package) systemd-bless-boot, so this package is a small equivalent with sysupdate's transfer
semantics: verify everything, write only the inactive slot, commit by renaming last.
systemd-boot does the boot counting. The design is in the contract of issue 21: the disk
(:mod:`~appliance.update.gpt`, :mod:`~appliance.update.slots`), the release
(:mod:`~appliance.update.release`), installing (:mod:`~appliance.update.install`), blessing
and version information (:mod:`~appliance.update.boot`) and the request files the sandboxed
service writes for the root-run installer (:mod:`~appliance.update.request`).
"""

from __future__ import annotations

from pathlib import Path

from appliance.errors import ApplianceError


class UpdateError(ApplianceError):
    """An update cannot be checked, installed or blessed; the message is for an IT admin."""


#: Trusted public keys (Ed25519, PEM): any one of them may sign a release.
KEYS_DIR = Path("/usr/share/appliance/update-keys")
#: Where the EFI system partition is mounted.
ESP = Path("/efi")
#: The efivarfs mount.
EFIVARS = Path("/sys/firmware/efi/efivars")
#: The running system's os-release (IMAGE_VERSION is the running version).
OS_RELEASE = Path("/etc/os-release")
#: Request, offer and progress files (tmpfiles: 0750 root:appliance).
RUN_DIR = Path("/run/appliance-update")
#: The folder at a USB stick's root that holds a release.
STICK_FOLDER = "appliance-update"

#: The GPT partition type of a root slot (root-x86-64).
ROOT_TYPE = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709"
#: The label of a slot that holds nothing usable.
EMPTY_LABEL = "_empty"
#: The label prefix of a slot (and UKI) that holds a version.
PREFIX = "appliance_"


def slot_label(version: str) -> str:
    """The GPT partition name of the slot holding ``version``."""
    return f"{PREFIX}{version}"


def running_version(os_release: Path = OS_RELEASE) -> str:
    """IMAGE_VERSION from ``os_release``; raise UpdateError when it is not there."""
    try:
        text = os_release.read_text(encoding="utf-8")
    except OSError as exc:
        raise UpdateError(f"cannot read {os_release}: {exc.strerror}; the running version is unknown") from None
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "IMAGE_VERSION":
            value = value.strip().strip("\"'")
            if value:
                return value
    raise UpdateError(f"{os_release} names no IMAGE_VERSION; this system was not built as an updatable image")
