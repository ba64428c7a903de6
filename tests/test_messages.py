"""What the operator reads: at the default verbosity no command prints a library's voice (a
Python warning, pydicom's log lines, a traceback), whatever legacy values the objects carry: a
date '1995.05.01' from an ACR-NEMA era scanner (one of the shared samples has it), a time
'09:30:00', an Accession Number of 23 characters, a Patient Sex 'f'. Those lines go to the log
at DEBUG, once each.

Every command runs as the real ``appliance`` program in a subprocess, on objects written with
such values and imported through ``appliance import``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from appliance.store.store import Store
from helpers import dcmtk, free_port, run, sample, wait_for
from test_rtexport import dose_grid, f, make_case, write_rt_dose
from test_sender import PEER_AE, storescp  # noqa: F401 - storescp is a fixture

APPLIANCE = str(Path(sys.executable).with_name("appliance"))

#: What a library's voice looks like on a terminal: a warning's category (UserWarning,
#: DeprecationWarning), pydicom's logger or the warnings module's, a traceback.
NOISE = ("Warning", "pydicom", "py.warnings", "Traceback")

#: (tag, VR, bytes) written as they are, past pydicom's checks.
LEGACY_VALUES = [
    (0x00080020, "DA", b"1995.05.01"),                # Study Date, ACR-NEMA style
    (0x00080021, "DA", b"1995.05.01"),                # Series Date
    (0x00080030, "TM", b"09:30:00"),                  # Study Time with colons
    (0x00080050, "SH", b"ACC-12345678901234567 "),    # Accession Number, 22 > 16 characters
    (0x00100040, "CS", b"f "),                        # Patient Sex in lower case
]


def noise(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(word in line for word in NOISE)]


def appliance(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the ``appliance`` program as an operator would, on a terminal (not the journal)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("JOURNAL_STREAM", "SYSTEMD_LOG_LEVEL", "PYTHONWARNINGS")}
    return subprocess.run([APPLIANCE, *args], capture_output=True, text=True, timeout=timeout, env=env)


@dataclass(frozen=True)
class Legacy:
    folder: Path  # the files to import
    series_uid: str
    ss_uid: str
    dose: Path


@pytest.fixture
def legacy(tmp_path: Path) -> Legacy:
    """The RT case of test_rtexport (a CT series, its structure set, an RT Dose file) with
    :data:`LEGACY_VALUES` in every object, plus the shared sample dated '1995.05.01'."""
    scratch = Store(tmp_path / "scratch")
    case = make_case(scratch)
    scratch.close()
    folder = tmp_path / "legacy"
    folder.mkdir()
    for path in sorted((tmp_path / "scratch" / "objects").rglob("*.dcm")):
        ds = dcmread(path)
        for tag, vr, value in LEGACY_VALUES:
            ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)  # type: ignore[assignment]
        ds.save_as(folder / path.name, enforce_file_format=True)
    shutil.copy(sample("ts_jpeg_p14_mr_2").path, folder / "legacy-mr.dcm")  # StudyDate 1995.05.01
    origin, pts, _ = dose_grid()
    dose = tmp_path / "dose.dcm"
    write_rt_dose(dose, case.frame, f(pts), origin)
    return Legacy(folder, case.series_uid, case.ss_uid, dose)


def test_import_export_send_and_rt_export_of_legacy_values_print_no_library_noise(
        legacy: Legacy, storescp, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = str(tmp_path / "data")
    peer = storescp()
    stick, rt_stick = tmp_path / "stick", tmp_path / "rt-stick"
    stick.mkdir()
    rt_stick.mkdir()
    rt = ["rt-export", "--series", legacy.series_uid, "--structure-set", legacy.ss_uid, "--dose", str(legacy.dose)]
    commands = {
        "import": ["import", str(legacy.folder)],
        "export": ["export", "--to", str(stick), "--all"],
        "send": ["send", "-aec", PEER_AE, "127.0.0.1", str(peer.port), "--series", legacy.series_uid],
        "rt-export to a folder": [*rt, "--to", str(rt_stick)],
        "rt-export to a peer": [*rt, "-aec", PEER_AE, "127.0.0.1", str(peer.port)],
    }
    for what, args in commands.items():
        done = appliance("--data-dir", data, *args)
        assert done.returncode == 0, (what, done.stdout, done.stderr)
        assert noise(done.stderr) == [], (what, done.stderr)
        assert noise(done.stdout) == [], (what, done.stdout)
    assert legacy.series_uid in {str(ds.SeriesInstanceUID) for ds in peer.received().values()}


def test_with_debug_each_library_complaint_is_one_debug_line(legacy: Legacy, tmp_path: Path) -> None:
    """The complaints are not lost: with -d each is one DEBUG line of pydicom's, not repeated
    by the warnings module with a line of pydicom's source."""
    data = str(tmp_path / "data")
    assert appliance("--data-dir", data, "import", str(legacy.folder)).returncode == 0
    stick, rt_stick = tmp_path / "stick", tmp_path / "rt-stick"
    stick.mkdir()
    rt_stick.mkdir()
    stderr = ""
    for args in (["export", "--to", str(stick), "--all"],
                 ["rt-export", "--series", legacy.series_uid, "--structure-set", legacy.ss_uid,
                  "--dose", str(legacy.dose), "--to", str(rt_stick)]):
        done = appliance("--data-dir", data, "-d", *args)
        assert done.returncode == 0, done.stderr
        stderr += done.stderr
    library = [line for line in stderr.splitlines() if "pydicom:" in line or "py.warnings" in line]
    # the records and the RT objects copy the Accession Number (22 characters): pydicom complains
    assert any(" DEBUG pydicom: The value length (22) exceeds" in line for line in library), stderr
    assert all(" DEBUG pydicom: " in line for line in library), library
    assert "UserWarning" not in stderr and "warn_and_log" not in stderr


@pytest.mark.parametrize("verbosity, shown", [(0, False), (1, False), (2, True)])
def test_library_loggers_and_python_warnings_are_debug(verbosity: int, shown: bool) -> None:
    """pydicom's children (its pixel decoders log as pydicom.pixels.decoders.base) and any
    Python warning are DEBUG lines too, one line each."""
    code = (
        "import logging, warnings, sys\n"
        "from appliance import logs\n"
        f"logs.setup({verbosity})\n"
        "logging.getLogger('pydicom.pixels.decoders.base').warning('Bits Stored does not match')\n"
        "warnings.warn('a library talking to a programmer')\n"
        "logging.getLogger('appliance.test').warning('ours')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "SYSTEMD_LOG_LEVEL")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    lines = done.stderr.splitlines()
    assert [line.split(" ", 1)[1] for line in lines if "ours" in line] == ["WARNING appliance.test: ours"]
    library = [line.split(" ", 1)[1] for line in lines if "ours" not in line]
    if shown:
        assert library == ["DEBUG pydicom.pixels.decoders.base: Bits Stored does not match",
                           "DEBUG py.warnings: UserWarning: a library talking to a programmer (<string>:5)"]
    else:
        assert library == []


def test_the_supervisor_and_its_scp_print_no_library_noise(legacy: Legacy, tmp_path: Path) -> None:
    """``appliance run`` (and the SCP it starts) log through the same setup: a legacy series
    stored over the network leaves no library line in its output."""
    port = free_port()
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(f'[scp]\nport = {port}\nbind = "127.0.0.1"\n')
    out = tmp_path / "run.log"
    env = {k: v for k, v in os.environ.items()
           if k not in ("JOURNAL_STREAM", "SYSTEMD_LOG_LEVEL", "PYTHONWARNINGS", "NOTIFY_SOCKET")}
    with out.open("w") as log:
        proc = subprocess.Popen([APPLIANCE, "--config", str(cfg), "--data-dir", str(tmp_path / "data"), "run",
                                 "--runtime-dir", str(tmp_path / "run"), "--no-media"],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(lambda: run([dcmtk("echoscu"), "-aec", "ELEKTA_STORAGE", "127.0.0.1", str(port)]).returncode == 0,
                 60, "the supervisor's SCP to answer")
        images = [str(p) for p in sorted(legacy.folder.glob("*.dcm")) if p.name != "legacy-mr.dcm"]
        sent = run([dcmtk("storescu"), "-aec", "ELEKTA_STORAGE", "127.0.0.1", str(port), *images])
        assert sent.returncode == 0, sent.stdout + sent.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=40)
    assert proc.returncode == 0
    assert noise(out.read_text()) == [], out.read_text()


def test_what_is_done_at_the_console_reaches_the_system_log(tmp_path, monkeypatch, capsys):
    """A deletion at the console is logged at INFO; the serial screen shows only warnings, the
    system log (journald's /dev/log on the box) keeps the INFO line."""
    import logging
    import socket

    from appliance import logs
    from appliance.cli import console as console_cli

    path = str(tmp_path / "log.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    monkeypatch.setenv("APPLIANCE_SYSLOG_SOCKET", path)
    root = logging.getLogger()
    saved = (root.level, list(root.handlers), [h.level for h in root.handlers])
    app = logging.getLogger("appliance")
    try:
        logs.setup(0)
        console_cli._journal_what_is_done()
        logging.getLogger("appliance.store.deletion").info("deleted 1 study (study 1.2.3): 4 object(s)")
        got = sock.recv(4096).decode()
        assert "appliance-console: appliance.store.deletion: deleted 1 study (study 1.2.3)" in got
        assert "deleted 1 study" not in capsys.readouterr().err, "the serial screen shows warnings only"
    finally:
        for h in list(app.handlers):
            app.removeHandler(h)
            h.close()
        app.setLevel(logging.NOTSET)
        root.handlers[:] = saved[1]
        for h, level in zip(saved[1], saved[2]):
            h.setLevel(level)
        root.setLevel(saved[0])
        sock.close()


def test_a_peer_that_refuses_is_one_line_in_words_without_pynetdicom_noise(tmp_path):
    from helpers import ROOT

    r = subprocess.run([sys.executable, "-m", "appliance", "--data-dir", str(tmp_path / "d"), "echo", "--timeout", "5",
                        "127.0.0.1", str(free_port())], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 1
    assert "connection refused" in r.stderr.lower()
    assert "pynetdicom" not in r.stderr and "TCP Initialisation Error" not in r.stderr, r.stderr
