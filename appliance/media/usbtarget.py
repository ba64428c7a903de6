"""Where a USB export is written: a mounted folder, a USB block device, or a FAT image file.

:func:`open_medium` picks the kind from what the target path is. A block device is only
used after sysfs says it is a removable USB disk (:func:`removable_usb_refusal`); the
appliance mounts it and unmounts it. A FAT image file is written in userspace with mtools,
for machines whose kernel has no vfat (such as CI). Each medium reports its free space and
cluster size, so the exporter can check before it writes (``appliance.media.exporter``).

The exporter pays for durability per window of files, not per file: it reserves the next
files (:meth:`Medium.reserve`: empty files, made while nothing is being flushed), hands
files to :meth:`Medium.write` (not yet durable), makes a window of them durable with one
:meth:`Medium.flush` (one syncfs, or one fsync of the image), has the medium read them back
(:meth:`Medium.read_back`) while it writes the next window, and only then writes the
DICOMDIR with :meth:`Medium.replace` (durable, and atomic where the file system allows).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import mmap
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy

from appliance.errors import MediaError


#: How many files a folder medium reads ahead (and keeps open) when it starts reading back.
READ_AHEAD_FILES = 256
#: What a read that bypasses the page cache (O_DIRECT) is aligned to: its buffer, offset
#: and length (a multiple of any logical block size a stick has).
DIRECT_ALIGN = 4096
#: How many bytes of files a FAT image medium stages before it copies them into the image.
FAT_BATCH_BYTES = 8 * 2**20


@dataclass(frozen=True)
class Space:
    free: int
    cluster: int


class Medium(Protocol):
    """Where the file-set is written. ``root`` is a local folder holding the stick's DICOMDIR
    (if it has one) and its folders: the mounted stick itself, or a copy of a FAT image's."""

    root: Path
    label: str

    def space(self) -> Space: ...

    def check(self) -> None:
        """Raise OSError if the medium is gone (a pulled stick)."""

    def write(self, file_id: str, data: bytes | memoryview) -> None:
        """Write one file (``DICOM/ST.../IM...``; its folders are made as needed, never where
        a stick that is gone was). It is not durable before :meth:`flush`, and a half-written
        one may be left if the medium fails."""

    def reserve(self, file_ids: list[str]) -> None:
        """Make these files, empty, where none is yet, so that writing them changes no
        folder (where a folder is being flushed, making a file in it waits for the flush).
        Nothing is raised: :meth:`write` reports what it could not do."""

    def flush(self) -> None:
        """Make every file written so far durable on the medium; raise OSError if it cannot."""

    def read_back(self, file_ids: list[str]) -> Iterator[bytes | memoryview]:
        """Start reading flushed files back from the medium (not from a cache), at once;
        the iterator yields the content of each, in order, each valid until the next is taken
        (one buffer serves them all)."""

    def replace(self, file_id: str, data: bytes) -> None:
        """Write one file durably in place of any old one (the DICOMDIR)."""

    def close(self) -> str:
        """Sync and release the medium; return a note for the report ("" if none)."""


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _syncfs(fd: int) -> None:
    """Write back everything the file system of ``fd`` holds (syncfs(2), which reports
    write-back errors since Linux 5.8; Python has no os.syncfs); os.sync() where the C
    library lacks it."""
    syncfs = getattr(_libc(), "syncfs", None)
    if syncfs is None:
        os.sync()
        return
    if syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _start_write_back(fd: int) -> None:
    """Have the kernel start writing the dirty pages of ``fd`` to its disk, without waiting
    for them (sync_file_range(2) with SYNC_FILE_RANGE_WRITE; Python has no os.sync_file_range):
    an fsync later waits for less. Nothing where the C library lacks it."""
    start = getattr(_libc(), "sync_file_range", None)
    if start is None:
        return
    start.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    if start(fd, 0, 0, 2) != 0:  # SYNC_FILE_RANGE_WRITE
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class FolderMedium:
    """A mounted file system (or any folder): written in place, flushed with one syncfs;
    read back with O_DIRECT where the file system allows it and ``direct`` (else its cached
    pages are dropped first)."""

    def __init__(self, root: Path, label: str | None = None, direct: bool = True) -> None:
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
        self._root = str(root)
        #: Folders below root that this medium made or found (str paths: this runs per file).
        self._folders: set[str] = set()
        #: The size of each file written, and the files being read ahead (open).
        self._sizes: dict[str, int] = {}
        self._ahead: dict[str, int] = {}
        #: Whether files are read back with O_DIRECT (until the file system refuses it).
        self._direct = direct and hasattr(os, "O_DIRECT")

    def space(self) -> Space:
        st = os.statvfs(self.root)
        return Space(st.f_bavail * st.f_frsize, max(st.f_bsize, 512))

    def check(self) -> None:
        if os.stat(self.root).st_dev != self._dev:  # unmounted under us: never write to the mount point
            raise OSError(errno.ENODEV, "the stick's file system is no longer mounted")

    def _folder(self, file_id: str) -> None:
        # Folders below root are made one level at a time, after a check that the stick is
        # still mounted there; root itself never is, so once it is gone (or unmounted: the
        # bare mount point has none of our folders) a write gives ENOENT, never a file on
        # the mount point.
        folder, _, _ = file_id.rpartition("/")
        if not folder:  # at the root (the DICOMDIR's temp file): the root may be a bare mount point
            self.check()
        elif folder not in self._folders:
            self.check()
            parts = folder.split("/")
            for i in range(1, len(parts) + 1):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(os.path.join(self._root, *parts[:i]))
            self._folders.add(folder)

    def reserve(self, file_ids: list[str]) -> None:
        # A file made while its folder's blocks are being written back waits for them (ext4,
        # measured: 200 files made during syncfs calls in another process took 0.04-0.06 s
        # instead of 0.005-0.01); a file only written to does not.
        for file_id in file_ids:
            with contextlib.suppress(OSError):
                self._folder(file_id)
                os.close(os.open(os.path.join(self._root, file_id), os.O_WRONLY | os.O_CREAT, 0o644))

    def write(self, file_id: str, data: bytes | memoryview) -> None:
        # A write back starts at the flush (one syncfs), not file by file.
        self._folder(file_id)
        fd = os.open(os.path.join(self._root, file_id), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        self._sizes[file_id] = len(data)

    def flush(self) -> None:
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if os.fstat(fd).st_dev != self._dev:  # never sync (and trust) the bare mount point
                raise OSError(errno.ENODEV, "the stick's file system is no longer mounted")
            _syncfs(fd)
        finally:
            os.close(fd)

    def read_back(self, file_ids: list[str]) -> Iterator[bytes | memoryview]:
        # O_DIRECT, measured: the reading thread's CPU per 200 CT slices 0.06 -> 0.025 s (no
        # pages to drop, no copy out of them), the same wall time.
        if self._direct:
            return self._read_direct(file_ids)
        return self._read_cached(file_ids)

    def _read_direct(self, file_ids: list[str]) -> Iterator[memoryview]:
        """Each file read with O_DIRECT: from the stick into a buffer of ours, past the page
        cache (no pages to drop first, none to copy out of); where the file system refuses
        O_DIRECT (EINVAL), this file and the next are read as _read_cached reads them."""
        buffer = _Buffer(aligned=True)
        for n, file_id in enumerate(file_ids):
            try:
                fd = os.open(os.path.join(self._root, file_id), os.O_RDONLY | os.O_DIRECT)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._direct = False
                yield from self._read_cached(file_ids[n:])
                return
            try:
                size = self._sizes.get(file_id)
                # One byte more than was written, so that a longer file shows; in whole
                # blocks, the last one read up to the end of the file.
                want = (os.fstat(fd).st_size if size is None else size) + 1
                view = buffer.take(-(-want // DIRECT_ALIGN) * DIRECT_ALIGN)
                done = 0
                try:
                    while done < len(view) and not done % DIRECT_ALIGN and (k := os.readv(fd, [view[done:]])):
                        done += k
                except OSError as exc:
                    if exc.errno != errno.EINVAL or done:
                        raise
                    self._direct = False
                    yield from self._read_cached(file_ids[n:])
                    return
            finally:
                os.close(fd)
            yield view[:min(done, want)]

    def _read_cached(self, file_ids: list[str]) -> Iterator[memoryview]:
        # The cached pages of the first READ_AHEAD_FILES (clean once flushed) are dropped and
        # the stick asked to read them now; they stay open until read.
        for file_id in file_ids[:READ_AHEAD_FILES]:
            if file_id not in self._ahead:
                self._ahead[file_id] = self._open_uncached(file_id, ahead=True)
        return self._read(file_ids)

    def _open_uncached(self, file_id: str, ahead: bool) -> int:
        fd = os.open(os.path.join(self._root, file_id), os.O_RDONLY)
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            if ahead:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        return fd

    def _read(self, file_ids: list[str]) -> Iterator[memoryview]:
        buffer = _Buffer()
        for file_id in file_ids:
            fd = self._ahead.pop(file_id, None)
            if fd is None:
                fd = self._open_uncached(file_id, ahead=False)
            try:
                size = self._sizes.get(file_id)
                # One byte more than was written, so that a longer file shows.
                view = buffer.take(os.fstat(fd).st_size if size is None else size + 1)
                done = 0
                while done < len(view) and (n := os.readv(fd, [view[done:]])):
                    done += n
            finally:
                os.close(fd)
            yield view[:done]

    def replace(self, file_id: str, data: bytes) -> None:
        """Via ``NAME.TMP``, fsync, rename, fsync the folder."""
        final = self.root / file_id
        tmp = final.with_name(final.name + ".TMP")
        self.write(str(tmp.relative_to(self.root)), data)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        fd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> str:
        for fd in self._ahead.values():  # read ahead, never read (an export that failed)
            os.close(fd)
        self._ahead.clear()
        with contextlib.suppress(OSError):  # flushed already; this only makes sure, and never syncs another disk
            self.flush()
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
        super().close()
        done = subprocess.run(["umount", str(self.mountpoint)], capture_output=True, text=True)
        if done.returncode != 0:  # a pulled stick: detach what is left
            subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)
            with contextlib.suppress(OSError):
                self.mountpoint.rmdir()
            raise MediaError(f"cannot unmount {self.device}: {done.stderr.strip()}")
        self.mountpoint.rmdir()
        return f"unmounted {self.device}"


def _scratch() -> Path:
    """A new private temporary folder, in memory (``/dev/shm``) where there is one: what is
    staged there never needs to reach a disk."""
    with contextlib.suppress(OSError):
        return Path(tempfile.mkdtemp(prefix="appliance-fat-", dir="/dev/shm"))
    return Path(tempfile.mkdtemp(prefix="appliance-fat-"))


class FatImageMedium:
    """A FAT image file written in userspace with mtools (no kernel vfat needed).

    The image's DICOMDIR and the names of its folders and files are copied to a local folder
    (``root``, so pydicom can load the DICOMDIR). Files are staged in local batches (in
    memory where there is /dev/shm); every ``FAT_BATCH_BYTES`` a batch goes into the image
    with one ``mcopy -s`` and the image's write back is started; :meth:`flush` sends the
    last batch and fsyncs the image.
    Files are read back from the image itself through its FAT (:class:`FatReader`): no
    mtools process, no staged copy. Copies in run one at a time, in order, in a thread of
    the medium's, while the exporter prepares the next files (an mtools process per batch,
    not per file); a window flushed is read back in the thread that flushed it, while the
    next batch is copied in."""

    def __init__(self, image: Path) -> None:
        self.image = image
        self.label = str(image)
        st = os.stat(image)
        #: The image this export writes: every step checks it is still the same file (a stick
        #: pulled and another pushed in under the same name is not the stick written so far).
        self._identity = (st.st_dev, st.st_ino)
        info = self._mtools("minfo", "::")
        sector = re.search(r"sector size: (\d+) bytes", info)
        cluster = re.search(r"cluster size: (\d+) sectors", info)
        if not sector or not cluster:
            raise MediaError(f"{image} is not a FAT image that mtools can read")
        self._cluster = int(sector.group(1)) * int(cluster.group(1))
        self._tmp = _scratch()
        self._mtools_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtools")
        self._pending: list[Future[object]] = []
        #: Files may be written (staged) in one thread and flushed in another: the batch
        #: being staged is theirs in turn (_batching), and so is the list of commands queued.
        self._lock = threading.Lock()
        self._batching = threading.Lock()
        #: What files are read back into (one window at a time).
        self._read_buffer = _Buffer()
        self._batch: Path | None = None
        self._batch_bytes = 0
        self._batch_folders: set[str] = set()
        self._staged = 0  # names of staging folders
        self.root = self._tmp / "stick"
        self.root.mkdir()
        # The image's tree, its files empty (pydicom drops a listed instance whose file is
        # missing), but for the DICOMDIR itself.
        listing = self._mtools("mdir", "-/", "-b", "::", check=False).splitlines()
        for line in listing:  # "::/DICOM/ST.../" for a folder, "::/DICOM/ST.../IM..." for a file
            rel = line[3:].rstrip("/")
            if not line.startswith("::/") or any(part in ("", ".", "..") for part in rel.split("/")):
                continue
            if line.endswith("/"):
                (self.root / rel).mkdir(parents=True, exist_ok=True)
            else:
                (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
                (self.root / rel).touch()
        if "::/DICOMDIR" in listing:
            self._mtools("mcopy", "-o", "-n", "::/DICOMDIR", str(self.root))

    def _same_image(self) -> None:
        """Raise OSError when ``image`` is no longer the file the export started writing."""
        st = os.stat(self.image)
        if (st.st_dev, st.st_ino) != self._identity:
            raise OSError(errno.ENODEV, f"{self.image} was replaced by another file during the export")

    def _mtools(self, tool: str, *args: str, check: bool = True) -> str:
        if hasattr(self, "_identity"):
            self._same_image()
        done = subprocess.run([tool, "-i", str(self.image), *args], capture_output=True)
        if check and done.returncode != 0:
            raise OSError(errno.EIO, f"{tool} failed on {self.image}: {done.stderr.decode('utf-8', 'replace').strip()}")
        return done.stdout.decode("utf-8", "replace")

    def _later(self, fn: Callable[..., object], *args: Any) -> Future[object]:
        """Run ``fn(*args)`` (mtools, an fsync) in the medium's thread, after what was queued before."""
        with self._lock:
            future = self._mtools_thread.submit(fn, *args)
            self._pending.append(future)
        return future

    def _wait(self) -> None:
        """Wait for everything queued; raise the first failure."""
        with self._lock:
            pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def _staging(self) -> Path:
        self._staged += 1
        path = self._tmp / f"staged{self._staged}"
        path.mkdir()
        return path

    def space(self) -> Space:
        m = re.search(r"([\d ]+) bytes free", self._mtools("mdir", "::"))
        if not m:
            raise MediaError(f"mtools does not say how much space {self.image} has free")
        return Space(int(m.group(1).replace(" ", "")), self._cluster)

    def check(self) -> None:
        self._same_image()

    def reserve(self, file_ids: list[str]) -> None:
        pass  # staged, and copied in by mtools a batch at a time

    def write(self, file_id: str, data: bytes | memoryview) -> None:
        with self._batching:
            self._stage(file_id, data)

    def _stage(self, file_id: str, data: bytes | memoryview) -> None:
        if self._batch is None:
            self._batch = self._staging()
            self._batch_folders.clear()
        folder = os.path.join(self._batch, file_id.rpartition("/")[0])
        if folder not in self._batch_folders:
            os.makedirs(folder, exist_ok=True)
            self._batch_folders.add(folder)
        # A local staging copy, never synced: durability is the image's, in flush().
        fd = os.open(os.path.join(self._batch, file_id), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        self._batch_bytes += len(data)
        if self._batch_bytes >= FAT_BATCH_BYTES:
            self._send_batch()

    def _send_batch(self) -> None:
        batch, self._batch, self._batch_bytes = self._batch, None, 0
        if batch is None:
            return
        self._later(self._copy_in, batch)

    def _copy_in(self, batch: Path) -> None:
        """Copy a staged batch into the image and start writing it to the image's disk,
        without waiting (the flush's fsync then waits for less; an fsync here held up the
        next batch: FAT export per 200 CT slices, alternated runs, 0.377 -> 0.322 s median)."""
        try:
            # -s: whole trees, merged into the image's folders of the same names; -o:
            # overwrite what a failed export left; -Q: stop at the first error.
            self._mtools("mcopy", "-s", "-o", "-n", "-Q", *(str(p) for p in sorted(batch.iterdir())), "::/")
        finally:
            shutil.rmtree(batch, ignore_errors=True)
        fd = os.open(self.image, os.O_RDONLY)
        try:
            _start_write_back(fd)
        finally:
            os.close(fd)

    def _fsync(self) -> None:
        with open(self.image, "rb+") as f:
            st = os.fstat(f.fileno())
            if (st.st_dev, st.st_ino) != self._identity:
                raise OSError(errno.ENODEV, f"{self.image} was replaced by another file during the export")
            os.fsync(f.fileno())

    def flush(self) -> None:
        with self._batching:
            self._send_batch()
            self._later(self._fsync)
        self._wait()

    def read_back(self, file_ids: list[str]) -> Iterator[bytes | memoryview]:
        """Read in the caller's thread, once the flush that copied the files in returned,
        while the medium's thread copies the next batch in: the files are read from the
        image through its FAT (:class:`FatReader`, not mtools), all into one buffer of the
        medium's, which the next read back reuses. What an mcopy meanwhile writes into the
        image are other files' clusters and directory entries and FAT entries still free:
        the bytes of these files, their entries and their chains stay as they are. An image
        file is not a stick: what is checked is what mtools put into it, read as any system
        reading the stick would (its pages may come from the page cache; a stick's, on a
        mounted stick, never do: FolderMedium)."""
        return iter(self._read_window(file_ids))

    def _read_window(self, file_ids: list[str]) -> list[memoryview]:
        fd = os.open(self.image, os.O_RDONLY)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != self._identity:
                raise OSError(errno.ENODEV, f"{self.image} was replaced by another file during the export")
            reader = FatReader(fd)
            found = [reader.find(file_id) for file_id in file_ids]
            buffer = self._read_buffer.take(sum(size for _, size in found))
            views, pos = [], 0
            for file_id, (first, size) in zip(file_ids, found, strict=True):
                views.append(reader.read_into(file_id, first, buffer[pos:pos + size]))
                pos += size
            return views
        finally:
            os.close(fd)

    def replace(self, file_id: str, data: bytes) -> None:
        """Copied in with ``mcopy -o`` (not atomic: FAT has no rename over a file) and fsynced."""
        self._wait()
        staged = self._staging() / file_id.rpartition("/")[2]
        staged.write_bytes(data)
        self._mtools("mcopy", "-o", "-n", str(staged), f"::/{file_id}")
        self._fsync()

    def close(self) -> str:
        # A failed export may leave commands queued: they finish (a copy is never cut short).
        self._mtools_thread.shutdown(wait=True)
        self._pending = []
        shutil.rmtree(self._tmp, ignore_errors=True)
        return ""


class _Buffer:
    """One buffer that files read back are read into in turn (no new memory for each);
    ``aligned``: its start is at a page boundary (anonymous memory, for O_DIRECT)."""

    def __init__(self, aligned: bool = False) -> None:
        self._aligned = aligned
        self._data: bytearray | mmap.mmap = bytearray()

    def take(self, size: int) -> memoryview:
        """A view of ``size`` bytes of the buffer (which grows as needed, by a quarter more than
        asked: the next window or file is about as large, and new pages cost); the last one
        taken is gone."""
        if len(self._data) < size:
            grown = max(size + size // 4, 2 * len(self._data))
            if self._aligned:
                grown = -(-grown // mmap.PAGESIZE) * mmap.PAGESIZE
            self._data = mmap.mmap(-1, grown) if self._aligned else bytearray(grown)
        return memoryview(self._data)[:size]


class FatReader:
    """Reads files of a FAT12, FAT16 or FAT32 file system from its image (``fd``) by their
    path, as any system reading the stick finds them: boot sector, FAT, directory entries
    (short names: the file-set's names are 8.3 upper case), cluster chains. The FAT is read
    once, with the reader."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        boot = os.pread(fd, 512, 0)
        (sector, self._per_cluster, reserved, fats, root_entries, total16, fat16) = struct.unpack_from(
            "<HBHBHHxH", boot, 11)
        total = total16 or struct.unpack_from("<L", boot, 32)[0]
        fat_sectors = fat16 or struct.unpack_from("<L", boot, 36)[0]
        if sector not in (512, 1024, 2048, 4096) or not self._per_cluster or not fats or not fat_sectors:
            raise OSError(errno.EIO, "the image has no FAT boot sector")
        root_sectors = -(-root_entries * 32 // sector)
        self._sector = sector
        self._cluster = sector * self._per_cluster
        self._data = (reserved + fats * fat_sectors + root_sectors) * sector
        clusters = (total - reserved - fats * fat_sectors - root_sectors) // self._per_cluster
        self._bits = 12 if clusters < 4085 else 16 if clusters < 65525 else 32
        self._fat = os.pread(fd, fat_sectors * sector, reserved * sector)
        self._clusters = clusters
        if self._bits == 32:
            self._root: tuple[int, int] = (struct.unpack_from("<L", boot, 44)[0], 0)
        else:  # a fixed root directory region
            self._root = (0, root_entries * 32)
        self._root_offset = (reserved + fats * fat_sectors) * sector
        self._folders: dict[str, dict[bytes, tuple[int, int, int]]] = {}

    def _next(self, cluster: int) -> int:
        fat = self._fat
        if self._bits == 32:
            return int(struct.unpack_from("<L", fat, cluster * 4)[0]) & 0x0FFFFFFF
        if self._bits == 16:
            return int(struct.unpack_from("<H", fat, cluster * 2)[0])
        pair = int(struct.unpack_from("<H", fat, cluster + cluster // 2)[0])
        return pair >> 4 if cluster & 1 else pair & 0xFFF

    def _chain(self, first: int, limit: int) -> list[tuple[int, int]]:
        """The byte ranges (offset, length) of the cluster chain from ``first``, runs merged;
        at most ``limit`` clusters."""
        if self._bits != 12 and 1 <= limit and 2 <= first and first + limit - 1 < self._clusters + 2:
            # What mcopy writes: one run of clusters, each entry naming the next (checked in one
            # comparison, not entry by entry; anything else is walked below).
            entries = numpy.frombuffer(self._fat, f"<u{self._bits // 8}", limit - 1, first * self._bits // 8)
            if self._bits == 32:
                entries = entries & 0x0FFFFFFF
            if numpy.array_equal(entries, numpy.arange(first + 1, first + limit)):
                return [(self._data + (first - 2) * self._cluster, limit * self._cluster)]
        end = {12: 0xFF8, 16: 0xFFF8, 32: 0x0FFFFFF8}[self._bits]
        runs: list[tuple[int, int]] = []
        cluster, n = first, 0
        while 2 <= cluster < end and n < limit:
            if cluster >= self._clusters + 2:
                raise OSError(errno.EIO, "a FAT cluster chain leaves the file system")
            offset = self._data + (cluster - 2) * self._cluster
            if runs and runs[-1][0] + runs[-1][1] == offset:
                runs[-1] = (runs[-1][0], runs[-1][1] + self._cluster)
            else:
                runs.append((offset, self._cluster))
            cluster, n = self._next(cluster), n + 1
        return runs

    def _read_runs(self, runs: list[tuple[int, int]]) -> bytes:
        return b"".join(os.pread(self._fd, length, offset) for offset, length in runs)

    def _folder(self, path: str) -> dict[bytes, tuple[int, int, int]]:
        """The entries of folder ``path`` ("" for the root): short name -> (attributes, first cluster, size)."""
        entries = self._folders.get(path)
        if entries is not None:
            return entries
        if not path:
            first, size = self._root
            data = os.pread(self._fd, size, self._root_offset) if size else self._read_runs(self._chain(first, 1 << 20))
        else:
            parent, _, name = path.rpartition("/")
            attributes, first, _ = self._entry(parent, name)
            if not attributes & 0x10:
                raise OSError(errno.ENOTDIR, f"{path} on the stick is not a folder")
            data = self._read_runs(self._chain(first, 1 << 20))
        entries = {}
        for pos in range(0, len(data) - 31, 32):
            raw = data[pos:pos + 32]
            if raw[0] == 0:
                break
            if raw[0] == 0xE5 or raw[11] == 0x0F or raw[11] & 0x08:  # deleted, long name, volume label
                continue
            short = (b"\xe5" if raw[0] == 5 else raw[:1]) + raw[1:11]
            high, low, size = struct.unpack_from("<H4xHL", raw, 20)
            entries.setdefault(short, (raw[11], high << 16 | low if self._bits == 32 else low, size))
        self._folders[path] = entries
        return entries

    def _entry(self, folder: str, name: str) -> tuple[int, int, int]:
        base, _, ext = name.upper().partition(".")
        short = base.encode("ascii").ljust(8) + ext.encode("ascii").ljust(3)
        try:
            return self._folder(folder)[short]
        except KeyError:
            raise OSError(errno.ENOENT, f"{folder + '/' if folder else ''}{name} is not on the stick") from None

    def find(self, file_id: str) -> tuple[int, int]:
        """The first cluster and the size of the file ``file_id`` (``DICOM/ST.../IM...``)."""
        folder, _, name = file_id.rpartition("/")
        attributes, first, size = self._entry(folder, name)
        if attributes & 0x10:
            raise OSError(errno.EISDIR, f"{file_id} on the stick is a folder")
        return first, size

    def read(self, file_id: str) -> memoryview:
        """The content of the file ``file_id``."""
        first, size = self.find(file_id)
        return self.read_into(file_id, first, memoryview(bytearray(size)))

    def read_into(self, file_id: str, first: int, view: memoryview) -> memoryview:
        """Read the file ``file_id`` (its chain from cluster ``first``, ``len(view)`` bytes) into ``view``."""
        size, done = len(view), 0
        for offset, length in self._chain(first, -(-size // self._cluster)):
            length = min(length, size - done)
            while length:
                n = os.preadv(self._fd, [view[done:done + length]], offset)
                if not n:
                    raise OSError(errno.EIO, f"{file_id} runs past the end of the image")
                done, offset, length = done + n, offset + n, length - n
        if done < size:
            raise OSError(errno.EIO, f"{file_id} on the stick has fewer clusters than its size needs")
        return view


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
