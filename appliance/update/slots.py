"""The two root slots: which disk holds the running root, which slot runs and which may be
written. A slot's GPT name is ``appliance_<version>`` when it holds that version and
``_empty`` when it holds nothing usable; the running slot is the one named after the
running version, the inactive one is the other root partition.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from appliance.update import (
    EMPTY_LABEL,
    PREFIX,
    ROOT_TYPE,
    UpdateError,
    gpt,
    slot_label,
)

MOUNTINFO = Path("/proc/self/mountinfo")
SYS_DEV_BLOCK = Path("/sys/dev/block")


@dataclass(frozen=True)
class Slot:
    """A root partition and what its name says it holds."""

    partition: gpt.Partition
    #: "A" for the first root partition, "B" for the second.
    letter: str

    @property
    def version(self) -> str | None:
        name = self.partition.name
        return name[len(PREFIX):] if name.startswith(PREFIX) and name != EMPTY_LABEL else None

    @property
    def number(self) -> int:
        return self.partition.number


@dataclass(frozen=True)
class Slots:
    """The disk's two root slots, the running one and the one an update may write."""

    disk: Path
    running: Slot
    inactive: Slot


def root_device(mountinfo: Path = MOUNTINFO) -> str:
    """The "major:minor" of the device mounted at "/"."""
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError as exc:
        raise UpdateError(f"cannot read {mountinfo}: {exc.strerror}") from None
    found = None
    for line in lines:
        fields = line.split()
        if len(fields) > 4 and fields[4] == "/":
            found = fields[2]  # the last mount on "/" is the one in use
    if found is None:
        raise UpdateError(f"{mountinfo} shows nothing mounted at /")
    return found


def disk_of(devno: str, sys_dev_block: Path = SYS_DEV_BLOCK) -> tuple[Path, int]:
    """The whole disk (/dev/NAME) and partition number of block device ``devno`` (major:minor)."""
    node = sys_dev_block / devno
    try:
        real = node.resolve(strict=True)
        number = int((real / "partition").read_text())
    except FileNotFoundError:
        raise UpdateError(f"the root file system ({devno}) is not on a disk partition; this system cannot "
                          "be updated (was it started from the image?)") from None
    except (OSError, ValueError) as exc:
        raise UpdateError(f"cannot read {node}: {exc}") from None
    return Path("/dev") / real.parent.name, number


def partition_device(disk: Path, number: int, sys_class_block: Path = Path("/sys/class/block")) -> Path:
    """The device node of partition ``number`` of block device ``disk`` (sda3, nvme0n1p3)."""
    folder = sys_class_block / disk.name
    try:
        for child in folder.iterdir():
            part = child / "partition"
            if child.name.startswith(disk.name) and part.is_file() and int(part.read_text()) == number:
                return Path("/dev") / child.name
    except (OSError, ValueError):
        pass
    sep = "p" if disk.name[-1:].isdigit() else ""
    return disk.with_name(f"{disk.name}{sep}{number}")


def is_block(disk: Path) -> bool:
    """True when ``disk`` is a block device (else an image file, as in tests)."""
    try:
        return stat.S_ISBLK(os.stat(disk).st_mode)
    except OSError:
        return False


def root_slots(table: gpt.Table) -> list[Slot]:
    """The root partitions of ``table`` in partition order, lettered A, B."""
    parts = [p for p in table.partitions if p.type_guid == ROOT_TYPE]
    return [Slot(p, "AB"[i] if i < 2 else str(i + 1)) for i, p in enumerate(parts)]


def find_slots(disk: Path, running: str) -> Slots:
    """Read ``disk``'s table and name the running and the inactive root slot."""
    slots = root_slots(gpt.read(disk))
    if len(slots) != 2:
        raise UpdateError(f"{disk} has {len(slots)} root partition(s), not the two slots (A and B) an update "
                          "needs; this image was built without A/B slots")
    label = slot_label(running)
    mine = [s for s in slots if s.partition.name == label]
    if len(mine) != 1:
        names = ", ".join(f"{s.letter}: {s.partition.name or '(no name)'}" for s in slots)
        raise UpdateError(f"no single root slot on {disk} is named {label} after the running version "
                          f"({names}); cannot tell which slot runs, so nothing is written")
    other = next(s for s in slots if s is not mine[0])
    return Slots(disk, mine[0], other)


def running_disk(mountinfo: Path = MOUNTINFO, sys_dev_block: Path = SYS_DEV_BLOCK) -> Path:
    """The disk holding the running root file system."""
    disk, _ = disk_of(root_device(mountinfo), sys_dev_block)
    return disk
