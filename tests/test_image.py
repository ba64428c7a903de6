"""The appliance image, booted in QEMU and used the way a technician meets the box.

Slow (minutes under TCG): excluded from the default run; ``scripts/test-image`` runs it.
The steps run in file order on one virtual machine whose disk is a qcow2 overlay on the
built image (the image itself is never written), so what one step leaves on the disk, the
next step sees, across reboots and a power cut:

boot to C-ECHO -> store a CT series and an RT Structure Set -> insert a CD -> insert a USB
stick -> change the port on the serial console -> reboot -> power cut during a transfer.

What the box stored is checked on the host, from the disk itself: after a clean power-off
the data partition is copied out of the overlay (``qemu-img dd``), unpacked with
``debugfs rdump`` (no mount, no root) and its index and files compared.

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
from typing import Any, Iterator

import pytest
from pydicom import dcmread
from pydicom.fileset import FileSet

from tests.helpers import ROOT, SAMPLES, ct_series, free_port, wait_for, write_series

pytestmark = pytest.mark.slow

CACHE = Path(os.environ.get("APPLIANCE_IMAGE_CACHE", Path.home() / ".cache" / "appliance-image"))
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
AET = "ELEKTA_STORAGE"
NEW_PORT = 11112
BOOT_TIMEOUT = 420.0

#: Files of the shared corpus burnt on the CD: JPEG Lossless (decoded on import) and plain.
CD_FILES = (
    "ts_jpeg_lossless_p14__JPEGLossless_1s_1f_u_16_12.dcm",
    "ts_jpeg_lossless_sv1__Barre_CT-MONO2-16-chest.dcm",
    "ct_ele__LCTSC_CT01.dcm",
    "pt_ele__ACRIN-FLT_wholebody.dcm",
)
RTSTRUCT = "rtstruct_ile__rtstruct.dcm"


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
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image), "-F", "raw", str(self.disk)])
        shutil.copy(OVMF_VARS, work / "vars.fd")
        self.proc: subprocess.Popen[bytes] | None = None
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

    def data_partition(self, into: Path) -> Path:
        """Unpack the data partition from the (powered-off) disk into ``into``; return it."""
        assert not self.alive()
        start, count = gpt_partition(self.image, "appliance-data")
        full, part = self.work / "disk.raw", self.work / "data.img"
        run(["qemu-img", "convert", "-O", "raw", str(self.disk), str(full)], timeout=300)
        run(["dd", f"if={full}", f"of={part}", "bs=1M", "iflag=skip_bytes,count_bytes", f"skip={start * 512}",
             f"count={count * 512}", "conv=sparse", "status=none"], timeout=300)  # fmt: skip
        full.unlink()
        shutil.rmtree(into, ignore_errors=True)
        into.mkdir(parents=True)
        run(["debugfs", "-R", f"rdump / {into}", str(part)])
        part.unlink()
        return into


def gpt_partition(image: Path, name: str) -> tuple[int, int]:
    """(first LBA, LBA count) of the GPT partition called ``name`` (512-byte sectors)."""
    with image.open("rb") as f:
        f.seek(512)
        header = f.read(92)
        assert header[:8] == b"EFI PART", f"{image} has no GPT"
        entries_lba, n_entries, entry_size = struct.unpack_from("<QII", header, 72)
        f.seek(entries_lba * 512)
        table = f.read(n_entries * entry_size)
    for i in range(n_entries):
        e = table[i * entry_size : (i + 1) * entry_size]
        first, last = struct.unpack_from("<QQ", e, 32)
        if e[56:128].decode("utf-16-le").rstrip("\0") == name:
            return first, last - first + 1
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


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    image = image_path()
    if not image.exists():
        pytest.skip(f"no image at {image}: build it with scripts/build-image (scripts/test-image does)")
    for tool in ("qemu-system-x86_64", "qemu-img", "echoscu", "storescu", "xorriso", "mformat", "debugfs"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: scripts/test-image installs what the image test needs")
    if not OVMF_CODE.exists():
        pytest.fail(f"{OVMF_CODE} is missing: install Debian's ovmf (scripts/test-image does)")
    m = Machine(image, tmp_path_factory.mktemp("vm"))
    print(f"\n[image] booting {image} ({m.work})", flush=True)
    yield m
    if m.alive():
        m.kill()


@pytest.fixture(scope="module")
def sent() -> dict[str, set[str]]:
    """What the steps stored, by step, for the later checks."""
    return {}


def test_boot_to_echo(vm: Machine) -> None:
    vm.start()
    seconds = vm.wait_echo()
    print(f"\n[image] boot: QEMU start to the first C-ECHO answered: {seconds:.1f} s", flush=True)


def test_store_ct_series_and_rtstruct(vm: Machine, tmp_path: Path, sent: dict[str, set[str]]) -> None:
    t = time.monotonic()
    series = ct_series(20, rows=64, cols=64)
    paths = write_series(series, tmp_path / "ct") + [SAMPLES / RTSTRUCT]
    done = subprocess.run(["storescu", "-v", "-aec", AET, "127.0.0.1", str(vm.ports[104]), *map(str, paths)],
                          capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    acks = log.count("Received Store Response (Success)")
    assert acks == len(paths), f"{acks} of {len(paths)} objects acknowledged with success:\n{log[-2000:]}"
    sent["store"] = {str(ds.SOPInstanceUID) for ds in series} | {str(dcmread(SAMPLES / RTSTRUCT).SOPInstanceUID)}
    report("store", t, f"storescu sent {len(paths)} objects (20 CT slices, 1 RT Structure Set); all answered")


def test_insert_cd(vm: Machine, tmp_path: Path, sent: dict[str, set[str]]) -> None:
    t = time.monotonic()
    disc = tmp_path / "disc"
    disc.mkdir()
    for i, name in enumerate(CD_FILES):
        shutil.copy(SAMPLES / name, disc / f"IM{i:06d}")
    iso = tmp_path / "cd.iso"
    run(["xorriso", "-as", "mkisofs", "-quiet", "-r", "-J", "-V", "PATIENT_CD", "-o", str(iso), str(disc)])
    mark = len(vm.journal())
    vm.qmp.execute("blockdev-change-medium", id="cdrom0", filename=str(iso), format="raw",
                   **{"read-only-mode": "read-only"})
    m = vm.wait_journal(r"import (done|failed): ([^\n]*)", timeout=300, after=mark)
    assert m.group(1) == "done", f"the import failed: {m.group(2)}"
    sent["cd"] = {str(dcmread(SAMPLES / n, stop_before_pixels=True).SOPInstanceUID) for n in CD_FILES}
    report("cd", t, f"ISO of {len(CD_FILES)} files (2 JPEG Lossless) hot-plugged; the box imported it by itself: "
           f"{m.group(2)}")


def test_insert_usb_stick(vm: Machine, tmp_path: Path, sent: dict[str, set[str]]) -> None:
    t = time.monotonic()
    stick = tmp_path / "stick.img"
    with stick.open("wb") as f:
        f.truncate(128 * 1024 * 1024)
    run(["mformat", "-i", str(stick), "-T", str(128 * 2048), "-h", "64", "-s", "32", "-F", "-v", "USBSTICK", "::"])
    mark = len(vm.journal())
    vm.qmp.execute("blockdev-add", **{"node-name": "usb0", "driver": "raw",
                                      "file": {"driver": "file", "filename": str(stick)}})
    vm.qmp.execute("device_add", driver="usb-storage", bus="xhci.0", drive="usb0", id="usbdisk0", removable=True)
    m = vm.wait_journal(r"export (done|failed): ([^\n]*)", timeout=600, after=mark)
    assert m.group(1) == "done", f"the export failed: {m.group(2)}"
    assert "safe to remove" in m.group(2), m.group(2)
    vm.qmp.execute("device_del", id="usbdisk0")
    # device_del only asks the guest; the device is gone when QOM no longer lists it.
    wait_for(lambda: not any(c["name"] == "usbdisk0" for c in vm.qmp.execute("qom-list", path="/machine/peripheral")),
             timeout=60, what="the stick to be detached")

    def released() -> bool:  # the usb-storage's inner SCSI disk lets go of the node a little later
        try:
            vm.qmp.execute("blockdev-del", **{"node-name": "usb0"})
            return True
        except AssertionError as exc:
            if "in use" not in str(exc):
                raise
            return False

    wait_for(released, timeout=60, what="QEMU to release the stick's block node")
    # The stick has no partition table, so it is exported once, as the whole disk: the
    # phantom partition the kernel reads out of its FAT boot sector is not a second stick.
    # (udev repeats "change" events for sda, which the job queue knows it has seen.)
    journal = vm.journal()[mark:]
    assert re.findall(r"usb inserted in (/dev/sda\d+)", journal) == [], "a partition of the stick was taken for a stick"
    assert re.findall(r"export (done|failed):", journal) == ["done"], "the stick was not exported exactly once"

    copy = tmp_path / "stick"
    run(["mcopy", "-s", "-n", "-i", str(stick), "::/", str(copy)])
    dicomdir = next(copy.rglob("DICOMDIR"))
    fs = FileSet(dcmread(dicomdir))
    on_stick = {str(inst.SOPInstanceUID) for inst in fs}
    for inst in fs:
        inst.load()  # every file the DICOMDIR lists is there and parses
    expected = sent["store"] | sent.get("cd", set())
    assert expected <= on_stick, f"not on the stick: {sorted(expected - on_stick)[:5]}"
    report("usb", t, f"FAT stick hot-plugged; the box exported by itself ({m.group(2)}); detached; on the host "
           f"its DICOMDIR lists {len(on_stick)} objects, all readable, every one stored so far among them")


def test_serial_console_changes_port(vm: Machine) -> None:
    t = time.monotonic()
    s = vm.serial
    at = s.expect(r"(Set the service password now\? \[Y/n\]: |Choice: )", 0, timeout=300)
    if s.text()[:at].endswith("[Y/n]: "):
        s.send("n")
        at = s.expect(r"Choice: ", at)
    s.send("2")
    at = s.expect(r"Field to change: ", at)
    s.send("2")
    at = s.expect(r"New Port \(Enter keeps 104\): ", at)
    s.send(str(NEW_PORT))
    at = s.expect(r"Saved: ", at)
    s.send("0")
    s.expect(r"Choice: ", at)
    wait_for(lambda: vm.echo(NEW_PORT), timeout=120, what=f"a C-ECHO answer on the new port {NEW_PORT}")
    report("console", t, f"menu on ttyS0: Storage Server > Port = {NEW_PORT}; C-ECHO answered on {NEW_PORT}")


def test_reboot_keeps_config_and_store(vm: Machine, tmp_path: Path, sent: dict[str, set[str]]) -> None:
    t = time.monotonic()
    off = vm.powerdown()
    view = StoreView(vm.data_partition(tmp_path / "data"))
    view.check_consistent()
    expected = set().union(*sent.values())
    assert expected <= set(view.index), f"not stored: {sorted(expected - set(view.index))[:5]}"
    config = (view.root / "config" / "appliance.toml").read_text()
    assert re.search(rf"^port = {NEW_PORT}$", config, re.M), config
    vm.start()
    seconds = vm.wait_echo(NEW_PORT)
    report("reboot", t, f"powered off in {off:.1f} s; on the data partition: {len(view.index)} objects, index = "
           f"files, every object sent so far, port {NEW_PORT} in the config; booted again, echo on "
           f"{NEW_PORT} after {seconds:.1f} s")


def test_power_cut_during_transfer(vm: Machine, tmp_path: Path) -> None:
    t = time.monotonic()
    series = ct_series(300, rows=256, cols=256)
    paths = write_series(series, tmp_path / "big")
    uid_of = {str(p): str(ds.SOPInstanceUID) for p, ds in zip(paths, series)}
    proc = subprocess.Popen(
        ["storescu", "-v", "-aec", AET, "127.0.0.1", str(vm.ports[NEW_PORT]), *map(str, paths)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    acked: list[str] = []
    current = None
    assert proc.stdout is not None
    for line in proc.stdout:
        if m := re.search(r"Sending file: (\S+)", line):
            current = m.group(1)
        elif "Received Store Response (Success)" in line and current:
            acked.append(uid_of[current])
            if len(acked) == 25:
                vm.kill()  # the power cut, in the middle of the transfer
                break
    proc.kill()
    proc.wait()
    assert len(acked) == 25, f"storescu ended after {len(acked)} acknowledged objects, before the cut"

    vm.start()
    seconds = vm.wait_echo(NEW_PORT)
    vm.powerdown()
    view = StoreView(vm.data_partition(tmp_path / "data"))
    view.check_consistent()
    missing = set(acked) - set(view.index)
    assert not missing, f"{len(missing)} acknowledged objects lost in the power cut: {sorted(missing)[:5]}"
    partial = [p for p in (view.root / "objects").rglob("*") if p.is_file() and p.suffix != ".dcm"]
    assert not partial, f"partial objects visible in objects/: {partial[:5]}"
    late = len(set(uid_of.values()) & set(view.index)) - len(acked)
    report("power cut", t, f"SIGKILL to QEMU after {len(acked)} acknowledged C-STOREs; booted again (echo after "
           f"{seconds:.1f} s): all {len(acked)} present and parse, {late} more arrived whole, no partial "
           f"object, index = files ({len(view.index)} objects)")
