"""Where bench-scp's receivers write: by default a journaled ext4 made the way systemd-repart
makes the image's data partition, in a sparse image file loop-mounted for the run and gone
after it (unmounted and removed in a ``finally``, so also on a failed run, Ctrl-C or SIGTERM);
with ``--fs root``, a folder on whatever file system holds the work directory."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

#: mkfs.ext4 as systemd-repart (257, the image's tools tree) runs it for a Format=ext4
#: partition (image/mkosi.repart/20-data.conf): 256-byte inodes, no blocks reserved for root,
#: 4 KiB blocks, the "default" usage type, ext4's default features (has_journal among them).
#: One difference: repart asks for lazy_itable_init=1, so the box's kernel zeroes the inode
#: tables in the background after its first boot; here mkfs does it (and the journal) at once,
#: so that this background writing does not land inside the timed runs.
MKFS_EXT4 = (
    *(
        "mkfs.ext4",
        "-q",
        "-F",
        "-L",
        "bench-scp",
        "-I",
        "256",
        "-m",
        "0",
        "-b",
        "4096",
        "-T",
        "default",
    ),
    *("-E", "discard,lazy_itable_init=0,lazy_journal_init=0"),
)
#: The data partition's mount options in the image (etc/fstab: defaults,noatime), so
#: data=ordered journalling, barriers on.
MOUNT_OPTIONS = "noatime"
DEFAULT_SIZE_GB = 4
UNMOUNT_TIMEOUT = 20.0


class FsUnavailable(Exception):
    """The ext4 image could not be made or mounted here (it is left cleaned up)."""


@dataclass
class WorkFs:
    """The folder receivers write under, and what it is."""

    path: Path
    kind: str  # "ext4" (a loop-mounted image) or "root"
    description: str
    image: Path | None = None  # the image file, for "ext4"
    _holder: Path | None = None  # the folder holding the image and the mount point

    @classmethod
    def root(cls, parent: Path | None) -> WorkFs:
        """A new folder under ``parent`` (or $TMPDIR), on the file system that holds it."""
        path = Path(tempfile.mkdtemp(prefix="bench-scp-", dir=parent))
        return cls(path, "root", f"root file system ({_fs_of(path)}), {path}", _holder=path)

    @classmethod
    def ext4(cls, parent: Path | None, size_gb: int) -> WorkFs:
        """A ``size_gb`` GB sparse image under ``parent`` (or $TMPDIR), made with
        :data:`MKFS_EXT4` and loop-mounted; raise :class:`FsUnavailable` if that fails."""
        if os.geteuid() != 0:
            raise FsUnavailable("mounting an image needs root")
        if shutil.which(MKFS_EXT4[0]) is None:
            raise FsUnavailable(f"{MKFS_EXT4[0]} not found (apt-get install e2fsprogs)")
        holder = Path(tempfile.mkdtemp(prefix="bench-scp-ext4-", dir=parent))
        image, mount_point = holder / "data.ext4", holder / "mnt"
        try:
            with open(image, "wb") as f:
                f.truncate(size_gb * 10**9)
            mount_point.mkdir()
            _run([*MKFS_EXT4, str(image)])
            _run(["mount", "-t", "ext4", "-o", f"loop,{MOUNT_OPTIONS}", str(image), str(mount_point)])
        except (FsUnavailable, OSError) as exc:
            shutil.rmtree(holder, ignore_errors=True)
            raise FsUnavailable(str(exc)) from None
        except BaseException:  # Ctrl-C while mkfs or mount ran: leave nothing behind
            if os.path.ismount(mount_point):
                subprocess.run(["umount", "--lazy", str(mount_point)], capture_output=True, check=False)
            shutil.rmtree(holder, ignore_errors=True)
            raise
        description = (
            f"ext4 image, {size_gb} GB sparse, loop-mounted at {mount_point} "
            f"({' '.join(MKFS_EXT4[:1] + MKFS_EXT4[2:])}; mount -o {MOUNT_OPTIONS}), "
            f"the image on {_fs_of(holder)}"
        )
        return cls(mount_point, "ext4", description, image=image, _holder=holder)

    def close(self, keep: bool = False) -> None:
        """Unmount the image (lazily if still busy after UNMOUNT_TIMEOUT) and remove the
        folder; with ``keep``, leave the unmounted image file (or the root folder) behind."""
        if self.kind == "ext4" and os.path.ismount(self.path):
            deadline = time.monotonic() + UNMOUNT_TIMEOUT
            while subprocess.run(["umount", str(self.path)], capture_output=True, check=False).returncode != 0:
                if time.monotonic() > deadline:
                    subprocess.run(
                        ["umount", "--lazy", str(self.path)],
                        capture_output=True,
                        check=False,
                    )
                    break
                time.sleep(0.2)
        if keep:
            if self.image is not None:
                with contextlib.suppress(OSError):
                    self.path.rmdir()
            print(f"  kept {self.image or self.path}", file=sys.stderr)
            return
        if self._holder is not None:
            shutil.rmtree(self._holder, ignore_errors=True)


def _run(argv: list[str]) -> None:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FsUnavailable(f"{argv[0]}: {exc}") from None
    if r.returncode != 0:
        raise FsUnavailable(f"{' '.join(argv[:1])} exited with {r.returncode}: {(r.stderr or r.stdout).strip()}")


def _fs_of(path: Path) -> str:
    """The type and device of the file system holding ``path``, from /proc/self/mounts."""
    best = ("?", "?", "")
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return "?"
    resolved = str(path.resolve())
    for line in lines:
        device, mount_point, fstype = line.split()[:3]
        mount_point = mount_point.replace("\\040", " ")
        inside = resolved == mount_point or resolved.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best[2]):
            best = (fstype, device, mount_point)
    return f"{best[0]} on {best[1]}"
