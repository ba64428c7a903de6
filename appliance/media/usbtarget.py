"""Where a USB export is written: a mounted folder, a USB block device, or a FAT image file.

:func:`open_medium` picks the kind from what the target path is. A block device is only
used after sysfs says it is a removable USB disk (:func:`removable_usb_refusal`); the
appliance mounts it and unmounts it. A FAT image file is written in userspace with mtools,
for machines whose kernel has no vfat (such as CI). Each medium reports its free space and
cluster size, so the exporter can check before it writes (``appliance.media.exporter``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from appliance.errors import MediaError


@dataclass(frozen=True)
class Space:
    free: int
    cluster: int


class Medium(Protocol):
    """Where the file-set is written. ``root`` is a local folder holding the file-set (the
    mounted stick itself, or a staging copy of a FAT image's content)."""

    root: Path
    label: str

    def space(self) -> Space: ...

    def check(self) -> None:
        """Raise OSError if the medium is gone (a pulled stick)."""

    def commit(self, file_ids: list[str], new_dirs: list[str]) -> None:
        """Make the files written under ``root`` durable on the medium."""

    def read_back(self, file_id: str) -> bytes: ...

    def close(self) -> str:
        """Sync and release the medium; return a note for the report ("" if none)."""


class FolderMedium:
    """A mounted file system (or any folder): written in place."""

    def __init__(self, root: Path, label: str | None = None) -> None:
        try:
            st = root.stat()
        except OSError as exc:
            raise MediaError(f"cannot use {root} as the USB target: {exc.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise MediaError(f"{root} is not a folder")
        if not os.access(root, os.W_OK):
            raise MediaError(f"{root} is not writable (read-only stick, or no permission)")
        self.root = root
        self.label = label or str(root)
        self._dev = st.st_dev

    def space(self) -> Space:
        st = os.statvfs(self.root)
        return Space(st.f_bavail * st.f_frsize, max(st.f_bsize, 512))

    def check(self) -> None:
        if os.stat(self.root).st_dev != self._dev:  # unmounted under us: never write to the mount point
            raise OSError(errno.ENODEV, "the stick's file system is no longer mounted")

    def commit(self, file_ids: list[str], new_dirs: list[str]) -> None:
        pass  # written in place, each file fsynced

    def read_back(self, file_id: str) -> bytes:
        with open(self.root / file_id, "rb") as f:
            with contextlib.suppress(OSError):  # read the medium, not the page cache
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            return f.read()

    def close(self) -> str:
        os.sync()
        return ""


def removable_usb_refusal(major: int, minor: int, sysfs: Path = Path("/sys")) -> str | None:
    """Return why block device ``major:minor`` is not a removable USB disk, or None if it is."""
    try:
        node = (sysfs / "dev" / "block" / f"{major}:{minor}").resolve(strict=True)
    except OSError:
        return "sysfs knows no such block device"
    disk = node.parent if (node / "partition").exists() else node
    reasons = []
    try:
        if (disk / "removable").read_text().strip() != "1":
            reasons.append("it is not removable")
    except OSError:
        reasons.append("sysfs does not say whether it is removable")
    try:
        if "/usb" not in str((disk / "device").resolve(strict=True)):
            reasons.append("it is not on a USB bus")
    except OSError:
        reasons.append("sysfs does not say which bus it is on")
    return " and ".join(reasons) or None


class BlockDeviceMedium(FolderMedium):
    """A USB stick's partition (or whole disk): checked in sysfs, mounted, unmounted on close."""

    def __init__(self, device: Path, sysfs: Path = Path("/sys")) -> None:
        st = device.stat()
        refusal = removable_usb_refusal(os.major(st.st_rdev), os.minor(st.st_rdev), sysfs)
        if refusal:
            raise MediaError(f"{device} is not a removable USB disk ({refusal}); the appliance only "
                             "writes to USB sticks")
        self.device = device
        self.mountpoint = Path(tempfile.mkdtemp(prefix="appliance-usb-"))
        done = subprocess.run(["mount", "-o", "nosuid,nodev,noexec", str(device), str(self.mountpoint)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            self.mountpoint.rmdir()
            raise MediaError(f"cannot mount {device}: {done.stderr.strip() or 'mount failed'}; the stick "
                             "needs a FAT32, exFAT or ext4 file system")
        super().__init__(self.mountpoint, str(device))

    def close(self) -> str:
        with contextlib.suppress(OSError):
            os.sync()
        done = subprocess.run(["umount", str(self.mountpoint)], capture_output=True, text=True)
        if done.returncode != 0:  # a pulled stick: detach what is left
            subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)
            with contextlib.suppress(OSError):
                self.mountpoint.rmdir()
            raise MediaError(f"cannot unmount {self.device}: {done.stderr.strip()}")
        self.mountpoint.rmdir()
        return f"unmounted {self.device}"


class FatImageMedium:
    """A FAT image file written in userspace with mtools (no kernel vfat needed).

    The image's content is copied to a local staging folder (so pydicom can load an existing
    DICOMDIR), files are written there, then copied into the image and read back from it."""

    def __init__(self, image: Path) -> None:
        self.image = image
        self.label = str(image)
        info = self._mtools("minfo", "::")
        sector = re.search(r"sector size: (\d+) bytes", info)
        cluster = re.search(r"cluster size: (\d+) sectors", info)
        if not sector or not cluster:
            raise MediaError(f"{image} is not a FAT image that mtools can read")
        self._cluster = int(sector.group(1)) * int(cluster.group(1))
        self.root = Path(tempfile.mkdtemp(prefix="appliance-fat-"))
        if self._mtools("mdir", "-b", "::", check=False).strip():
            self._mtools("mcopy", "-s", "-n", "-m", "-Q", "::/*", str(self.root))

    def _mtools(self, tool: str, *args: str, check: bool = True, binary: bool = False) -> str:
        done = subprocess.run([tool, "-i", str(self.image), *args], capture_output=True)
        if check and done.returncode != 0:
            raise OSError(errno.EIO, f"{tool} failed on {self.image}: {done.stderr.decode('utf-8', 'replace').strip()}")
        return done.stdout if binary else done.stdout.decode("utf-8", "replace")  # type: ignore[return-value]

    def space(self) -> Space:
        m = re.search(r"([\d ]+) bytes free", self._mtools("mdir", "::"))
        if not m:
            raise MediaError(f"mtools does not say how much space {self.image} has free")
        return Space(int(m.group(1).replace(" ", "")), self._cluster)

    def check(self) -> None:
        os.stat(self.image)

    def commit(self, file_ids: list[str], new_dirs: list[str]) -> None:
        for d in new_dirs:
            if self._mtools("mdir", "-b", f"::/{d}", check=False).strip() == "":
                self._mtools("mmd", "-D", "s", f"::/{d}")
        by_dir: dict[str, list[str]] = {}
        for fid in file_ids:
            by_dir.setdefault(str(Path(fid).parent), []).append(str(self.root / fid))
        for d, paths in by_dir.items():
            self._mtools("mcopy", "-o", "-n", *paths, "::/" + ("" if d == "." else d + "/"))
        with open(self.image, "rb+") as f:
            os.fsync(f.fileno())

    def read_back(self, file_id: str) -> bytes:
        return self._mtools("mcopy", "-n", f"::/{file_id}", "-", binary=True)  # type: ignore[return-value]

    def close(self) -> str:
        shutil.rmtree(self.root, ignore_errors=True)
        return ""


def open_medium(target: Path) -> Medium:
    """Open ``target``: a folder, a USB block device (checked and mounted) or a FAT image."""
    try:
        mode = target.stat().st_mode
    except OSError as exc:
        raise MediaError(f"cannot use {target} as the USB target: {exc.strerror}") from None
    if stat.S_ISDIR(mode):
        return FolderMedium(target)
    if stat.S_ISBLK(mode):
        return BlockDeviceMedium(target)
    if stat.S_ISREG(mode):
        return FatImageMedium(target)
    raise MediaError(f"{target} is neither a folder, a USB block device nor a FAT image file")
