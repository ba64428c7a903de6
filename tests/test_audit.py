"""The audit trail: JSON lines that several processes append to at once, rotated, read back
in words; deletions, sends and forwards leave their events."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from appliance import audit
from appliance.conformance import TransferSyntax
from appliance.store.ingest import Source

from helpers import ROOT, ct_series, encode

WRITER = r"""
import sys
from pathlib import Path
from appliance import audit
for n in range(int(sys.argv[2])):
    audit.record(Path(sys.argv[1]), audit.Event("transfer", "R", detail=f"{sys.argv[3]} {n} " + "x" * 200))
"""


def test_processes_appending_at_once_never_interleave_and_rotation_keeps_every_event(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), "400", name], env=env)
             for name in ("a", "b", "c")]
    for p in procs:
        assert p.wait(60) == 0
    lines = (tmp_path / "audit" / "audit.jsonl").read_text().splitlines()
    assert len(lines) == 1200
    events = [json.loads(line) for line in lines]  # every line whole
    assert {e["event"] for e in events} == {"DICOM Instances Transferred"}
    assert sorted(int(e["detail"].split()[1]) for e in events if e["detail"].startswith("a ")) == list(range(400))

    for n in range(200):
        audit.record(tmp_path, audit.Event("deleted", "D", detail=f"r{n}"), max_bytes=10_000)
    files = sorted(p.name for p in (tmp_path / "audit").iterdir() if p.name.startswith("audit.jsonl"))
    assert "audit.jsonl.1" in files and len(files) <= audit.KEEP + 1
    last = audit.read(tmp_path, 5)
    assert [e["detail"] for e in last] == [f"r{n}" for n in range(195, 200)]


def test_a_deletion_is_audited_with_who_what_and_why(store, ingest):
    series = ct_series(3, rows=8, cols=8)
    for ds in series:
        ingest.accept(encode(ds), TransferSyntax.EXPLICIT_LE, sop_class_uid=ds.SOPClassUID, sop_instance_uid=None,
                      source=Source("CT"))
    store.delete_studies([series[0].StudyInstanceUID], quiet_seconds=0, reason="asked on the command line")
    [e] = audit.read(store.data_dir)
    assert e["event"] == "DICOM Study Deleted" and e["event_code"] == "110105" and e["action"] == "D"
    assert e["studies"] == [{"study_uid": series[0].StudyInstanceUID, "objects": 3}]
    assert e["participants"][0]["role"] == "person" and e["participants"][0]["user"]
    assert "asked on the command line" in e["detail"]
    r = subprocess.run([sys.executable, "-m", "appliance", "--data-dir", str(store.data_dir), "audit"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "DICOM Study Deleted D; person" in r.stdout and f"study {series[0].StudyInstanceUID} (3)" in r.stdout


def test_the_console_shows_the_trail_and_records_its_sessions(tmp_path):
    import io

    from appliance.ops.configservice import ConfigFile
    from appliance.ops.console import Console
    from appliance.ops.consolesettings import ConsoleSettings

    data = tmp_path / "data"
    audit.record(data, audit.Event("deleted", "D", participants=(audit.Participant("person", user="alice"),),
                                   studies=(("1.2.3", 7),), detail="asked on the command line"))
    cfg = tmp_path / "appliance.toml"
    cfg.write_text("[scp]\nport = 11112\n")
    out = io.StringIO()
    console = Console(io.StringIO("a\n\nq\n"), out, ConsoleSettings(ConfigFile(cfg), tmp_path / "config.sock"),
                      data_dir=data, networkd_dir=tmp_path / "networkd", journal=None, live_network=False)
    assert console.run() == 0
    text = out.getvalue()
    assert "Audit trail" in text and "DICOM Study Deleted D; person alice; study 1.2.3 (7)" in text
    assert "User Authentication E; person serial console" in text


def test_an_import_is_audited_with_its_source_and_new_objects(tmp_path):
    from helpers import write_series

    folder = tmp_path / "disc"
    series = ct_series(4, rows=8, cols=8)
    write_series(series, folder)
    data = tmp_path / "data"
    r = subprocess.run([sys.executable, "-m", "appliance", "--data-dir", str(data), "import", "--no-eject",
                        str(folder)], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    [e] = audit.read(data)
    assert e["event"] == "Import" and e["action"] == "C" and e["outcome"] == 0
    assert e["studies"] == [{"study_uid": series[0].StudyInstanceUID, "objects": 4}]
    assert str(folder) in e["participants"][0]["address"]


def test_a_setting_changed_in_the_file_while_not_running_is_audited(tmp_path):
    """`appliance config set` without a running appliance writes the file itself: the trail
    says so, naming the shell user; a secret's value is never written."""
    cfg = tmp_path / "appliance.toml"
    cfg.write_text("[scp]\nport = 11112\n")
    data = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    base = [sys.executable, "-m", "appliance", "--config", str(cfg), "--data-dir", str(data), "config",
            "--runtime-dir", str(tmp_path / "run")]
    r = subprocess.run([*base, "set", "scp.port", "11113"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    assert "applies at the next start" in r.stdout
    [e] = audit.read(data)
    assert e["event"] == "Application Activity" and e["action"] == "U" and e["participants"][0]["role"] == "person"
    assert "(appliance config)" in e["participants"][0]["user"]
    assert "scp.port = 11113" in e["detail"] and "while not running" in e["detail"]


def test_a_secret_set_in_the_configuration_is_recorded_without_its_value(tmp_path):
    who = audit.Participant("application", user="config service")
    audit.config_changed(tmp_path, "tls.key_password = hunter2", who)
    audit.config_changed(tmp_path, "scp.port = 11113", who)
    first, second = audit.read(tmp_path)
    assert "hunter2" not in first["detail"] and "tls.key_password = (not recorded)" in first["detail"]
    assert second["detail"] == "configuration changed: scp.port = 11113"
