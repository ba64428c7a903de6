"""Retention on a real small file system (a tmpfs; needs root, as CI is): down to the
low-water mark, oldest first, only studies safe to delete, and never a C-STORE refused for
space while an eligible study was there to delete."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta, timezone

import pytest

from appliance import config
from appliance.config import RetentionConfig, RetentionPolicy, ScpConfig, StoreConfig
from appliance.conformance import TransferSyntax
from appliance.store.ingest import Ingest, Source
from appliance.store.retention import Retention, disk, last_report, marks
from appliance.store.store import Store

from helpers import ct_series, dcmtk, encode, run, tmpfs, write_series

NET = Source("SCANNER")
MB = 10**6


@pytest.fixture
def small_fs(tmp_path):
    """A 24 MB tmpfs: a real file system whose fullness the test controls."""
    with tmpfs(tmp_path / "small", "size=24m") as mnt:
        yield mnt


def study(ingest, slices=8, size=256):
    """Store one study of ``slices`` CT slices of size x size x 16 bit; return its UID."""
    series = ct_series(slices, rows=size, cols=size)
    for ds in series:
        out = ingest.accept(encode(ds), TransferSyntax.EXPLICIT_LE, sop_class_uid=ds.SOPClassUID,
                            sop_instance_uid=None, source=NET)
        assert out.ok, out.comment
    return series[0].StudyInstanceUID


def age(store: Store, study_uid: str, days: float) -> None:
    """Make a study look received ``days`` ago (the index records when it last received an object)."""
    when = (datetime.now(timezone.utc) - timedelta(days=days)).isoformat(timespec="milliseconds")
    con = sqlite3.connect(store.data_dir / "index.sqlite")
    with con:
        con.execute("UPDATE studies SET last_received = ? WHERE study_uid = ?", (when, study_uid))
    con.close()


def test_marks_are_parsed_and_kept_below_the_refusal_watermark():
    from appliance.store.retention import Disk

    total = 2 * 10**9
    m = marks(RetentionConfig(high_water="85%", low_water="75%"), Disk(total, 0), 100 * 2**20)
    assert (m.high, m.low, m.note) == (int(total * 0.85), int(total * 0.75), "")
    # The image's 2 GB partition with 500 MiB kept free: 85 % would be past the refusals.
    m = marks(RetentionConfig(high_water="85%", low_water="75%"), Disk(total, 0), 500 * 2**20)
    assert m.high == total - 500 * 2**20 - total // 20 and m.low < m.high and "above the point" in m.note
    m = marks(RetentionConfig(high_water="1GB", low_water="0.5GB"), Disk(total, 0), 0)
    assert (m.high, m.low) == (10**9, 5 * 10**8)
    with pytest.raises(config.ConfigError, match="not below"):
        config.from_dict({"retention": {"high_water": "70%", "low_water": "80%"}})
    with pytest.raises(config.ConfigError, match="both be percentages or both be GB"):
        config.from_dict({"retention": {"high_water": "70%", "low_water": "1GB"}})


def test_retention_reaches_the_low_water_mark_oldest_first_and_keeps_what_it_must(small_fs):
    store = Store(small_fs / "d")
    ingest = Ingest(store, StoreConfig(min_free_mb=0))
    # Six studies of ~1 MB each, the first received longest ago.
    uids = [study(ingest) for _ in range(6)]
    for i, uid in enumerate(uids):
        age(store, uid, 30 - i)
    protected, undelivered = uids[0], uids[1]
    store.marks.protect([protected])
    now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    store.marks.delivered([u for u in uids if u != undelivered], "USB stick TEST", now)
    d = disk(store.objects)
    cfg = RetentionConfig(enabled=True, high_water=f"{(d.used - 1.5 * MB) / 1e9:.6f}GB",
                          low_water=f"{(d.used - 2.6 * MB) / 1e9:.6f}GB", quiet_minutes=0)
    report = Retention(store, cfg, 0).run()
    gone = [r[0] for r in report.deleted]
    assert gone == uids[2:5], "the oldest eligible studies, in order, until the low-water mark"
    assert report.used_after <= report.low < report.high
    assert report.kept == {"protected": 1, "not yet exported or sent": 1}
    assert report.problem == ""
    assert {u.study_uid for u in store.study_usage()} == {protected, undelivered, uids[5]}
    assert last_report(store.data_dir).deleted[0][0] == uids[2]
    # Nothing more needs to go now.
    assert Retention(store, cfg, 0).run().deleted == []
    store.close()


def test_above_the_mark_with_nothing_eligible_the_box_says_so(small_fs):
    store = Store(small_fs / "d")
    ingest = Ingest(store, StoreConfig(min_free_mb=0))
    uids = [study(ingest) for _ in range(3)]
    store.marks.protect(uids[:1])
    # A mark of a few bytes: the disk is always above it.
    cfg = RetentionConfig(enabled=True, high_water="0.000001GB", low_water="0.0000005GB", quiet_minutes=0)
    report = Retention(store, cfg, 0).run()
    assert report.deleted == []
    assert "no more studies may be deleted (2 not yet exported or sent, 1 protected)" in report.problem
    assert "export or send studies" in report.problem
    assert last_report(store.data_dir).problem == report.problem
    # appliance status, the console's Status page and the supervisor's STATUS= say it.
    from appliance.ops import health

    h = health.offline(store)
    assert f"retention: PROBLEM: {report.problem}" in h.render()
    assert "RETENTION: the data partition is" in h.status_line()
    # Unconditional: the two unprotected go, the protected one stays.
    report = Retention(store, RetentionConfig(enabled=True, high_water=cfg.high_water, low_water=cfg.low_water,
                                              quiet_minutes=0, policy=RetentionPolicy.UNCONDITIONAL), 0).run()
    assert sorted(r[0] for r in report.deleted) == sorted(uids[1:])
    assert [u.study_uid for u in store.study_usage()] == uids[:1]
    store.close()


def test_a_study_received_again_after_its_export_is_not_delivered(store, ingest):
    uid = study(ingest, slices=2, size=16)
    before = datetime.now(timezone.utc) - timedelta(seconds=5)
    store.marks.delivered([uid], "USB", before.isoformat(timespec="milliseconds"))
    cfg = RetentionConfig(enabled=True, quiet_minutes=0)
    [(usage, why)] = Retention(store, cfg, 0).eligibility(store.study_usage())
    assert why == "not yet exported or sent"
    store.marks.delivered([uid], "USB", datetime.now(timezone.utc).isoformat(timespec="milliseconds"))
    [(usage, why)] = Retention(store, cfg, 0).eligibility(store.study_usage())
    assert why is None


def test_record_delivery_needs_every_object_of_the_study(store, ingest):
    series = ct_series(3, rows=8, cols=8)
    for ds in series:
        ingest.accept(encode(ds), TransferSyntax.EXPLICIT_LE, sop_class_uid=ds.SOPClassUID, sop_instance_uid=None,
                      source=NET)
    at = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    assert store.record_delivery({ds.SOPInstanceUID for ds in series[:2]}, "PACS", at) == []
    assert store.record_delivery({ds.SOPInstanceUID for ds in series}, "PACS", at) == [series[0].StudyInstanceUID]
    assert store.marks.get()[series[0].StudyInstanceUID].delivered_to == "PACS"


def test_max_age_deletes_old_delivered_studies_whatever_the_disk(store, ingest):
    old, new = study(ingest, 2, 16), study(ingest, 2, 16)
    age(store, old, 40)
    age(store, new, 2)
    store.marks.delivered([old, new], "USB", datetime.now(timezone.utc).isoformat(timespec="milliseconds"))
    report = Retention(store, RetentionConfig(enabled=True, high_water="99%", low_water="98%", max_age_days=30,
                                              quiet_minutes=0), 0).run()
    assert [(r[0], r[4]) for r in report.deleted] == [(old, "older than 30 days")]


def test_the_scp_makes_room_instead_of_refusing(small_fs, tmp_path):
    """Store more than the disk holds with DCMTK storescu, a study per association: with
    retention on, every C-STORE succeeds (never Out of Resources, 0xA700) while there are
    studies it may delete, and index and files agree at the end."""
    from appliance.net.scp import StorageServer

    store = Store(small_fs / "d")
    store.open_for_service()
    rules = StoreConfig(min_free_mb=4)
    cfg = RetentionConfig(enabled=True, high_water="90%", low_water="60%", quiet_minutes=0,
                          policy=RetentionPolicy.UNCONDITIONAL)
    retention = Retention(store, cfg, rules.min_free_mb * 2**20)
    server = StorageServer(ScpConfig(bind="127.0.0.1", port=0), Ingest(store, rules, make_room=retention.make_room))
    port = server.start().port
    responses = []
    try:
        # ~60 MB through a 24 MB file system, ~1 MB a study.
        for n in range(60):
            files = write_series(ct_series(8, rows=256, cols=256), tmp_path / "send" / str(n))
            r = run([dcmtk("storescu"), "-v", "-aec", "ELEKTA_STORAGE", "127.0.0.1", str(port), *map(str, files)])
            responses += [line for line in r.stdout.splitlines() + r.stderr.splitlines()
                          if "Received Store Response" in line]
            assert r.returncode == 0, r.stdout + r.stderr
    finally:
        server.stop(grace=2)
    assert len(responses) == 60 * 8
    assert all("Success" in line for line in responses), [x for x in responses if "Success" not in x][:3]
    assert last_report(store.data_dir).deleted
    rows = store.index.paths()
    files_now = {str(p.relative_to(store.data_dir)) for p in store.objects.rglob("*.dcm")}
    assert set(rows) == files_now
    store.close()
