"""The appliance image in QEMU, for the tests that boot it (tests/test_image.py,
tests/test_update_image.py): a QMP client, the service console on ttyS0, the journal on
ttyS1, one machine with a persistent qcow2 overlay over many boots, and a view of the data
partition read from the powered-off disk.

Environment: ``APPLIANCE_IMAGE`` (default: the one scripts/build-image made),
``APPLIANCE_QEMU_ACCEL`` (``tcg``, the default; ``kvm`` only where KVM really works).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from tests.helpers import ROOT, free_port, wait_for

CACHE = Path(os.environ.get("APPLIANCE_IMAGE_CACHE", Path.home() / ".cache" / "appliance-image"))
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
AET = "ELEKTA_STORAGE"
NEW_PORT = 11112
BOOT_TIMEOUT = 420.0


def image_path() -> Path:
    if "APPLIANCE_IMAGE" in os.environ:
        return Path(os.environ["APPLIANCE_IMAGE"])
    version = re.search(r'^version = "(.*)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert version
    return Path(os.environ.get("APPLIANCE_IMAGE_OUT", CACHE / "out")) / f"appliance_{version.group(1)}.raw"


def report(step: str, started: float, what: str) -> None:
    print(f"\n[image] {step}: {what} ({time.monotonic() - started:.1f} s)", flush=True)


def run(cmd: list[str], timeout: float = 120) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}"
    return done.stdout


class Qmp:
    """A QMP client on a Unix socket: commands in, answers out, events kept aside."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        wait_for(lambda: self._connect(path), timeout=30, what=f"QMP socket {path}")
        self.file = self.sock.makefile("rw")
        self.file.readline()  # greeting
        self.events: list[dict[str, Any]] = []
        self.execute("qmp_capabilities")

    def _connect(self, path: Path) -> bool:
        try:
            self.sock.connect(str(path))
            return True
        except OSError:
            return False

    def execute(self, command: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.file.write(json.dumps(msg) + "\n")
        self.file.flush()
        while True:
            answer = json.loads(self.file.readline())
            if "event" in answer:
                self.events.append(answer)
                continue
            if "error" in answer:
                raise AssertionError(f"QMP {command} {arguments}: {answer['error']}")
            return answer.get("return")

    def close(self) -> None:
        self.sock.close()


class Serial:
    """ttyS0, the service console, through a QEMU socket chardev: everything read is kept."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        wait_for(lambda: self.sock.connect_ex(str(path)) == 0, timeout=30, what=f"serial socket {path}")
        self.data = bytearray()
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while chunk := self.sock.recv(4096):
            with self.lock:
                self.data += chunk

    def text(self) -> str:
        with self.lock:
            return self.data.decode("utf-8", "replace")

    def expect(self, pattern: str, after: int, timeout: float = 60) -> int:
        """Wait for ``pattern`` (a regex) in the output after offset ``after``; return the end."""
        rx = re.compile(pattern)

        def found() -> int:
            m = rx.search(self.text(), after)
            return m.end() if m else 0

        return int(wait_for(found, timeout=timeout, what=f"{pattern!r} on ttyS0; last output: {self.text()[-400:]!r}"))

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\r")

    def close(self) -> None:
        self.sock.close()


class Machine:
    """The image in QEMU: one persistent qcow2 overlay and UEFI variables, many boots."""

    def __init__(self, image: Path, work: Path) -> None:
        self.image = image
        self.work = work
        self.disk = work / "disk.qcow2"
        #: The data partition's ext4 features, once :meth:`data_partition` has read it.
        self.data_features: set[str] = set()
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image), "-F", "raw", str(self.disk)])
        shutil.copy(OVMF_VARS, work / "vars.fd")
        self.proc: subprocess.Popen[bytes] | None = None
        #: How far the tests have read the service console's output, and whether they must
        #: wait for its menu first (a new boot).
        self.console_at = 0
        self.console_fresh = True
        self.boots = 0
        self.ports: dict[int, int] = {}
        self.started = 0.0

    def start(self) -> None:
        self.boots += 1
        self.ports = {104: free_port(), NEW_PORT: free_port()}
        fwd = ",".join(f"hostfwd=tcp:127.0.0.1:{h}-:{g}" for g, h in self.ports.items())
        self.log = self.work / f"journal-{self.boots}.log"  # ttyS1: the journal
        for name in ("qmp.sock", "ttyS0.sock"):
            (self.work / name).unlink(missing_ok=True)
        accel = os.environ.get("APPLIANCE_QEMU_ACCEL", "tcg")
        cmd = [
            "qemu-system-x86_64", "-machine", f"q35,accel={accel}", "-cpu", "max", "-smp", "2", "-m", "2048",
            "-display", "none", "-no-user-config", "-nodefaults",
            "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,file={self.work / 'vars.fd'}",
            "-drive", f"if=none,id=root,file={self.disk},format=qcow2,cache=writeback",
            "-device", "virtio-blk-pci,drive=root",
            "-netdev", f"user,id=n0,{fwd}", "-device", "virtio-net-pci,netdev=n0",
            "-chardev", f"socket,id=s0,path={self.work / 'ttyS0.sock'},server=on,wait=off",
            "-serial", "chardev:s0", "-serial", f"file:{self.log}",
            "-qmp", f"unix:{self.work / 'qmp.sock'},server=on,wait=off",
            "-device", "qemu-xhci,id=xhci",
            "-drive", "if=none,id=cd0,media=cdrom,readonly=on", "-device", "ide-cd,drive=cd0,bus=ide.1,id=cdrom0",
        ]  # fmt: skip
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.qmp = Qmp(self.work / "qmp.sock")
        self.serial = Serial(self.work / "ttyS0.sock")
        self.console_at = 0
        self.console_fresh = True

    def journal(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_journal(self, pattern: str, timeout: float, after: int = 0) -> re.Match[str]:
        """Wait for ``pattern`` in the journal (ttyS1) after offset ``after``; return the match."""
        rx = re.compile(pattern)

        def found() -> re.Match[str] | None:
            assert self.alive(), "QEMU exited"
            # Only whole lines: QEMU writes the serial log as bytes arrive, so the
            # last line may still be half-written when it is read.
            text = self.journal()
            return rx.search(text[: text.rfind("\n") + 1], after)

        return wait_for(found, timeout=timeout, what=f"{pattern!r} in the guest's journal ({self.log})")  # type: ignore[return-value]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def echo(self, guest_port: int = 104, timeout: int = 5) -> bool:
        done = subprocess.run(
            ["echoscu", "-to", str(timeout), "-ta", str(timeout), "-aec", AET, "127.0.0.1", str(self.ports[guest_port])],
            capture_output=True, text=True,
        )
        return done.returncode == 0

    def wait_echo(self, guest_port: int = 104) -> float:
        """Poll C-ECHO until answered; return seconds since QEMU started."""

        def answered() -> bool:
            assert self.alive(), f"QEMU exited: {self.proc and self.proc.stdout and self.proc.stdout.read()!r}"
            return self.echo(guest_port)

        wait_for(answered, timeout=BOOT_TIMEOUT, what=f"a C-ECHO answer on guest port {guest_port}")
        return time.monotonic() - self.started

    def powerdown(self, timeout: float = 180) -> float:
        t = time.monotonic()
        self.qmp.execute("system_powerdown")
        wait_for(lambda: not self.alive(), timeout=timeout, what="the guest to power off")
        self._closed()
        return time.monotonic() - t

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self._closed()

    def _closed(self) -> None:
        (self.work / f"ttyS0-{self.boots}.log").write_text(self.serial.text())
        self.qmp.close()
        self.serial.close()

    def insert_stick(self, stick: Path, name: str = "usb0") -> None:
        """Hot-plug the FAT image ``stick`` as a USB mass-storage device (QMP)."""
        self.qmp.execute("blockdev-add", **{"node-name": name, "driver": "raw",
                                            "file": {"driver": "file", "filename": str(stick)}})
        self.qmp.execute("device_add", driver="usb-storage", bus="xhci.0", drive=name, id=f"{name}disk",
                         removable=True)

    def remove_stick(self, name: str = "usb0") -> None:
        """Pull the stick ``insert_stick`` plugged, and wait until QEMU has let go of it."""
        self.qmp.execute("device_del", id=f"{name}disk")
        # device_del only asks the guest; the device is gone when QOM no longer lists it.
        wait_for(lambda: not any(c["name"] == f"{name}disk"
                                 for c in self.qmp.execute("qom-list", path="/machine/peripheral")),
                 timeout=60, what="the stick to be detached")

        def released() -> bool:  # the usb-storage's inner SCSI disk lets go of the node a little later
            try:
                self.qmp.execute("blockdev-del", **{"node-name": name})
                return True
            except AssertionError as exc:
                if "in use" not in str(exc):
                    raise
                return False

        wait_for(released, timeout=60, what="QEMU to release the stick's block node")

    def console_of_this_boot(self) -> None:
        """Read the service console from the start of the boot running now (the guest may have
        restarted by itself, in the same QEMU): the kernel's last banner on ttyS0 (console=ttyS0)."""
        self.console_at = max(0, self.serial.text().rfind("Linux version "))
        self.console_fresh = True

    def menu(self, after: int = 0, timeout: float = 300) -> int:
        """Wait for the console's main menu on ttyS0 (declining the first-boot password offer)."""
        at = self.serial.expect(r"(Set the service password now\? \[Y/n\]: |Choice: )", after, timeout=timeout)
        if self.serial.text()[:at].endswith("[Y/n]: "):
            self.serial.send("n")
            at = self.serial.expect(r"Choice: ", at)
        return at

    def disk_raw(self) -> Path:
        """The (powered-off) disk as a raw image in the work folder; the caller removes it."""
        assert not self.alive()
        full = self.work / "disk.raw"
        run(["qemu-img", "convert", "-O", "raw", str(self.disk), str(full)], timeout=300)
        return full

    def data_partition(self, into: Path, raw: Path | None = None) -> Path:
        """Unpack the data partition from the (powered-off) disk, or from its ``raw`` copy,
        into ``into``; return it."""
        full = raw or self.disk_raw()
        start, count = gpt_partition(full, "appliance-data")
        part = self.work / "data.img"
        run(["dd", f"if={full}", f"of={part}", "bs=1M", "iflag=skip_bytes,count_bytes", f"skip={start * 512}",
             f"count={count * 512}", "conv=sparse", "status=none"], timeout=300)  # fmt: skip
        if raw is None:
            full.unlink()
        shutil.rmtree(into, ignore_errors=True)
        into.mkdir(parents=True)
        run(["debugfs", "-R", f"rdump / {into}", str(part)])
        features = re.search(r"^Filesystem features:\s*(.*)$", run(["dumpe2fs", "-h", str(part)]), re.M)
        # The store relies on has_journal (appliance.store.disk.file_fsync_commits_rename).
        self.data_features = set(features.group(1).split()) if features else set()
        part.unlink()
        return into


def gpt_entries(image: Path) -> list[tuple[str, int, int]]:
    """(name, first LBA, LBA count) of every GPT partition of ``image`` (512-byte sectors)."""
    with image.open("rb") as f:
        f.seek(512)
        header = f.read(92)
        assert header[:8] == b"EFI PART", f"{image} has no GPT"
        entries_lba, n_entries, entry_size = struct.unpack_from("<QII", header, 72)
        f.seek(entries_lba * 512)
        table = f.read(n_entries * entry_size)
    found = []
    for i in range(n_entries):
        e = table[i * entry_size : (i + 1) * entry_size]
        if e[:16] == bytes(16):
            continue
        first, last = struct.unpack_from("<QQ", e, 32)
        found.append((e[56:128].decode("utf-16-le").rstrip("\0"), first, last - first + 1))
    return found


def gpt_names(image: Path) -> list[str]:
    """The names (labels) of ``image``'s GPT partitions, in table order."""
    return [name for name, _first, _count in gpt_entries(image)]


def gpt_partition(image: Path, name: str) -> tuple[int, int]:
    """(first LBA, LBA count) of the GPT partition called ``name`` (512-byte sectors)."""
    for found, first, count in gpt_entries(image):
        if found == name:
            return first, count
    raise AssertionError(f"{image} has no partition named {name}")


class StoreView:
    """A copy of the box's data partition: its index and its object files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        con = sqlite3.connect(root / "index.sqlite")
        self.index = dict(con.execute("SELECT sop_instance_uid, path FROM instances").fetchall())
        con.close()
        self.files: dict[str, Path] = {}
        for p in (root / "objects").rglob("*"):
            if p.is_file():
                self.files[str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)] = p

    def check_consistent(self) -> None:
        """Every index row has its file and every file its row; every file parses whole."""
        assert set(self.index) == set(self.files), (
            f"index and files disagree: only in the index {sorted(set(self.index) - set(self.files))[:5]}, "
            f"only as files {sorted(set(self.files) - set(self.index))[:5]}"
        )
        for uid, rel in self.index.items():
            assert (self.root / rel).is_file(), f"index row {uid} points at missing {rel}"
        for uid, p in self.files.items():
            ds = dcmread(p)
            assert str(ds.SOPInstanceUID) == uid
            if "PixelData" in ds:
                assert len(ds.PixelData) > 0


def require_tools(*extra: str) -> None:
    """Fail with what to install when a tool the image tests need is missing."""
    for tool in ("qemu-system-x86_64", "qemu-img", "echoscu", "storescu", "debugfs", *extra):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: scripts/test-image installs what the image tests need")
    if not OVMF_CODE.exists():
        pytest.fail(f"{OVMF_CODE} is missing: install Debian's ovmf (scripts/test-image does)")
