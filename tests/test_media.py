"""Media events hand-built at the pyudev boundary, with real ISO 9660 and FAT images behind them.

A fake udev device carries what pyudev gives (``action``, ``device_node``, ``properties``
as udev sets them in QEMU and on real drives); its device node is a real image file, which
the importer and the USB writer open as they would ``/dev/sr0`` or ``/dev/sda1``.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from appliance.ops import health
from appliance.config import Config, StoreConfig
from appliance.adapters.devices import Change, MediaEvent, MediaWatcher, MediumKind, media_event
from appliance.jobs.media import MediaJobs
from appliance.store.store import Store

from helpers import ct_series, wait_for, write_series


@dataclass
class FakeUdevDevice:
    """What a ``pyudev.Device`` offers the adapter."""

    device_node: str
    properties: dict[str, str] = field(default_factory=dict)
    action: str | None = "change"


def cd(node: str, *, media: bool = True, fs: str = "iso9660", label: str = "PATIENT_CD",
       uuid: str = "2026-11-28-10-15-00-00", action: str | None = "change") -> FakeUdevDevice:
    p = {"SUBSYSTEM": "block", "DEVTYPE": "disk", "DEVNAME": node, "ID_CDROM": "1", "ID_BUS": "ata"}
    if media:
        p |= {"ID_CDROM_MEDIA": "1", "ID_FS_TYPE": fs, "ID_FS_LABEL": label, "ID_FS_UUID": uuid,
              "ID_FS_USAGE": "filesystem"}
    return FakeUdevDevice(node, p, action)


def usb(node: str, *, devtype: str = "partition", fs: str = "vfat", table: bool = False,
        action: str | None = "add") -> FakeUdevDevice:
    p = {"SUBSYSTEM": "block", "DEVTYPE": devtype, "DEVNAME": node, "ID_BUS": "usb",
         "ID_SERIAL": "QEMU_HARDDISK_1-0000:00:04.0-1"}
    if table:
        p["ID_PART_TABLE_TYPE"] = "dos"
    elif fs:
        p |= {"ID_FS_TYPE": fs, "ID_FS_USAGE": "filesystem", "ID_FS_LABEL": "STICK", "ID_FS_UUID": "1234-ABCD"}
    if devtype == "partition":
        p["ID_PART_ENTRY_SCHEME"] = "dos"  # udev's blkid builtin: the entry in the disk's table
    return FakeUdevDevice(node, p, action)


# -- the adapter --------------------------------------------------------------------------------


def test_cd_insert_and_tray_open() -> None:
    e = media_event(cd("/dev/sr0"))
    assert e == MediaEvent(MediumKind.CD, Change.INSERTED, "/dev/sr0", "iso9660", "PATIENT_CD",
                           "/2026-11-28-10-15-00-00/PATIENT_CD")
    assert media_event(cd("/dev/sr0", media=False)) == MediaEvent(MediumKind.CD, Change.REMOVED, "/dev/sr0")
    assert media_event(cd("/dev/sr0", fs="")) is None  # audio or blank disc
    assert media_event(cd("/dev/sr0", action=None)) is not None  # present at start-up (enumeration)


def test_usb_partition_whole_disk_and_what_is_ignored() -> None:
    part = media_event(usb("/dev/sda1"))
    assert part is not None and part.kind is MediumKind.USB and part.change is Change.INSERTED
    assert part.device == "/dev/sda1" and part.fs_type == "vfat"
    whole = media_event(usb("/dev/sda", devtype="disk"))  # FAT without a partition table
    assert whole is not None and whole.device == "/dev/sda"
    assert media_event(usb("/dev/sda", devtype="disk", table=True)) is None  # its partitions come
    assert media_event(usb("/dev/sdb1", fs="swap")) is None
    assert media_event(usb("/dev/sda1", action="remove")) == MediaEvent(MediumKind.USB, Change.REMOVED, "/dev/sda1")
    # A stick formatted whole: the kernel reads its FAT boot sector as a partition table too
    # and adds sda1 over the same file system; blkid finds no table, so no partition entry.
    phantom = usb("/dev/sda1")
    del phantom.properties["ID_PART_ENTRY_SCHEME"]
    assert media_event(phantom) is None
    sata = usb("/dev/sdb1")
    sata.properties["ID_BUS"] = "ata"
    assert media_event(sata) is None
    assert media_event(FakeUdevDevice("/dev/loop0", {"SUBSYSTEM": "block", "DEVTYPE": "disk"})) is None


# -- jobs -----------------------------------------------------------------------------------------


@pytest.fixture
def settings() -> Config:
    return Config(store=StoreConfig(min_free_mb=0))


def _iso(tmp_path: Path, name: str, n: int) -> tuple[Path, list[str]]:
    series = ct_series(n)
    src = tmp_path / f"{name}-src"
    write_series(series, src / "DICOM")
    iso = tmp_path / f"{name}.iso"
    subprocess.run(["xorriso", "-as", "mkisofs", "-R", "-J", "-V", name.upper(), "-o", str(iso), str(src)],
                   check=True, capture_output=True)
    return iso, [str(ds.SOPInstanceUID) for ds in series]


def _instances(store: Store) -> set[str]:
    return {r.sop_instance_uid for r in store.instances()}


@pytest.mark.skipif(shutil.which("xorriso") is None, reason="xorriso is not installed")
def test_cd_imported_once_for_the_duplicate_change_events(tmp_path: Path, store: Store, settings: Config,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    iso, uids = _iso(tmp_path, "disc", 4)
    jobs = MediaJobs(store, lambda: settings)
    jobs.start()
    watcher = MediaWatcher(jobs.submit)
    # QEMU and real drives: tray open, tray close, two identical change events.
    with caplog.at_level(logging.INFO, logger="appliance.adapters.devices"):
        watcher.handle(cd(str(iso)))
        watcher.handle(cd(str(iso)))
    # The journal tells of the insertion once, not once per udev event.
    assert [r.getMessage().split(" (")[0] for r in caplog.records if r.name == "appliance.adapters.devices"] == [
        f"cd inserted in {iso}"]
    wait_for(lambda: jobs.idle() and jobs.results, 60, "the import")
    assert len(jobs.results) == 1
    assert jobs.results[0].ok and jobs.results[0].kind == "import"
    assert _instances(store) == set(uids)
    last = health.last_results(store.data_dir)["import"]
    assert last.ok and "4 imported" in last.summary
    assert list((store.data_dir / "imports").glob("*.txt"))

    # Eject (a change without media), insert again: a new insertion, imported again (nothing new).
    watcher.handle(cd(str(iso), media=False))
    watcher.handle(cd(str(iso)))
    wait_for(lambda: jobs.idle() and len(jobs.results) == 2, 60, "the second import")
    assert jobs.results[1].ok and "4 already stored" in jobs.results[1].summary
    jobs.stop()


@pytest.mark.skipif(shutil.which("mformat") is None or shutil.which("xorriso") is None,
                    reason="mtools or xorriso is not installed")
def test_usb_export_waits_for_the_cd_import_one_job_at_a_time(tmp_path: Path, store: Store,
                                                              settings: Config) -> None:
    iso, uids = _iso(tmp_path, "disc", 3)
    fat = tmp_path / "stick.img"
    subprocess.run(["truncate", "-s", "8M", str(fat)], check=True)
    subprocess.run(["mformat", "-i", str(fat), "::"], check=True, capture_output=True)
    jobs = MediaJobs(store, lambda: settings)
    assert jobs.export is not None, "the USB writer (appliance.media.exporter) is part of this build"
    watcher = MediaWatcher(jobs.submit)
    # Both media arrive before the worker starts: the stick must wait for the disc.
    watcher.handle(cd(str(iso)))
    watcher.handle(usb(str(fat)))
    watcher.handle(usb(str(fat), action="change"))  # a repeated event for the same stick
    jobs.start()
    wait_for(lambda: jobs.idle() and len(jobs.results) == 2, 120, "the import and the export")
    assert [r.kind for r in jobs.results] == ["import", "export"]
    assert all(r.ok for r in jobs.results), [r.summary for r in jobs.results]
    # The export ran after the import had stored everything: it holds the whole disc.
    assert "3 written" in jobs.results[1].summary
    listing = subprocess.run(["mdir", "-i", str(fat), "-/", "-b", "::"], capture_output=True, text=True,
                             check=True).stdout
    assert "DICOMDIR" in listing
    assert sum(1 for line in listing.splitlines() if "/IM" in line.upper()) == len(uids)
    assert health.last_results(store.data_dir)["export"].ok
    jobs.stop()


def test_unreadable_medium_is_a_failed_job_and_the_worker_goes_on(tmp_path: Path, store: Store,
                                                                 settings: Config) -> None:
    jobs = MediaJobs(store, lambda: replace(settings))
    jobs.start()
    jobs.submit(MediaEvent(MediumKind.CD, Change.INSERTED, str(tmp_path / "missing"), "iso9660", "X", "x"))
    wait_for(lambda: jobs.idle() and jobs.results, 30, "the failed import")
    assert not jobs.results[0].ok and "does not exist" in jobs.results[0].summary
    assert not health.last_results(store.data_dir)["import"].ok
    assert jobs.alive()
    jobs.stop()
