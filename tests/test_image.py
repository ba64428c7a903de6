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

import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
from pydicom import dcmread
from pydicom.fileset import FileSet

from tests.helpers import SAMPLES, ct_series, wait_for, write_series
from tests.vm import (
    AET,
    NEW_PORT,
    Machine,
    StoreView,
    image_path,
    report,
    require_tools,
    run,
)

pytestmark = pytest.mark.slow

#: Files of the shared corpus burnt on the CD: JPEG Lossless (decoded on import) and plain.
CD_FILES = (
    "ts_jpeg_lossless_p14__JPEGLossless_1s_1f_u_16_12.dcm",
    "ts_jpeg_lossless_sv1__Barre_CT-MONO2-16-chest.dcm",
    "ct_ele__LCTSC_CT01.dcm",
    "pt_ele__ACRIN-FLT_wholebody.dcm",
)
RTSTRUCT = "rtstruct_ile__rtstruct.dcm"


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    image = image_path()
    if not image.exists():
        pytest.skip(f"no image at {image}: build it with scripts/build-image (scripts/test-image does)")
    require_tools("xorriso", "mformat")
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
    vm.insert_stick(stick)
    m = vm.wait_journal(r"export (done|failed): ([^\n]*)", timeout=600, after=mark)
    assert m.group(1) == "done", f"the export failed: {m.group(2)}"
    assert "safe to remove" in m.group(2), m.group(2)
    vm.remove_stick()
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
    at = vm.menu()
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
    # On a journaled ext4 the SCP answers after one fsync of the file, with no fsync of its
    # folder (a file's fsync commits its rename there): this cut is what proves it.
    assert "has_journal" in vm.data_features, vm.data_features
    missing = set(acked) - set(view.index)
    assert not missing, f"{len(missing)} acknowledged objects lost in the power cut: {sorted(missing)[:5]}"
    partial = [p for p in (view.root / "objects").rglob("*") if p.is_file() and p.suffix != ".dcm"]
    assert not partial, f"partial objects visible in objects/: {partial[:5]}"
    late = len(set(uid_of.values()) & set(view.index)) - len(acked)
    report("power cut", t, f"SIGKILL to QEMU after {len(acked)} acknowledged C-STOREs; booted again (echo after "
           f"{seconds:.1f} s): all {len(acked)} present and parse, {late} more arrived whole, no partial "
           f"object, index = files ({len(view.index)} objects)")
