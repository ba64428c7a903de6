"""The file-system steps the store shares: an OSError as a StoreError, a directory's fsync
(:func:`appliance.files.fsync_dir`, re-exported), free space, and the temp file that is
removed when storing ends."""

from __future__ import annotations

import errno
import itertools
import logging
import os
import shutil
import threading
from pathlib import Path

from appliance.errors import StoreDiskError, StoreError, StoreFullError
from appliance.files import fsync_dir as fsync_dir  # re-exported for the store's modules

log = logging.getLogger(__name__)

#: The first words of a refusal are what the sender sees (an Error Comment holds 64 characters).
FULL = "the disk is full; nothing was stored. Free space to resume"


def store_error(exc: OSError, what: str) -> StoreError:
    """The StoreError for ``exc`` met while storing: StoreFullError for a full disk,
    StoreDiskError for an I/O error or a read-only disk."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreFullError(FULL)
    if exc.errno == errno.EROFS:
        return StoreDiskError(f"the disk is read-only; nothing was stored. Check the disk ({what}: the system "
                              "makes the store's disk read-only after disk errors)")
    if exc.errno == errno.EIO:
        return StoreDiskError(f"the disk reports I/O errors; nothing was stored. Check the disk ({what})")
    return StoreError(f"{what}: {exc.strerror}")


def remedy(exc: StoreError) -> str:
    """What the operator does about ``exc``: "Free space" or "Check the disk"."""
    return "Free space" if isinstance(exc, StoreFullError) else "Check the disk"


def file_fsync_commits_rename(path: Path) -> bool:
    """True if ``path`` is on a file system where fsync of a file renamed into a folder
    also makes that rename durable, so the folder's own fsync can be left out.

    That is ext4 with its journal (the appliance's data partition): ext4's fsync commits
    the journal transaction that holds the file's last change, and a rename changes the
    renamed file's inode (its ctime) in the same transaction as the folder entries, so the
    one commit carries data, inode and name (a power-cut test in QEMU, tests/test_image.py,
    checks it on the image). A journal shows as ``/proc/fs/jbd2/<device>-8``. Anything
    else, or any doubt (ext4 without a journal, as some VMs' root, another file system, a
    journal on another device), answers False: the folder is fsynced as well."""
    try:
        dev = os.stat(path).st_dev
        major, minor = os.major(dev), os.minor(dev)
        fstype = ""
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) > 2 and fields[2] == f"{major}:{minor}" and " - " in line:
                    fstype = line.split(" - ", 1)[1].split()[0]
        if fstype != "ext4":
            return False
        uevent = Path(f"/sys/dev/block/{major}:{minor}/uevent").read_text(encoding="utf-8", errors="replace")
        names = [v for k, _, v in (x.partition("=") for x in uevent.splitlines()) if k == "DEVNAME"]
        return bool(names) and Path(f"/proc/fs/jbd2/{names[0].replace('/', '!')}-8").is_dir()
    except (OSError, ValueError):
        return False


def process_running(pid: int) -> bool:
    """True if a process with ``pid`` is running (one of another user's counts too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_temp(tmp: Path) -> None:
    """Remove the temp file ``tmp`` if it is there; a failure is left to the next start,
    which empties ``tmp/``."""
    try:
        tmp.unlink(missing_ok=True)
    except OSError as exc:
        log.debug("cannot remove %s: %s", tmp, exc.strerror)


def free_bytes(path: Path) -> int:
    """Free bytes for unprivileged writers on the file system holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def disk_usage_percent(path: Path) -> float:
    """How full the file system holding ``path`` is, in percent, counting as used what the
    appliance cannot write to (the blocks reserved for root too): the figure the free-space
    watermark and retention's marks are measured against, so status, retention and the
    refusals speak of one number."""
    u = shutil.disk_usage(path)
    return 100.0 * (u.total - u.free) / u.total if u.total else 0.0


def store_error_words(exc: OSError) -> str:
    """What an error writing the store means, in words (a full disk starts "store full")."""
    if exc.errno == errno.ENOSPC:
        return "store full (no space left on the disk)"
    if exc.errno == errno.EROFS:
        return "store degraded: its file system is read-only"
    if exc.errno == errno.EIO:
        return "store degraded: input/output error (disk failing?)"
    return f"store not writable: {exc.strerror}"


#: Numbers the self-stores of this process (see :func:`self_store`).
_SELF_STORES = itertools.count()


def self_store(data_dir: Path, name: str = "self-store") -> str:
    """Store a small file the way an object is stored (temp file in ``tmp/``, write,
    fsync, rename into ``scratch/``, fsync of the folder), then remove it; return "" or
    what went wrong, in words. ``scratch/`` is never indexed or exported. Safe to run from
    several threads at once (the supervisor's periodic check and a status request): each
    call has its own file names."""
    scratch = data_dir / "scratch"
    unique = f"{os.getpid()}-{threading.get_ident()}-{next(_SELF_STORES)}-{name}"
    tmp = data_dir / "tmp" / f"{unique}.part"
    final = scratch / f"{unique}.dcm"
    try:
        scratch.mkdir(exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"\0" * 128 + b"DICM" + b"self-store of the Storage SCP\n" * 128)
            os.replace(tmp, final)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(scratch)
        final.unlink()
        return ""
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        final.unlink(missing_ok=True)
        return store_error_words(exc)
