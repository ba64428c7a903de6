"""The store's crash safety: atomic writes, recovery after a crash, ENOSPC, reindex."""

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from appliance.dicom import dicomio
from appliance.config import StoreConfig
from appliance.conformance import Status, TransferSyntax
from appliance.store.ingest import Ingest, Source
from appliance.store.placing import UidLocks
from appliance.store.store import Store, path_component
from helpers import ct_series, encode, sample, tmpfs

NET = Source("SCANNER")
ROOT = Path(__file__).resolve().parent.parent


def put_series(ingest, n=3):
    outs = []
    for ds in ct_series(n):
        outs.append(ingest.accept(encode(ds), TransferSyntax.EXPLICIT_LE, sop_class_uid=ds.SOPClassUID,
                                  sop_instance_uid=None, source=NET))
    assert all(o.ok for o in outs)
    return outs


def test_path_component():
    assert path_component("1.2.840.1") == "1.2.840.1"
    for bad in ("..", "../x", "1.2/3", "", "1..2", "x" * 10):
        c = path_component(bad)
        assert c.startswith("h") and "/" not in c and c not in (".", "..")


def test_clean_restart_skips_recovery_and_keeps_everything(tmp_path, rules):
    store = Store(tmp_path / "d")
    store.open_for_service()
    put_series(Ingest(store, rules))
    store.close(clean=True)
    again = Store(tmp_path / "d")
    assert again.open_for_service() == {"indexed": 0, "dropped": 0}
    assert again.index.counts()["instances"] == 3


def test_after_a_crash_index_and_files_agree(tmp_path, rules):
    store = Store(tmp_path / "d")
    store.open_for_service()
    outs = put_series(Ingest(store, rules), 4)
    # A crash: no clean-shutdown mark, a half-written temp file, an index row whose file
    # vanished, and a file whose index row was lost (power cut after the rename).
    (store.tmp / "123-1-1.part").write_bytes(b"half an object")
    outs[0].path.unlink()
    store.index.remove(outs[1].sop_instance_uid)
    store.close(clean=False)  # the crashed process's lock goes with it, and it leaves no mark
    again = Store(tmp_path / "d")
    result = again.open_for_service()
    assert result == {"indexed": 1, "dropped": 1}
    assert list(again.tmp.iterdir()) == []
    on_disk = {str(p.relative_to(again.data_dir)) for p in again.objects.rglob("*.dcm")}
    assert set(again.index.paths()) == on_disk and len(on_disk) == 3
    assert again.locate(outs[1].sop_instance_uid) == outs[1].path


def test_reindex_rebuilds_from_files(tmp_path, rules):
    store = Store(tmp_path / "d")
    put_series(Ingest(store, rules), 5)
    store.index.close()
    (tmp_path / "d" / "index.sqlite").unlink()
    for extra in ("index.sqlite-wal", "index.sqlite-shm"):
        (tmp_path / "d" / extra).unlink(missing_ok=True)
    again = Store(tmp_path / "d")
    assert again.reindex() == 5
    row = next(again.index.query("SELECT volume_ok, volume_reason FROM series"))
    assert row["volume_ok"] == 1


@pytest.fixture
def tiny_fs(tmp_path):
    """A small tmpfs with few inodes: a real ENOSPC (needs root, as CI is)."""
    with tmpfs(tmp_path / "tiny", "size=8m,nr_inodes=64") as mnt:
        yield mnt


def test_enospc_leaves_nothing_behind_and_storing_resumes(tiny_fs):
    store = Store(tiny_fs / "d")
    ingest = Ingest(store, StoreConfig(min_free_mb=0))
    big = sample("ct_ele_2")  # 512x512x16 bit: 0.5 MiB each
    data = big.path.read_bytes()
    off, ts = dicomio.split_part10(data)
    store.open_for_service()  # as the SCP does: index, WAL and lock open before the disk fills up
    store.index.counts()
    fillers = tiny_fs / "fillers"
    fillers.mkdir()
    with pytest.raises(OSError):  # use up every inode: the next file creation hits ENOSPC
        for i in range(1000):
            (fillers / str(i)).touch()
    out = ingest.accept(data[off:], ts, sop_class_uid=big.sop_class_uid, sop_instance_uid=None, source=NET)
    assert out.status == Status.OUT_OF_RESOURCES and "disk is full; nothing was stored" in out.comment
    assert list(store.tmp.iterdir()) == [] and list(store.objects.rglob("*.dcm")) == []
    assert store.index.counts()["instances"] == 0
    shutil.rmtree(fillers)
    out = ingest.accept(data[off:], ts, sop_class_uid=big.sop_class_uid, sop_instance_uid=None, source=NET)
    assert out.ok, out.comment
    store.index.close()
    shutil.rmtree(tiny_fs / "d", ignore_errors=True)


def test_clean_mark_survives_only_if_every_writer_stopped_cleanly(tmp_path, rules):
    """Two writers share the store (an SCP and a CD import, or an SCP restarted on new
    settings): the first to stop must not mark the store clean while the other may crash."""
    a = Store(tmp_path / "d")
    a.open_for_service()
    b = Store(tmp_path / "d")
    assert b.open_for_service() == {"indexed": 0, "dropped": 0}  # a is alive: nothing crashed
    outs = put_series(Ingest(b, rules), 2)
    a.close(clean=True)
    assert not (tmp_path / "d" / ".clean-shutdown").exists()
    # b "crashes": its index row for one object is lost, and it never closes cleanly.
    b.index.remove(outs[0].sop_instance_uid)
    b.close(clean=False)
    c = Store(tmp_path / "d")
    assert c.open_for_service() == {"indexed": 1, "dropped": 0}
    c.close(clean=True)
    assert (tmp_path / "d" / ".clean-shutdown").exists()


def test_a_one_shot_writer_clears_the_clean_mark(tmp_path, rules):
    store = Store(tmp_path / "d")
    store.open_for_service()
    store.close(clean=True)
    writer = Store(tmp_path / "d")  # e.g. 'appliance import', which never calls open_for_service
    put_series(Ingest(writer, rules), 1)
    assert not (tmp_path / "d" / ".clean-shutdown").exists()
    writer.index.close()


def test_an_incomplete_file_left_by_a_power_cut_is_quarantined(tmp_path, rules):
    store = Store(tmp_path / "d")
    store.open_for_service()
    [out] = put_series(Ingest(store, rules), 1)
    # A power cut after the rename but before the fsync: the file is cut short, no index row.
    data = out.path.read_bytes()
    store.index.remove(out.sop_instance_uid)
    out.path.write_bytes(data[: len(data) // 3])
    store.close(clean=False)
    again = Store(tmp_path / "d")
    assert again.open_for_service() == {"indexed": 0, "dropped": 0, "quarantined": 1}
    assert list(again.objects.rglob("*.dcm")) == []
    assert len(list(again.quarantine.iterdir())) == 1


_HOLD_UID_LOCK = """
import sys
from pathlib import Path
from appliance.store.placing import UidLocks
with UidLocks(Path(sys.argv[1])).hold(sys.argv[2]):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_storing_a_uid_waits_while_another_process_or_store_holds_it(tmp_path, rules):
    """The SCP and a CD import run in different processes. Between looking a SOP Instance
    UID up and indexing it, no other writer may store the same UID, or a different object
    could silently replace one already acknowledged under the reject policy."""
    data = tmp_path / "d"
    store = Store(data)
    store.open_for_service()
    ingest = Ingest(store, rules)
    first, second = ct_series(2)

    def stored_while_held(ds, release) -> None:
        done = threading.Event()
        outcome = []

        def put() -> None:
            outcome.append(ingest.accept(encode(ds), TransferSyntax.EXPLICIT_LE, sop_class_uid=ds.SOPClassUID,
                                         sop_instance_uid=None, source=NET))
            done.set()

        threading.Thread(target=put, daemon=True).start()
        assert not done.wait(0.5), "stored while another writer held the UID's lock"
        release()
        assert done.wait(30) and outcome[0].ok, outcome

    holder = subprocess.Popen([sys.executable, "-c", _HOLD_UID_LOCK, str(data), first.SOPInstanceUID],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        stored_while_held(first, lambda: holder.stdin.close())
    finally:
        holder.kill()
        holder.wait()

    other = UidLocks(data)  # as a second Store of the same process: its own lock description
    lock = other.hold(second.SOPInstanceUID)
    lock.__enter__()
    stored_while_held(second, lambda: lock.__exit__(None, None, None))
    other.close()
    assert store.index.counts()["instances"] == 2


def _open_index(path: Path, barrier, results) -> None:
    from appliance.store.index import Index

    barrier.wait()
    try:
        Index(path).close()
        results.put("ok")
    except Exception as exc:  # noqa: BLE001 - reported to the test
        results.put(f"{type(exc).__name__}: {exc}")


def test_processes_creating_a_new_index_at_once_all_open_it(tmp_path):
    """On a new data partition the supervisor, its SCP and a CD import may create the index
    at the same moment: one creates the schema, none fails with 'table already exists'."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    outcomes = []
    for round_ in range(8):
        path = tmp_path / str(round_) / "index.sqlite"
        path.parent.mkdir()
        barrier, results = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_open_index, args=(path, barrier, results)) for _ in range(4)]
        for p in procs:
            p.start()
        outcomes += [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(60)
    assert set(outcomes) == {"ok"}, [o for o in outcomes if o != "ok"][:3]


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _fd_targets() -> list[str]:
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return sorted(targets)


def test_threads_that_come_and_go_give_back_their_index_descriptors(tmp_path, rules):
    """The SCP runs one thread per association: 300 of them storing and looking up through
    one Store leave no more descriptors open than the index's few idle connections hold
    (they used to keep index.sqlite and its WAL open each, until C-STOREs failed at the
    descriptor limit), and close() gives back every one."""
    before_store = _open_fds()
    store = Store(tmp_path / "d")
    store.open_for_service()
    ingest = Ingest(store, rules)
    put_series(ingest, 1)
    start, at_start = _open_fds(), _fd_targets()
    datasets = iter(ct_series(300, rows=4, cols=4))
    failures = []

    def association() -> None:
        ds = next(datasets)
        out = ingest.accept(encode(ds), TransferSyntax.EXPLICIT_LE, sop_class_uid=ds.SOPClassUID,
                            sop_instance_uid=None, source=NET)
        if not out.ok or store.locate(ds.SOPInstanceUID) != out.path or not store.index.counts()["instances"]:
            failures.append(out.comment)

    def associations(n: int, at_once: int) -> None:
        for _ in range(0, n, at_once):
            threads = [threading.Thread(target=association) for _ in range(at_once)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)

    associations(150, 1)  # one after another
    assert not failures, failures[:3]
    assert _open_fds() <= start + 2, (at_start, _fd_targets())
    # Ten at once: more connections are open while they overlap, and SQLite keeps the
    # database descriptor of a closed one (for reuse) while others hold its locks; so the
    # count is bounded by how many run at once (3 each at most), not by how many came and went.
    associations(150, 10)
    assert not failures, failures[:3]
    assert _open_fds() <= start + 3 * 10, (at_start, _fd_targets())
    assert store.index.counts()["instances"] == 301
    store.close()
    assert _open_fds() <= before_store


def test_named_queries_list_the_store_in_their_documented_orders(ingest):
    """The index's named queries (what `appliance ls`, the console, the sender and the USB export read)."""
    a = ct_series(3, patient="A^A")
    for ds, number in zip(a, (3, 1, 2)):
        ds.InstanceNumber = number
    b = ct_series(2, study_uid=a[0].StudyInstanceUID, patient="A^A")
    for ds in b:
        ds.SeriesNumber = 1
    c = ct_series(1, patient="B^B")
    for ds in a + b + c:
        assert ingest.accept(encode(ds), TransferSyntax.EXPLICIT_LE, sop_class_uid=ds.SOPClassUID,
                             sop_instance_uid=None, source=NET).ok
    store = ingest.store
    store.update_verdicts()
    study_a, study_c = a[0].StudyInstanceUID, c[0].StudyInstanceUID
    series_a, series_b = a[0].SeriesInstanceUID, b[0].SeriesInstanceUID

    assert store.counts() == {"patients": 2, "studies": 2, "series": 3, "instances": 6}
    assert (store.level_of(study_a), store.level_of(series_b), store.level_of("1.2.3")) == ("study", "series", None)
    assert store.series_in_study(study_a) == store.series_in_study(study_a, uid_breaks_ties=False) == [series_b, series_a]
    studies = store.study_listing()
    assert [(s.study_uid, s.patient_name, s.series, s.instances) for s in studies] == [
        (study_a, "A^A", 2, 5), (study_c, "B^B", 1, 1)]
    assert store.study_uids() == [study_a, study_c]
    assert store.study_uids(received_after=studies[0].last_received) == [study_c]
    assert [(r.study_uid, r.modalities, r.instances) for r in store.recent_studies(1)] == [(study_c, "CT", 1)]
    assert [i.sop_instance_uid for i in store.ordered_instances(series_a)] == [
        a[1].SOPInstanceUID, a[2].SOPInstanceUID, a[0].SOPInstanceUID]
    assert [i.sop_instance_uid for i in store.study_instances(study_a)] == [
        i.sop_instance_uid for s in sorted((series_a, series_b)) for i in store.ordered_instances(s)]
    one = store.series(series_a)
    assert one is not None and (one.study_uid, one.modality, one.series_number, one.instances) == (study_a, "CT", 3, 3)
    assert one.frame_of_reference_uid == a[0].FrameOfReferenceUID and one.volume_ok is True
    assert store.series("1.2.3") is None and store.instance("1.2.3") is None
    assert [(s.series_uid, s.instances) for s in store.series_listing() if s.study_uid == study_a] == [
        (series_b, 2), (series_a, 3)]
    listed = store.instance_listing()
    assert len(listed) == 6 and all(i.calling_ae == "SCANNER" for i in listed)
    assert [i.series_uid for i in listed] == sorted(i.series_uid for i in listed)


def test_the_export_queue_keeps_its_entries_and_the_history(tmp_path):
    from appliance.store.queue import ExportQueue, ExportRecord

    queue = ExportQueue(tmp_path)
    try:
        assert queue.add("1.2.3", "study") and queue.add("1.2.4", "series") and not queue.add("1.2.3", "study")
        assert queue.remove("1.2.4") and not queue.remove("1.2.4")
        assert queue.mark("done") is None
        queue.record(ExportRecord("2026-01-01T00:00", "2026-01-01T00:01", "STICK", "all studies", "done", 3, 9, True))
        queue.record(ExportRecord("2026-01-02T00:00", "2026-01-02T00:01", "STICK", "queue", "done", 1, 3, False))
        queue.record(ExportRecord("2026-01-03T00:00", "2026-01-03T00:01", "STICK", "all", "failed", 0, 0, True))
    finally:
        queue.close()
    again = ExportQueue(tmp_path)
    try:
        assert [(e.uid, e.level) for e in again.entries()] == [("1.2.3", "study")]
        assert again.mark("done") == "2026-01-01T00:00"
    finally:
        again.close()


def _received(ingest, ds):
    """A network C-STORE of ``ds`` through the SCP's path, answered but not yet settled."""
    body = encode(ds)
    incoming = ingest.open_stream(TransferSyntax.EXPLICIT_LE, ds.SOPClassUID, ds.SOPInstanceUID, "SCANNER")
    incoming.write(memoryview(body))
    return incoming, incoming.finish()


def test_an_answered_object_is_indexed_after_the_answer_and_holds_its_uid_until_then(tmp_path, rules):
    """The SCP writes an object's index row after its answer: the object is durable when
    finish() returns, its row appears at settle(), and meanwhile its UID stays locked, so
    a different object with the same UID is refused once the row exists, never stored."""
    store = Store(tmp_path / "d")
    store.open_for_service()
    ingest = Ingest(store, rules)
    ds, = ct_series(1)
    incoming, outcome = _received(ingest, ds)
    assert outcome.ok and outcome.path.is_file()
    assert store.locate(ds.SOPInstanceUID) is None  # answered, row not written yet

    changed = ct_series(1)[0]
    changed.SOPInstanceUID = ds.SOPInstanceUID
    changed.StudyInstanceUID, changed.SeriesInstanceUID = ds.StudyInstanceUID, ds.SeriesInstanceUID
    changed.PatientName = "SOMEONE^ELSE"
    done = threading.Event()
    second = []

    def put() -> None:
        second.append(ingest.accept(encode(changed), TransferSyntax.EXPLICIT_LE, sop_class_uid=changed.SOPClassUID,
                                    sop_instance_uid=None, source=NET))
        done.set()

    threading.Thread(target=put, daemon=True).start()
    assert not done.wait(0.5), "looked the UID up before the first object's row existed"
    incoming.settle()
    assert done.wait(30)
    assert second[0].status == Status.REFUSED_DUPLICATE, second
    assert store.locate(ds.SOPInstanceUID) == outcome.path
    incoming.settle()  # idempotent
    store.close(clean=True)
    assert (store.data_dir / ".clean-shutdown").exists()


def test_an_object_answered_before_a_crash_wrote_its_row_is_indexed_at_the_next_start(tmp_path, rules):
    """A stop while a row is still owed never marks a clean shutdown (whoever calls close
    with clean=True): the next start reconciles and indexes the answered object. And a
    file stored without its row is still found as a duplicate."""
    store = Store(tmp_path / "d")
    store.open_for_service()
    ingest = Ingest(store, rules)
    ds, other = ct_series(2)
    _incoming, outcome = _received(ingest, ds)
    assert outcome.ok
    store.close(clean=True)  # the process ends here; its settle never ran
    assert not (store.data_dir / ".clean-shutdown").exists()

    again = Store(tmp_path / "d")
    assert again.open_for_service() == {"indexed": 1, "dropped": 0}
    assert again.locate(ds.SOPInstanceUID) == outcome.path

    # A file at its final path without a row (answered, row owed): a different object
    # with that UID is refused under the reject policy, the same one is "already stored".
    again.index.remove(ds.SOPInstanceUID)
    other.SOPInstanceUID = ds.SOPInstanceUID
    other.StudyInstanceUID, other.SeriesInstanceUID = ds.StudyInstanceUID, ds.SeriesInstanceUID
    other.PatientName = "SOMEONE^ELSE"
    ingest = Ingest(again, rules)
    refused = ingest.accept(encode(other), TransferSyntax.EXPLICIT_LE, sop_class_uid=other.SOPClassUID,
                            sop_instance_uid=None, source=NET)
    assert refused.status == Status.REFUSED_DUPLICATE and "not yet indexed" in refused.comment
    same = ingest.accept(encode(ds), TransferSyntax.EXPLICIT_LE, sop_class_uid=ds.SOPClassUID,
                         sop_instance_uid=None, source=NET)
    assert same.ok and same.already_stored
    again.close(clean=False)


@pytest.mark.parametrize("journal", [True, False])
def test_the_folder_fsync_is_left_out_only_on_journaled_ext4(tmp_path, journal):
    """A file's fsync commits its rename on ext4 with a journal (the box's data partition,
    where the power-cut test in QEMU checks it); ext4 without a journal, and any other file
    system, keeps the folder's fsync."""
    from appliance.store.disk import file_fsync_commits_rename

    assert not file_fsync_commits_rename(tmp_path) or Path("/proc/fs/jbd2").is_dir()
    if os.geteuid() != 0:
        pytest.skip("loop-mounting an ext4 image needs root")
    image, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(64 * 2**20)
    features = [] if journal else ["-O", "^has_journal"]
    subprocess.run(["mkfs.ext4", "-q", "-F", *features, str(image)], check=True)
    if subprocess.run(["mount", "-o", "loop", str(image), str(mnt)]).returncode != 0:
        pytest.skip("cannot loop-mount here")
    try:
        assert file_fsync_commits_rename(mnt) is journal
        store = Store(mnt / "d")
        assert store._placer.folder_fsync is not journal
        store.close(clean=False)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_the_forwarding_queue_says_which_destinations_have_an_object_due(tmp_path, rules):
    """Index.forward_due, what the forwarder asks every 0.2 s: a destination backing off,
    one whose objects all wait (stable_after, a retry later) or are set aside, and one
    whose queue is empty are not due; one with any object due is, once."""
    import time

    from appliance.config import ForwardRule

    store = Store(tmp_path / "d")
    store.open_for_service()
    store.set_forwarding((ForwardRule(to=("A", "B", "C")), ForwardRule(to=("LATER",), stable_after=3600)))
    ingest = Ingest(store, rules)
    put_series(ingest, 3)
    index, now = store.index, time.time()
    assert sorted(index.forward_due(now)) == ["A", "B", "C"]
    index.forward_failed("A", "cannot connect", "2026-11-30T00:00:00", lambda failures: 600.0)
    items = index.forward_batch("B", now, 10, 10**9)
    for item in items:
        index.forward_retry(item.id, now + 600, "0xA700 out of resources")
    c_items = index.forward_batch("C", now, 10, 10**9)
    index.forward_set_aside(c_items[0].id, "0x0122 SOP class not supported")
    assert index.forward_due(now) == ["C"]  # two of C's three are still due
    for item in c_items[1:]:
        index.forward_sent(item.id, "C", "2026-11-30T00:00:01")
    assert index.forward_due(now) == []
    assert sorted(index.forward_due(now + 7200)) == ["A", "B", "LATER"]
    store.close()


def test_self_stores_at_once_each_use_their_own_files(store: Store) -> None:
    """The supervisor's periodic self-check and a status request (the console, 'appliance
    status') may self-store at the same moment: neither may take the other's file for its own
    (with one file name per process, one in two such pairs reported "store not writable"),
    and nothing is left behind."""
    from appliance.store.disk import self_store

    problems: list[str] = []
    start = threading.Barrier(3)

    def check(name: str) -> None:
        start.wait()
        for _ in range(150):
            if problem := self_store(store.data_dir, name):
                problems.append(problem)

    threads = [threading.Thread(target=check, args=(name,)) for name in ("health-check", "health-check", "self-store")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert problems == []
    assert list(store.tmp.iterdir()) == [] and list((store.data_dir / "scratch").iterdir()) == []
