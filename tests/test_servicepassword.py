"""The service password kept on the data partition (appliance.ops.servicepassword), with the
real ``usermod`` working on a copy of /etc (``usermod -R``) and real shadow files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from appliance.ops.factoryreset import root_hash, run_command
from appliance.ops.servicepassword import RECORD, sync

pytestmark = pytest.mark.skipif(shutil.which("usermod") is None or os.geteuid() != 0,
                                reason="needs usermod and root (usermod -R)")


def hashed(password: str) -> str:
    return subprocess.run(["openssl", "passwd", "-6", password], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.fixture
def system(tmp_path: Path) -> Path:
    """A root file system's /etc with root, as a new system slot has it (no password)."""
    etc = tmp_path / "root" / "etc"
    etc.mkdir(parents=True)
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (etc / "group").write_text("root:x:0:\n")
    (etc / "shadow").write_text("root:*:20000:0:99999:7:::\n")
    (etc / "shadow").chmod(0o640)
    (tmp_path / "data").mkdir()
    return tmp_path


def runner(chroot: Path):  # type: ignore[no-untyped-def]
    def run(cmd: Sequence[str]) -> subprocess.CompletedProcess[str]:
        return run_command([cmd[0], "-R", str(chroot), *cmd[1:]])
    return run


def set_shadow(system: Path, value: str, mtime: float) -> Path:
    shadow = system / "root" / "etc" / "shadow"
    shadow.write_text(f"root:{value}:20000:0:99999:7:::\n")
    os.utime(shadow, (mtime, mtime))
    return shadow


def test_a_new_slot_gets_the_kept_password(system: Path) -> None:
    h = hashed("Service-1")
    record = system / "data" / RECORD
    record.write_text(h + "\n")
    shadow = system / "root" / "etc" / "shadow"
    said = sync(system / "data", shadow, runner(system / "root"))
    assert "restored" in said
    assert root_hash(shadow) == h
    assert sync(system / "data", shadow, runner(system / "root")) == "the service password is set"


def test_a_password_only_in_etc_shadow_is_kept_0600(system: Path) -> None:
    h = hashed("Service-2")
    shadow = set_shadow(system, h, 1_700_000_000)
    said = sync(system / "data", shadow, runner(system / "root"))
    assert "kept" in said
    record = system / "data" / RECORD
    assert record.read_text().strip() == h
    assert record.stat().st_mode & 0o777 == 0o600


def test_when_both_differ_the_newer_wins(system: Path) -> None:
    old, new = hashed("old"), hashed("new")
    record = system / "data" / RECORD
    record.write_text(old + "\n")
    os.utime(record, (1_700_000_000, 1_700_000_000))
    shadow = set_shadow(system, new, 1_800_000_000)  # passwd in the service shell, after the record
    sync(system / "data", shadow, runner(system / "root"))
    assert record.read_text().strip() == new
    # A slot built long ago with another hash: the record is newer and wins.
    shadow = set_shadow(system, old, 1_600_000_000)
    sync(system / "data", shadow, runner(system / "root"))
    assert root_hash(shadow) == new


def test_nothing_anywhere_is_said_and_nothing_written(system: Path) -> None:
    shadow = system / "root" / "etc" / "shadow"
    assert sync(system / "data", shadow, runner(system / "root")) == "no service password is set"
    assert not (system / "data" / RECORD).exists()


def test_the_command_restores_and_a_failing_usermod_is_said(system: Path) -> None:
    h = hashed("Service-3")
    (system / "data" / RECORD).write_text(h + "\n")
    shadow = system / "root" / "etc" / "shadow"
    # Without -R, usermod would change this machine's root: the command is run on a shadow
    # file that usermod cannot reach, so its refusal is what the command says.
    done = subprocess.run([sys.executable, "-m", "appliance", "--data-dir", str(system / "data"), "service-password",
                           "--shadow", str(shadow), "sync"], capture_output=True, text=True,
                          env={**os.environ, "PATH": str(system)})  # no usermod on PATH
    assert done.returncode == 1, done.stdout + done.stderr
    assert "cannot restore the service password: usermod" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert root_hash(shadow) == ""
