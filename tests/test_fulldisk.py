"""A full (or failing) disk at each step of storing, on real small file systems (root only):
the sender hears Out of Resources, never an abort; index and files agree afterwards; a
cleanup that fails keeps the clean-shutdown mark away; reindex says so in one line."""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import pytest
from pynetdicom import AE

from appliance.config import ScpConfig, StoreConfig
from appliance.conformance import SOPClass, Status, TransferSyntax
from appliance.store.ingest import Ingest, Source
from appliance.store.store import Store
from conftest import RunningServer
from helpers import ROOT, ct_series, encode

PAGE = 4096


def _sh(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"{' '.join(cmd)}: {r.stderr.strip()}")


@pytest.fixture
def mount(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    """mount(name, *args): a real file system at tmp_path/name (root only); unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    mounted: list[Path] = []

    def make(name: str, *args: str) -> Path:
        where = tmp_path / name
        where.mkdir()
        _sh("mount", *args, str(where))
        mounted.append(where)
        return where

    yield make
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], check=False)  # lazily: a failed test may hold files


def fill(fs: Path, leave: int) -> Path:
    """Fill the file system ``fs`` with one file so that ``leave`` bytes stay free."""
    filler = fs / "filler"
    st = os.statvfs(fs)
    todo = st.f_bavail * st.f_frsize - leave
    chunk = b"\xff" * 2**20
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while todo > 0:
            todo -= os.write(fd, chunk[:todo])
    except OSError:
        pass  # full
    finally:
        os.close(fd)
    return filler


def rows_and_files(store: Store) -> tuple[set[str], set[str]]:
    files = {str(p.relative_to(store.data_dir)) for p in store.objects.rglob("*.dcm")}
    return set(store.index.paths()), files


def send(srv: RunningServer, datasets: list) -> list:  # type: ignore[type-arg]
    """Send ``datasets`` on one association until one is refused; return the responses."""
    ae = AE(ae_title="FULLSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(SOPClass.CT_IMAGE, [TransferSyntax.EXPLICIT_LE])
    ae.add_requested_context(SOPClass.VERIFICATION)
    assoc = ae.associate("127.0.0.1", srv.port, ae_title=srv.ae_title)
    assert assoc.is_established
    answers = []
    for ds in datasets:
        rsp = assoc.send_c_store(ds)
        assert not assoc.is_aborted and "Status" in rsp, "the association was aborted, not answered"
        answers.append(rsp)
        if rsp.Status != Status.SUCCESS:
            break
    assert assoc.send_c_echo().Status == Status.SUCCESS  # the SCP still answers on this association
    assoc.release()
    return answers


def server(data_dir: Path) -> RunningServer:
    return RunningServer(data_dir, replace(ScpConfig(), bind="127.0.0.1", port=0), StoreConfig(min_free_mb=0))


def refused_then_stored(srv: RunningServer, series: list, filler: Path,  # type: ignore[type-arg]
                        owed: int = 0) -> None:
    """Send until one is refused with Out of Resources; a new association still echoes;
    once ``filler`` is gone the refused object is stored; index rows == files throughout,
    except for the ``owed`` rows of objects answered before their row could be written,
    which are written with the next object stored."""
    before = len(rows_and_files(srv.store)[1])
    answers = send(srv, series)
    refused = answers[-1]
    assert refused.Status == Status.OUT_OF_RESOURCES, answers
    assert "nothing was stored" in refused.ErrorComment
    lost = series[len(answers) - 1]
    assert srv.store.locate(lost.SOPInstanceUID) is None
    rows, files = rows_and_files(srv.store)
    assert len(files - rows) == owed and rows <= files and len(files) == before + len(answers) - 1
    assert list(srv.store.tmp.iterdir()) == []
    assert send(srv, [])[:0] == []  # C-ECHO on a new association
    filler.unlink()
    assert [a.Status for a in send(srv, [lost])] == [Status.SUCCESS]
    rows, files = rows_and_files(srv.store)
    assert rows == files and len(files) == before + len(answers)


@pytest.mark.parametrize("step", ["index insert", "temp write"])
def test_a_full_tmpfs_is_answered_out_of_resources(mount, caplog, step):
    """'index insert': the object's file fits but SQLite's WAL cannot grow, so its index
    row, written after the answer, fails: the object was durable when it was acknowledged,
    so it stays, its row is owed and written with the next object stored once there is
    room (before that, its own next object is refused at the temp write). 'temp write':
    not even the file fits."""
    fs = mount("fs", "-t", "tmpfs", "-o", "size=4m", "tmpfs")
    srv = server(fs / "d")
    try:
        series = ct_series(8, rows=64, cols=64)
        assert [a.Status for a in send(srv, series[:1])] == [Status.SUCCESS]
        size = srv.store.locate(series[0].SOPInstanceUID).stat().st_size  # type: ignore[union-attr]
        # Room for the file (+ a page for its UIDs' lengths), not for the WAL frames of its row.
        leave = -(-size // PAGE) * PAGE + PAGE if step == "index insert" else 0
        filler = fill(fs, leave)
        with caplog.at_level(logging.INFO):
            refused_then_stored(srv, series[1:], filler, owed=1 if step == "index insert" else 0)
        if step == "index insert":
            assert "is stored and was acknowledged, but the index could not record it yet" in caplog.text
            assert "is now in the index" in caplog.text
    finally:
        srv.stop()


def test_a_full_thin_disk_fails_at_fsync_and_is_answered_out_of_resources(mount, tmp_path):
    """An ext4 on a sparse image whose backing tmpfs is full (a thin-provisioned disk): the
    write lands in the page cache, the fsync after the rename reports ENOSPC."""
    backing = mount("backing", "-t", "tmpfs", "-o", "size=24m", "tmpfs")
    image = backing / "disk.img"
    _sh("truncate", "-s", "64m", str(image))
    _sh("mkfs.ext4", "-q", "-F", "-m", "0", "-e", "continue", "-O", "^has_journal", str(image))
    disk = mount("disk", "-o", "loop", str(image))
    srv = server(disk / "d")
    try:
        series = ct_series(4, rows=64, cols=64)
        assert [a.Status for a in send(srv, series[:1])] == [Status.SUCCESS]
        os.sync()  # the first object is on the image: only new blocks need the backing's room
        refused_then_stored(srv, series[1:], fill(backing, 0))
    finally:
        srv.stop()


def test_a_cleanup_that_fails_withholds_the_clean_mark_until_reconciled(mount, caplog):
    """The index insert fails on a full disk and the file cannot be removed again (its
    folder is append-only): the store must not be marked clean, not even by another writer
    stopping last, and the next start reconciles."""
    fs = mount("fs", "-t", "tmpfs", "-o", "size=4m", "tmpfs")
    data = fs / "d"
    store = Store(data)
    store.open_for_service()
    other = Store(data)  # e.g. a CD import sharing the store
    other.open_for_service()
    ingest = Ingest(store, StoreConfig(min_free_mb=0))
    first, second = ct_series(2, rows=64, cols=64)

    def offer(ds):  # type: ignore[no-untyped-def]
        return ingest.accept(encode(ds), TransferSyntax.EXPLICIT_LE, sop_class_uid=ds.SOPClassUID,
                             sop_instance_uid=None, source=Source("SCANNER"))

    out = offer(first)
    assert out.ok
    series_dir = out.path.parent
    _sh("chattr", "+a", str(series_dir))
    try:
        filler = fill(fs, -(-out.path.stat().st_size // PAGE) * PAGE + PAGE)
        with caplog.at_level(logging.WARNING):
            refused = offer(second)
            assert refused.status == Status.OUT_OF_RESOURCES
            assert refused.comment.startswith("storing failed and could not be undone")
            assert "may not match the files" in caplog.text
            store.close(clean=True)
            other.close(clean=True)  # the last writer: still no mark
            assert "not marking a clean shutdown" in caplog.text
        assert not (data / ".clean-shutdown").exists()
    finally:
        subprocess.run(["chattr", "-a", str(series_dir)], check=False)
    filler.unlink()
    again = Store(data)
    assert again.open_for_service() == {"indexed": 1, "dropped": 0}
    rows, files = rows_and_files(again)
    assert rows == files and len(files) == 2
    again.close(clean=True)
    assert (data / ".clean-shutdown").exists()


def test_reindex_on_a_full_disk_says_so_in_one_line(mount):
    fs = mount("fs", "-t", "tmpfs", "-o", "size=4m", "tmpfs")
    data = fs / "d"
    store = Store(data)
    store.open_for_service()
    ingest = Ingest(store, StoreConfig(min_free_mb=0))
    for ds in ct_series(3, rows=64, cols=64):
        assert ingest.accept(encode(ds), TransferSyntax.EXPLICIT_LE, sop_class_uid=ds.SOPClassUID,
                             sop_instance_uid=None, source=Source("SCANNER")).ok
    store.close(clean=True)
    filler = fill(fs, 0)
    cmd = [str(ROOT / ".venv" / "bin" / "appliance"), "--data-dir", str(data), "reindex"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "full" in r.stderr and "run 'appliance reindex' again" in r.stderr, r.stderr
    filler.unlink()
    old = Store(data)  # the old index was left as it was
    assert old.index.counts()["instances"] == 3
    old.close(clean=False)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "reindexed 3" in r.stdout, r.stderr
