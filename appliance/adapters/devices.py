"""Adapter to udev (pyudev): the only module that imports pyudev.

pyudev devices are turned into :class:`MediaEvent` here, at the edge, and never passed on.
What counts (and what ``udev/60-appliance-media.rules`` tags):

* an optical drive (``ID_CDROM=1``) whose medium holds an ISO 9660 file system
  (``ID_CDROM_MEDIA=1``, ``ID_FS_TYPE=iso9660``): a CD to import. QEMU and real drives send
  two ``change`` events per insert (tray open and close); the media jobs drop the duplicate.
  A ``change`` without ``ID_CDROM_MEDIA`` is the disc going away.
* a USB mass-storage block device (``ID_BUS=usb``) carrying a file system: a partition
  (``sda1``) or a whole disk formatted without a partition table (``sda``). A disk with a
  partition table is not an event; its partitions are. Nor is the phantom ``sda1`` the
  kernel finds in the FAT boot sector of a stick without a partition table.

:class:`MediaWatcher` enumerates the block devices at start (a CD inserted before boot is
still imported), then monitors; its callback only hands the event on.
"""

from __future__ import annotations

import enum
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

import pyudev

log = logging.getLogger(__name__)

#: The tag our udev rules put on devices the appliance cares about.
UDEV_TAG = "appliance_media"
_USB_FILESYSTEMS = frozenset({"vfat", "exfat", "ntfs", "ext4", "ext3", "ext2"})


class MediumKind(enum.StrEnum):
    CD = "cd"
    USB = "usb"


class Change(enum.StrEnum):
    """What happened to the medium."""

    INSERTED = "inserted"  # also: present at start-up
    REMOVED = "removed"


@dataclass(frozen=True)
class MediaEvent:
    """A medium arrived in or left a drive or port."""

    kind: MediumKind
    change: Change
    #: The block device to read or write, e.g. ``/dev/sr0`` or ``/dev/sda1``.
    device: str
    #: File system type and label (empty when removed).
    fs_type: str = ""
    label: str = ""
    #: What identifies this medium (file system UUID, serial): a repeat of the same
    #: identity in the same device is the same insertion.
    identity: str = ""

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.device}"


class UdevDevice(Protocol):
    """The parts of a ``pyudev.Device`` this adapter reads (tests hand-build these)."""

    @property
    def action(self) -> str | None: ...

    @property
    def device_node(self) -> str | None: ...

    @property
    def properties(self) -> Mapping[str, str]: ...


def media_event(device: UdevDevice) -> MediaEvent | None:
    """The :class:`MediaEvent` a udev device event means, or None when it is not ours."""
    p = device.properties
    node = device.device_node or p.get("DEVNAME")
    action = device.action or "add"  # enumeration gives no action: the device is present
    if not node or p.get("SUBSYSTEM", "block") != "block":
        return None
    if p.get("ID_CDROM") == "1" or p.get("DEVTYPE") == "disk" and node.startswith("/dev/sr"):
        if action == "remove" or p.get("ID_CDROM_MEDIA") != "1":
            return MediaEvent(MediumKind.CD, Change.REMOVED, node)
        if p.get("ID_FS_TYPE") != "iso9660":
            log.info("disc in %s has no ISO 9660 file system (%s); not importing it",
                     node, p.get("ID_FS_TYPE") or "audio or blank")
            return None
        return MediaEvent(MediumKind.CD, Change.INSERTED, node, "iso9660", p.get("ID_FS_LABEL", ""),
                          _identity(p))
    if p.get("ID_BUS") == "usb" and p.get("DEVTYPE") in ("disk", "partition"):
        if action == "remove":
            return MediaEvent(MediumKind.USB, Change.REMOVED, node)
        if action not in ("add", "change"):
            return None
        fs = p.get("ID_FS_TYPE", "")
        if p.get("ID_FS_USAGE") != "filesystem" or fs not in _USB_FILESYSTEMS:
            return None  # a partition table, an empty stick, swap, LUKS: nothing to write to
        if p.get("DEVTYPE") == "partition" and not p.get("ID_PART_ENTRY_SCHEME"):
            # A stick formatted whole (no partition table) often has a FAT boot sector whose
            # bytes the kernel also reads as a partition table: it then shows the same file
            # system twice, as sda and as a "partition" sda1 starting at sector 0. blkid
            # knows a FAT boot sector is no partition table, so sda1 has no partition entry
            # (ID_PART_ENTRY_SCHEME); the file system is exported once, through sda.
            log.debug("%s is a phantom partition of a stick without a partition table; ignored", node)
            return None
        return MediaEvent(MediumKind.USB, Change.INSERTED, node, fs, p.get("ID_FS_LABEL", ""), _identity(p))
    return None


def _identity(p: Mapping[str, str]) -> str:
    return "/".join(p.get(k, "") for k in ("ID_SERIAL", "ID_FS_UUID", "ID_FS_LABEL"))


class MediaWatcher:
    """Reports media events to ``on_event`` from a background thread until :meth:`stop`.

    ``on_event`` must only enqueue: it runs on the watcher's thread."""

    def __init__(self, on_event: Callable[[MediaEvent], object]) -> None:
        self.on_event = on_event
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def handle(self, device: UdevDevice) -> MediaEvent | None:
        """Convert one udev device and pass it on; the boundary tests drive directly."""
        event = media_event(device)
        if event is not None:
            taken = self.on_event(event)
            # udev repeats "change" events for a medium already seen; the queue says False
            # for those, and they stay out of the journal an admin reads.
            repeated = taken is False and event.change is Change.INSERTED
            log.log(logging.DEBUG if repeated else logging.INFO, "%s %s in %s (%s '%s')",
                    event.kind, event.change, event.device, event.fs_type, event.label)
        return event

    def start(self) -> None:
        """Open the udev monitor, enumerate what is present, then watch in a thread.

        Raises OSError when udev's netlink socket cannot be opened."""
        context = pyudev.Context()
        monitor = pyudev.Monitor.from_netlink(context)
        monitor.filter_by("block")
        monitor.start()  # before enumerating, so nothing inserted in between is missed
        for device in context.list_devices(subsystem="block"):
            self.handle(device)
        self._thread = threading.Thread(target=self._run, args=(monitor,), name="media-watcher", daemon=True)
        self._thread.start()

    def _run(self, monitor: Any) -> None:
        try:
            while not self._stop.is_set():
                device = monitor.poll(timeout=0.5)
                if device is not None:
                    self.handle(device)
        except BaseException as exc:  # noqa: BLE001 - the supervisor sees it and restarts us
            log.exception("media watcher failed")
            self.error = exc

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
