"""Installing a release into the inactive root slot, with systemd-sysupdate's transfer
semantics: nothing is written before every artefact matches the signed manifest, the slot is
invalidated before it is written, and renaming the new UKI into place is the commit point.
A power cut at any moment leaves either the old version booting, or the new one complete.

1. read and verify the manifest; refuse a version that is not newer than the running one or
   whose UKI is marked bad on the ESP (unless forced), and missing artefacts;
2. pass 1: hash every artefact whole against the manifest (nothing written yet);
3. invalidate the inactive slot: delete its UKI from the ESP, name it ``_empty``;
4. pass 2: stream the root image through ``zstd -dc`` into the slot, hashing it again;
5. name the slot ``appliance_<V>``;
6. copy the UKI to ``EFI/Linux/.appliance_<V>.efi.tmp`` and rename it to
   ``appliance_<V>+<tries>.efi``: the next boot tries V, ``tries`` times at most.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from appliance.update import EMPTY_LABEL, RUN_DIR, UpdateError, gpt, slot_label
from appliance.update.boot import UKI_DIR, ukis
from appliance.update.release import Release, open_artefact, read_release
from appliance.update.request import Progress, write_progress
from appliance.update.slots import Slot, find_slots, is_block, partition_device
from appliance.files import fsync_dir
from appliance.update.versions import compare

log = logging.getLogger(__name__)

#: Bytes read and written at a time.
CHUNK = 1 << 20
#: The boot tries a new version gets, at most (systemd-boot counts them).
MAX_TRIES = 10
#: Seconds an HTTP read may stall.
HTTP_TIMEOUT = 30.0

ProgressCallback = Callable[[Progress], None]


class _Reporter:
    """Progress to the caller's callback, progress.json and the log, in words."""

    def __init__(self, callback: ProgressCallback | None, run_dir: Path | None) -> None:
        self.callback = callback
        self.run_dir = run_dir
        self.version = ""
        self.last: tuple[str, int] = ("", -1)

    def __call__(self, phase: str, percent: int, message: str, *, finished: bool = False,
                 ok: bool | None = None) -> None:
        if (phase, percent) == self.last and not finished:
            return
        step = self.last[0] != phase or percent // 10 != self.last[1] // 10
        self.last = (phase, percent)
        p = Progress(self.version, phase, percent, finished, ok, message, time.time())
        if self.run_dir is not None:
            try:
                write_progress(p, self.run_dir)
            except OSError as exc:
                log.warning("update: cannot record the progress in %s: %s", self.run_dir, exc.strerror)
        if step and not finished:
            log.info("update: %s", message)
        if self.callback is not None:
            self.callback(p)


def _lock(run_dir: Path | None) -> int | None:
    if run_dir is None:
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / "lock", os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UpdateError("another update is being installed; wait for it to finish") from None
    return fd


def zstd_content_size(head: bytes) -> int | None:
    """The decompressed size a zstd frame header declares, or None when it declares none."""
    if len(head) < 6 or head[:4] != b"\x28\xb5\x2f\xfd":
        return None
    desc = head[4]
    fcs_flag, single = desc >> 6, (desc >> 5) & 1
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[desc & 3]
    size = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if size == 0 or len(head) < pos + size:
        return None
    value = int.from_bytes(head[pos:pos + size], "little")
    return value + 256 if size == 2 else value


def _check_sum(release: Release, name: str, timeout: float, report: Callable[[int], None]) -> bytes:
    """Pass 1: hash artefact ``name`` whole; raise UpdateError unless it matches the manifest.
    Return its first bytes."""
    f, total = open_artefact(release.source, name, timeout)
    h = hashlib.sha256()
    head = b""
    done = 0
    try:
        with f:
            while chunk := f.read(CHUNK):
                if not head:
                    head = chunk[:64]
                h.update(chunk)
                done += len(chunk)
                if total:
                    report(min(99, done * 100 // total))
    except OSError as exc:
        raise UpdateError(f"cannot read {name} from {release.source}: {exc}; nothing was written") from None
    if h.hexdigest() != release.sums[name]:
        raise UpdateError(f"{name} does not match its sha256 in the signed SHA256SUMS (the file was damaged or "
                          "changed); nothing was written")
    return head


def _write_slot(release: Release, disk: Path, slot: Slot, timeout: float, report: Callable[[int], None]) -> int:
    """Pass 2: stream the root image through ``zstd -dc`` into ``slot``, hashing the compressed
    bytes again; return the bytes written. Raise UpdateError on a mismatch or an image larger
    than the slot (the slot then stays ``_empty``)."""
    name = release.root_name
    src, total = open_artefact(release.source, name, timeout)
    if is_block(disk):
        target = partition_device(disk, slot.number)
        base = 0
    else:
        target, base = disk, slot.partition.offset
    limit = slot.partition.size
    try:
        out = os.open(target, os.O_WRONLY | (os.O_EXCL if base == 0 else 0))
    except OSError as exc:
        src.close()
        raise UpdateError(f"cannot open slot {slot.letter} ({target}) for writing: {exc.strerror}") from None
    try:
        proc = subprocess.Popen(["zstd", "-dc", "-q"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    except OSError as exc:
        src.close()
        os.close(out)
        raise UpdateError(f"cannot run zstd to decompress {name}: {exc.strerror}") from None
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    h = hashlib.sha256()
    fed = [0]
    failed: list[BaseException] = []

    def feed(stdin: BinaryIO) -> None:
        try:
            with src, stdin:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    fed[0] += len(chunk)
                    stdin.write(chunk)
        except BrokenPipeError:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the writing thread
            failed.append(exc)

    feeder = threading.Thread(target=feed, args=(proc.stdin,), name="update-feed", daemon=True)
    feeder.start()
    written = 0
    try:
        while chunk := proc.stdout.read(CHUNK):
            if written + len(chunk) > limit:
                raise UpdateError(f"the root image of version {release.version} is larger than slot {slot.letter} "
                                  f"({limit} bytes); the release does not fit this disk")
            view = memoryview(chunk)
            while view:
                n = os.pwrite(out, view, base + written)
                view = view[n:]
                written += n
            if total:
                report(min(99, fed[0] * 100 // total))
        feeder.join()
        rc = proc.wait()
        if failed:
            raise UpdateError(f"cannot read {name} from {release.source}: {failed[0]}")
        if rc != 0:
            err = proc.stderr.read().decode(errors="replace").strip()
            raise UpdateError(f"zstd could not decompress {name}: {err or f'exit code {rc}'}")
        if h.hexdigest() != release.sums[name]:
            raise UpdateError(f"{name} changed while it was written (its sha256 no longer matches the signed "
                              f"SHA256SUMS); slot {slot.letter} stays empty")
        os.fsync(out)
    except OSError as exc:
        raise UpdateError(f"cannot write slot {slot.letter} ({target}): {exc.strerror}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            pipe.close()
        feeder.join(timeout=30)
        os.close(out)
    return written


def _install_uki(release: Release, folder: Path, tries: int, timeout: float) -> Path:
    """Copy the UKI to a temp name on the ESP, checking its sha256 again, and rename it to
    ``appliance_<V>+<tries>.efi`` (the commit point)."""
    name = release.uki_name
    tmp = folder / f".{name}.tmp"
    final = folder / f"{name[:-len('.efi')]}+{tries}.efi"
    src, _ = open_artefact(release.source, name, timeout)
    h = hashlib.sha256()
    try:
        with src, tmp.open("wb") as out:
            while chunk := src.read(CHUNK):
                h.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != release.sums[name]:
            raise UpdateError(f"{name} changed while it was copied (its sha256 no longer matches the signed "
                              "SHA256SUMS); the new version is not made bootable")
        os.replace(tmp, final)
        fsync_dir(folder)
    except OSError as exc:
        raise UpdateError(f"cannot write {final.name} to the ESP ({folder}): {exc.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return final


def install(
    source: str | Path,
    *,
    disk: Path,
    esp: Path,
    keys_dir: Path,
    tries: int,
    running: str,
    force: bool = False,
    progress: ProgressCallback | None = None,
    run_dir: Path | None = RUN_DIR,
) -> str:
    """Install the release at ``source`` (a folder or an http(s) base URL) into the inactive
    root slot of ``disk`` and its UKI onto ``esp`` with ``tries`` boot tries; return what was
    done, in words. Raise UpdateError (nothing booted differently) when it cannot. ``force``
    allows a version that is not newer or is marked bad. Progress goes to ``progress``, the log
    and ``run_dir``/progress.json (None: not recorded)."""
    if not 1 <= tries <= MAX_TRIES:
        raise UpdateError(f"update.boot_tries {tries} is out of range; use 1 to {MAX_TRIES}")
    report = _Reporter(progress, run_dir)
    lock = _lock(run_dir)
    try:
        report("checking", 0, f"checking the release at {source}")
        release = read_release(source, keys_dir, HTTP_TIMEOUT)
        v = report.version = release.version
        if v == running:
            raise UpdateError(f"version {v} is the running version; it cannot be installed beside itself")
        if compare(v, running) < 0 and not force:
            raise UpdateError(f"version {v} is older than the running version {running}; nothing to do "
                              "(force it to go back to an older version)")
        folder = esp / UKI_DIR
        found = ukis(esp)
        mine = [u for u in found if u.version == running]
        if mine and all(u.state == "trying" for u in mine) and not force:
            raise UpdateError(f"the running version {running} is still on trial (not yet marked good); the other "
                              "slot holds the version to fall back to and is not overwritten until this one is "
                              "healthy (appliance update boot-check)")
        bad = [u for u in found if u.version == v and u.state == "bad"]
        if bad and not force:
            raise UpdateError(f"version {v} was installed before and failed to become healthy ({bad[0].path.name} "
                              "on the ESP); it is not installed again unless forced")
        slots = find_slots(disk, running)
        slot = slots.inactive
        for i, name in enumerate((release.root_name, release.uki_name)):
            def verifying(pct: int, i: int = i) -> None:
                pct = (i * 100 + pct) // 2
                report("verifying", pct, f"checking version {v} against its signed sums: {pct} %")

            head = _check_sum(release, name, HTTP_TIMEOUT, verifying)
            size = zstd_content_size(head) if i == 0 else None
            if size is not None and size > slot.partition.size:
                raise UpdateError(f"the root image of version {v} is {size} bytes, larger than slot {slot.letter} "
                                  f"({slot.partition.size} bytes); the release does not fit this disk; nothing "
                                  "was written")

        report("preparing", 0, f"emptying slot {slot.letter} for version {v}")
        folder.mkdir(parents=True, exist_ok=True)
        old = {slot.version, v} - {running, None}
        for u in ukis(esp):
            if u.version in old:
                u.path.unlink()
        for stale in folder.glob(".appliance_*.efi.tmp"):
            stale.unlink()
        fsync_dir(folder)
        gpt.set_name(disk, slot.number, EMPTY_LABEL)

        written = _write_slot(release, disk, slot, HTTP_TIMEOUT,
                              lambda pct: report("writing", pct, f"writing version {v} to slot {slot.letter}: "
                                                                 f"{pct} %"))
        report("labelling", 100, f"naming slot {slot.letter} {slot_label(v)}")
        gpt.set_name(disk, slot.number, slot_label(v))
        report("committing", 100, f"making version {v} the next to boot")
        final = _install_uki(release, folder, tries, HTTP_TIMEOUT)
        summary = (f"version {v} is installed in slot {slot.letter} ({written // 2**20} MiB) and boots at the next "
                   f"restart ({final.name}); if it does not become healthy in {tries} "
                   f"boot{'s' if tries != 1 else ''} the box goes back to {running}")
        report("done", 100, f"update done: {summary}", finished=True, ok=True)
        log.info("update done: %s", summary)
        return summary
    except BaseException as exc:
        why = str(exc) or type(exc).__name__
        log.error("update failed: %s", why)
        try:
            report("failed", 0, f"update failed: {why}", finished=True, ok=False)
        except Exception as again:  # noqa: BLE001 - the first error is the one to raise
            log.warning("update: the progress callback failed too: %s", again)
        raise
    finally:
        if lock is not None:
            os.close(lock)


