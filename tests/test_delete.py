"""Deleting studies and series: index and files together, crash-safely, and never under a
study being received, exported or protected."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from appliance.conformance import TransferSyntax
from appliance.store.deletion import DeletionRefused
from appliance.store.ingest import Source
from appliance.store.store import Store

from helpers import ROOT, ct_series, encode

NET = Source("SCANNER")


def put(ingest, datasets):
    for ds in datasets:
        out = ingest.accept(encode(ds), TransferSyntax.EXPLICIT_LE, sop_class_uid=ds.SOPClassUID,
                            sop_instance_uid=None, source=NET)
        assert out.ok, out.comment


def agree(store: Store) -> None:
    """Index and files agree: every row has its file, every file its row."""
    rows = store.index.paths()
    files = {str(p.relative_to(store.data_dir)) for p in store.objects.rglob("*.dcm")}
    assert set(rows) == files


def test_delete_a_study_removes_files_rows_and_folders(store, ingest):
    a, b = ct_series(4), ct_series(3)
    put(ingest, a + b)
    report = store.delete_studies([a[0].StudyInstanceUID], quiet_seconds=0)
    assert report.studies == [a[0].StudyInstanceUID]
    assert report.instances == 4 and report.bytes_freed > 4 * 512
    assert "deleted 1 study" in report.summary() and "4 object(s)" in report.summary()
    assert store.counts()["studies"] == 1 and store.counts()["instances"] == 3
    assert not (store.objects / a[0].StudyInstanceUID).exists()
    assert not list((store.data_dir / "deleting").glob("*"))
    agree(store)


def test_delete_a_series_keeps_the_rest_of_its_study(store, ingest):
    a = ct_series(3)
    b = ct_series(2, study_uid=a[0].StudyInstanceUID)
    put(ingest, a + b)
    report = store.delete_series([b[0].SeriesInstanceUID], quiet_seconds=0)
    assert report.series == [b[0].SeriesInstanceUID] and report.instances == 2
    assert store.counts() == {"patients": 1, "studies": 1, "series": 1, "instances": 3}
    agree(store)


def test_a_study_still_arriving_is_kept(store, ingest):
    a = ct_series(2)
    put(ingest, a)
    with pytest.raises(DeletionRefused, match="may still be arriving"):
        store.delete_studies([a[0].StudyInstanceUID])
    assert store.counts()["instances"] == 2


def test_a_protected_study_is_kept_and_others_go(store, ingest):
    a, b = ct_series(2), ct_series(2)
    put(ingest, a + b)
    store.marks.protect([a[0].StudyInstanceUID])
    report = store.delete_studies([a[0].StudyInstanceUID, b[0].StudyInstanceUID], quiet_seconds=0)
    assert report.studies == [b[0].StudyInstanceUID]
    assert [k.study_uid for k in report.kept] == [a[0].StudyInstanceUID]
    assert "protected" in report.render()
    with pytest.raises(DeletionRefused, match="protected"):
        store.delete_studies([a[0].StudyInstanceUID], quiet_seconds=0)
    store.marks.protect([a[0].StudyInstanceUID], False)
    store.delete_studies([a[0].StudyInstanceUID], quiet_seconds=0)
    assert store.counts()["instances"] == 0


def test_a_study_being_exported_is_kept(store, ingest):
    a = ct_series(2)
    put(ingest, a)
    with store.busy([a[0].StudyInstanceUID]):
        with pytest.raises(DeletionRefused, match="export"):
            store.delete_studies([a[0].StudyInstanceUID], quiet_seconds=0)
    store.delete_studies([a[0].StudyInstanceUID], quiet_seconds=0)
    assert store.counts()["instances"] == 0


def test_unknown_uids_are_refused_in_words(store):
    with pytest.raises(DeletionRefused, match="not stored"):
        store.delete_studies(["1.2.3"], quiet_seconds=0)
    with pytest.raises(DeletionRefused, match="not stored"):
        store.delete_series(["1.2.3"], quiet_seconds=0)


def test_a_deletion_cut_short_is_finished_at_the_next_start(tmp_path, rules):
    from appliance.store import deletion
    from appliance.store.ingest import Ingest

    store = Store(tmp_path / "d")
    ingest = Ingest(store, rules)
    a, b = ct_series(6), ct_series(2)
    put(ingest, a + b)
    rows = store.study_instances(a[0].StudyInstanceUID)
    # As if killed after the journal was written and the first chunk's rows were dropped.
    items = []
    for r in rows:
        st = (store.data_dir / r.path).stat()
        items.append(deletion._Item(r.sop_instance_uid, r.path, st.st_ino, st.st_mtime_ns, st.st_size))
    deletion._write_journal(store.data_dir, "test", items)
    store.index.remove_instances([(i.uid, i.path) for i in items[:3]])
    # One object of the study is stored again meanwhile (a new file under the same name): kept.
    resent = a[5]
    (store.data_dir / rows[5].path).unlink()
    store.index.remove_instances([(rows[5].sop_instance_uid, rows[5].path)])
    put(ingest, [resent])
    store.close(clean=False)

    again = Store(tmp_path / "d")
    again.open_for_service()
    assert again.counts()["instances"] == 2 + 1
    assert again.instance(resent.SOPInstanceUID) is not None
    assert not list((again.data_dir / "deleting").glob("*.json"))
    agree(again)
    again.close()


def test_deleting_while_the_scp_stores_into_the_same_series(make_server):
    """A deletion runs while a sender stores more of the same series: what was there when it
    started goes, what arrives meanwhile stays stored and indexed, every C-STORE succeeds."""
    from pynetdicom import AE

    srv = make_server()
    series = ct_series(120, rows=8, cols=8)
    first, rest = series[:60], series[60:]
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(first[0].SOPClassUID, TransferSyntax.EXPLICIT_LE)
    assoc = ae.associate("127.0.0.1", srv.port, ae_title="ELEKTA_STORAGE")
    assert assoc.is_established
    for ds in first:
        assert assoc.send_c_store(ds).Status == 0
    statuses = []

    def keep_sending() -> None:
        for ds in rest:
            statuses.append(assoc.send_c_store(ds).Status)

    t = threading.Thread(target=keep_sending)
    t.start()
    report = srv.store.delete_studies([first[0].StudyInstanceUID], quiet_seconds=0)
    t.join(60)
    assoc.release()
    assert statuses == [0] * len(rest)
    assert report.instances >= 60
    left = {r.sop_instance_uid for r in srv.store.instances()}
    assert left <= {ds.SOPInstanceUID for ds in rest}
    assert len(left) == 120 - report.instances
    agree(srv.store)


KILLER = r"""
import sys
from pathlib import Path
from appliance.store.store import Store

store = Store(Path(sys.argv[1]))
store._writer.become()
# Five objects per index transaction: a long run of small steps to be killed in the middle of.
store.delete_studies(store.study_uids(), quiet_seconds=0, chunk=5)
"""


def _instances(data: Path) -> int:
    import sqlite3

    con = sqlite3.connect(f"file:{data / 'index.sqlite'}?mode=ro", uri=True, timeout=5)
    try:
        return int(con.execute("SELECT count(*) FROM instances").fetchone()[0])
    finally:
        con.close()


@pytest.mark.parametrize("left", [0.9, 0.5, 0.1])
def test_kill_9_in_the_middle_of_a_large_delete(tmp_path, rules, left):
    """kill -9 of a deletion once it has dropped some of the rows (a tenth, half, nine
    tenths): after a restart index and files agree, and the deletion was finished."""
    from appliance.store.ingest import Ingest

    data = tmp_path / "d"
    store = Store(data)
    ingest = Ingest(store, rules)
    put(ingest, ct_series(500, rows=4, cols=4) + ct_series(100, rows=4, cols=4))
    store.close()
    total = 600
    proc = subprocess.Popen([sys.executable, "-c", KILLER, str(data)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    while _instances(data) > total * left:
        try:
            proc.wait(timeout=0.002)
            break
        except subprocess.TimeoutExpired:
            continue
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    killed_with = _instances(data)
    assert 0 < killed_with < total, f"the kill came before or after the deletion ({killed_with} rows left)"
    again = Store(data)
    again.open_for_service()
    agree(again)
    assert again.counts()["instances"] == 0  # the deletion was finished
    assert not list(again.objects.rglob("*.dcm"))
    again.close()


# -- the command line ------------------------------------------------------------------


def cli(store: Store, *args: str) -> subprocess.CompletedProcess[str]:
    """The real program, as an admin runs it (no terminal: stdin is closed)."""
    return subprocess.run([sys.executable, "-m", "appliance", "--data-dir", str(store.data_dir), *args],
                          capture_output=True, text=True, cwd=ROOT, stdin=subprocess.DEVNULL, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_delete_protect_and_retention_on_the_command_line(store, ingest):
    a, b = ct_series(3), ct_series(2, patient="Other^Patient")
    for ds in b:
        ds.PatientID = "OTHER-7"
    put(ingest, a + b)
    study_a = a[0].StudyInstanceUID

    r = cli(store, "delete", "--study", study_a)
    assert r.returncode == 1 and "add --yes" in r.stderr and store.counts()["instances"] == 5

    r = cli(store, "protect", "--study", study_a)
    assert r.returncode == 0 and "protected from deletion" in r.stdout
    assert study_a in cli(store, "protect").stdout
    r = cli(store, "delete", "--study", study_a, "--yes", "--quiet-minutes", "0")
    assert r.returncode == 1 and "protected" in r.stderr and "Traceback" not in r.stderr
    cli(store, "protect", "--off", "--study", study_a)

    r = cli(store, "retention")
    assert r.returncode == 0 and "retention: off" in r.stdout
    assert "not yet exported or sent" in r.stdout or "may still be arriving" in r.stdout

    r = cli(store, "delete", "--patient", "OTHER-7", "--yes", "--quiet-minutes", "0")
    assert r.returncode == 0, r.stderr
    assert "deleted 1 study (patient OTHER-7 (1 study)): 2 object(s)" in r.stdout and "MB freed" in r.stdout
    r = cli(store, "delete", "--series", a[0].SeriesInstanceUID, "--yes", "--quiet-minutes", "0")
    assert r.returncode == 0 and "deleted 1 series" in r.stdout
    assert store.counts()["instances"] == 0
    agree(store)
    r = cli(store, "delete", "--study", "1.2.3", "--yes")
    assert r.returncode == 1 and "not stored" in r.stderr
