"""The console's storage pages over a real pty, as a technician drives them: deleting a
study (``yes``) takes its index rows and files, anything else cancels; a protected study is
refused with the reason; the [retention] fields refuse a bad value without touching the
file; retention runs from the console; and against a running ``appliance run`` a retention
setting changed on the console reaches the Storage SCP, which runs retention itself."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.config import StoreConfig, load
from appliance.media.importer import run_import
from appliance.store.ingest import Ingest
from appliance.store.store import Store
from helpers import ct_series, dcmtk, free_port, run, wait_for, write_series
from test_console import APPLIANCE, Terminal, w
from test_supervisor import Appliance, Notifications


class Box:
    """A data folder with two patients' studies and a config file; no appliance runs."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.config = tmp / "appliance.toml"
        # Studies imported a moment ago may be deleted at once (the default waits 10 minutes).
        self.config.write_text("[scp]\nport = 11112\n\n[retention]\nquiet_minutes = 0\n")
        self.data = tmp / "data"
        a = ct_series(3, patient="Doe^Jane")
        a2 = ct_series(2, study_uid=str(a[0].StudyInstanceUID), patient="Doe^Jane")
        b = ct_series(4, patient="Roe^Rick")
        for ds in b:
            ds.PatientID = "PAT-2"
        self.study_a, self.series_a2 = str(a[0].StudyInstanceUID), str(a2[0].SeriesInstanceUID)
        self.study_b = str(b[0].StudyInstanceUID)
        write_series(a + a2, tmp / "a")
        write_series(b, tmp / "b")
        store = Store(self.data)
        try:
            for folder in ("a", "b"):  # b last: the latest study, first in the pickers
                run_import(tmp / folder, Ingest(store, StoreConfig(min_free_mb=0)))
        finally:
            store.close(clean=False)

    def console(self) -> Terminal:
        t = Terminal([*APPLIANCE, "--config", str(self.config), "--data-dir", str(self.data), "console",
                      "--runtime-dir", str(self.tmp / "run"), "--no-journal"])
        t.expect("Choice: ")
        t.type("d")
        return t

    def stored(self) -> dict[str, int]:
        """Objects per stored study, after checking that index and files agree."""
        store = Store(self.data)
        try:
            rows = set(store.index.paths())
            files = {str(p.relative_to(self.data)) for p in store.objects.rglob("*.dcm")}
            assert rows == files
            return {u.study_uid: u.instances for u in store.study_usage()}
        finally:
            store.close(clean=False)


@pytest.fixture
def box(tmp_path: Path) -> Box:
    return Box(tmp_path)


#: The prompt of a field's new value.
NEW = r"New [^\r\n]*\(Enter keeps [^)\r\n]*\): "


def quit_console(t: Terminal, depth: int) -> None:
    """Back ``depth`` pages to the main menu, quit, and check that every line fit 80 columns."""
    for _ in range(depth):
        t.expect("Choice: ")
        t.type("0")
    t.expect("Choice: ")
    t.type("q")
    assert t.proc.wait(20) == 0
    # A UID typed after a prompt is the technician's line, not the console's.
    assert [line for line in t.text.split("\r\n") if len(line) > 80 and not re.search(r": [\d.]{20,}$", line)] == []


def test_delete_a_study_needs_yes_and_takes_rows_and_files(box: Box) -> None:
    assert box.stored() == {box.study_a: 5, box.study_b: 4}
    t = box.console()
    try:
        # Anything but "yes" cancels; the confirmation shows patient, date, objects and MB.
        t.answer((("Choice: ", "1"), ("Number, or a study UID, or p for a Patient ID: ", box.study_a)))
        seen = t.expect("Type yes to delete: ")
        assert "patient VOL-1 Doe Jane, study date 20261128: 5 object(s)," in seen.replace("\r\n", " ")
        assert " MB" in seen
        t.type("y")
        t.expect(w("Nothing deleted: deleting needs the answer 'yes'."))
        assert box.stored() == {box.study_a: 5, box.study_b: 4}

        # Picked by its number in the list of the latest studies (a came first: it is second).
        t.answer((("Choice: ", "1"),))
        t.expect(r"2  20261128 VOL-1 .* " + re.escape(box.study_a[:20]))
        t.answer((("Number, or a study UID, or p for a Patient ID: ", "2"), ("Type yes to delete: ", "yes")))
        t.expect(w(f"Deleted 1 study (study {box.study_a}): 5 object(s),") + r"\s+[\d.]+\s+MB\s+freed")
        t.answer((("Press Enter to go back. ", ""),))
        t.expect(w("1 study stored."))
        quit_console(t, 1)
    finally:
        t.close()
    assert box.stored() == {box.study_b: 4}
    assert not (box.data / "objects" / box.study_a).exists()
    assert not list((box.data / "deleting").glob("*"))


def test_protected_study_is_refused_with_the_reason(box: Box) -> None:
    t = box.console()
    try:
        t.expect("No study is protected.")
        t.answer((("Choice: ", "3"), ("Number, or a study UID, or p for a Patient ID: ", box.study_b),
                  ("p protects, u lifts the protection, Enter leaves it as it is: ", "p")))
        t.expect(w(f"study {box.study_b}: protected from deletion and retention"))
        t.expect(r"Protected \(1\):\r\n  20261128 PAT-2 +" + re.escape(box.study_b[:20]))

        t.answer((("Choice: ", "1"), ("Number, or a study UID, or p for a Patient ID: ", box.study_b)))
        t.expect(w("4 object(s),") + r"\s+[\d.]+\s+MB,\s+protected")
        t.answer((("Type yes to delete: ", "yes"),))
        t.expect(w("Nothing was deleted: it is protected; remove the protection first"))
        t.answer((("Press Enter to go back. ", ""),))

        # A series of it: refused for the same reason.
        t.answer((("Choice: ", "2"), ("Number, or a study UID: ", box.study_b), (r"Series \(number or UID\): ", "1"),
                  ("Type yes to delete: ", "yes")))
        t.expect(w("Nothing was deleted: it is protected; remove the protection first"))
        t.answer((("Press Enter to go back. ", ""),))

        # No such patient; a series of an unprotected study goes.
        t.answer((("Choice: ", "1"), ("Number, or a study UID, or p for a Patient ID: ", "p"),
                  ("Patient ID: ", "NOBODY")))
        t.expect(w("No stored study belongs to a patient with Patient ID 'NOBODY'."))
        t.answer((("Choice: ", "2"), ("Number, or a study UID: ", box.study_a), (r"Series \(number or UID\): ",
                                                                                  box.series_a2)))
        t.expect(w(f"Delete series {box.series_a2}:"))
        t.answer((("Type yes to delete: ", "yes"),))
        t.expect(w(f"Deleted 1 series (series {box.series_a2}): 2 object(s)"))
        t.answer((("Press Enter to go back. ", ""),))

        # Lifted: now it goes.
        t.answer((("Choice: ", "3"), ("Number, or a study UID, or p for a Patient ID: ", "p"), ("Patient ID: ", "PAT-2"),
                  ("p protects, u lifts the protection, Enter leaves it as it is: ", "u")))
        t.expect(w("patient PAT-2 (1 study): no longer protected"))
        t.expect("No study is protected.")
        quit_console(t, 1)
    finally:
        t.close()
    assert box.stored() == {box.study_a: 3, box.study_b: 4}
    store = Store(box.data)
    assert not store.marks.get()[box.study_b].protected
    store.close(clean=False)


def test_retention_fields_refuse_a_bad_value_and_run_from_the_console(box: Box) -> None:
    store = Store(box.data)
    store.marks.protect([box.study_b])
    store.close(clean=False)
    t = box.console()
    try:
        t.answer((("Choice: ", "4"),))
        t.expect(w("retention would start at"))
        before = box.config.read_bytes()
        for field, value, message in (
                ("2", "150%", ("Not saved: retention.high_water '150%' is not a mark; use a percentage of the data "
                               "partition from 1% to 99%")),
                ("3", "90%", "Not saved: retention.low_water 90% is not below retention.high_water 85%"),
                ("3", "30GB", ("Not saved: retention.high_water 85% and retention.low_water 30GB must both be "
                               "percentages or both be GB")),
                ("4", "99999", ("Not saved: retention.max_age_days 99999 is out of range; use 0 (no age limit) "
                                "to 36500")),
                ("5", "always", "Not saved: 'always' is not allowed; choose one of: delivered, unconditional"),
                ("6", "soon", "Not saved: 'soon' is not a number; Quiet minutes takes e.g. 10 or 2.5"),
                ("6", "2000", "Not saved: retention.quiet_minutes 2000.0 is out of range; use 0 to 1440")):
            t.answer((("Choice: ", field), (NEW, value)))
            t.expect(w(message))
            assert box.config.read_bytes() == before
        t.answer((("Choice: ", "r"),))
        t.expect(w("Retention is off; turn it on first (field 1)."))  # no run

        # Valid: both marks at once (from % to GB: 1 MB used is always exceeded), then the rest.
        t.answer((("Choice: ", "m"), (r"New High-water mark \(Enter keeps 85%\): ", "0.001GB"),
                  (r"New Low-water mark \(Enter keeps 75%\): ", "0.0005GB")))
        t.expect(w("it applies when the appliance starts (it is not running)"))
        for field, value in (("5", "unconditional"), ("1", "y")):
            t.answer((("Choice: ", field), (NEW, value)))
            t.expect(w("Saved: written to"))
        r = load(box.config).retention
        assert (r.enabled, r.high_water, r.low_water, r.policy, r.quiet_minutes) == (
            True, "0.001GB", "0.0005GB", "unconditional", 0)

        t.expect(r"r  Run retention now")
        t.answer((("Choice: ", "l"),))
        t.expect(w("Studies, oldest first:"))
        t.expect(w("may be deleted"))
        t.expect(w("kept: it is protected; remove the protection first"))
        t.answer((("Press Enter to go back. ", ""), ("Choice: ", "r")))
        t.expect(w(f"Deleted study {box.study_a}") + r"\s+" + w("patient VOL-1, last object"))
        t.expect(w("Retention: deleted 1 study ("))
        t.expect(w("PROBLEM: the data partition is") + r"[\s\S]*?" + w("no more studies may be deleted (1 protected)"))
        t.answer((("Press Enter to go back. ", ""),))
        t.expect(w("Last run") + r"[\s\S]*?" + w("(asked on the serial console): deleted 1 study"))
        quit_console(t, 2)
    finally:
        t.close()
    assert box.stored() == {box.study_b: 4}


# -- against a running appliance ------------------------------------------------------------------


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Appliance]:
    app = Appliance(tmp_path, free_port(), Notifications(tmp_path / "notify.sock"))
    yield app
    app.stop()


def test_retention_set_on_the_console_reaches_the_running_scp(running: Appliance, tmp_path: Path) -> None:
    wait_for(lambda: running.notify.seen("READY", "1"), 60, "READY=1")
    port = load(running.config).scp.port
    series = ct_series(3)
    paths = write_series(series, tmp_path / "series")
    r = run([dcmtk("storescu"), "-aec", "ELEKTA_STORAGE", "127.0.0.1", str(port), *map(str, paths)])
    assert r.returncode == 0, r.stderr
    study = str(series[0].StudyInstanceUID)

    t = Terminal([*APPLIANCE, "--config", str(running.config), "--data-dir", str(running.data), "console",
                  "--runtime-dir", str(running.runtime), "--no-journal"])
    try:
        t.expect("Changes apply at once.")
        t.answer((("Choice: ", "d"), ("Choice: ", "4")))
        before = running.config.read_bytes()
        t.answer((("Choice: ", "2"), (NEW, "100%")))
        t.expect(w("Not saved: retention.high_water '100%' is not a mark"))
        assert running.config.read_bytes() == before
        for keys, applied in ((("m", "0.001GB", "0.0005GB"), "retention.high_water, retention.low_water applied"),
                              (("5", "unconditional"), "retention.policy = unconditional applied"),
                              (("6", "0"), "retention.quiet_minutes = 0 applied"),
                              (("1", "y"), "retention.enabled = true applied")):
            t.answer((("Choice: ", keys[0]), *((NEW, key) for key in keys[1:])))
            t.expect(w(applied))
        # The Storage SCP started again on the new settings and ran retention itself.
        status = running.data / "retention.json"
        wait_for(lambda: status.exists() and json.loads(status.read_text())["deleted"], 60,
                 "the SCP's retention to delete the study")
        report = json.loads(status.read_text())
        assert report["trigger"] == "periodic" and [d[0] for d in report["deleted"]] == [study]
        t.answer((("Choice: ", "0"), ("Choice: ", "4")))
        t.expect(w("(periodic): deleted 1 study"))
        quit_console(t, 2)
    finally:
        t.close()
    assert load(running.config).retention.enabled
    store = Store(running.data)
    assert store.study_usage() == [] and not (running.data / "objects" / study).exists()
    store.close(clean=False)
