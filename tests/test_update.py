"""Updates (issue 21): version order, the GPT, signed releases, installing into the inactive
slot of a real GPT disk image, boot counting names, blessing and the boot check.

Everything is real: disk images with a GPT (checked by util-linux's partx), ext4 root images
made by mkfs.ext4 -d and compressed by zstd, Ed25519 keys and signatures made by openssl, an
ESP folder, an efivarfs-format variable file, a Storage SCP on loopback and an HTTP server.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
from helpers import free_port

from appliance.update import ROOT_TYPE, UpdateError, gpt
from appliance.update.boot import BOOT_COUNT_VAR, bless, boot_check, version_info
from appliance.update.install import install
from appliance.update.release import read_release, stick_release_dir
from appliance.update.request import (
    Progress,
    clear_offer,
    read_offer,
    read_progress,
    read_request,
    write_offer,
    write_request,
)
from appliance.update.slots import find_slots
from appliance.update.versions import compare

MiB = 1 << 20
ESP_TYPE = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
DATA_TYPE = "0fc63daf-8483-4772-8e79-3d69d8477de4"
SLOT = 6 * MiB

# -- version order: systemd's own vectors (src/test/test-string-util.c) ---------------------

#: test_strverscmp_improved: each is older than every one after it.
ORDERED = ["~1", "", "ab", "abb", "abc", "0001", "002", "12", "122", "122.9", "123~rc1", "123", "123-a",
           "123-a.1", "123-a1", "123-a1.1", "123-3", "123-3.1", "123^patch1", "123^1", "123.a-1", "123.1-1",
           "123a-1", "124"]
#: test_strverscmp_improved_newer(older, newer).
NEWER = [
    ("123.45-67.88", "123.45-67.89"), ("123.45-67.89", "123.45-67.89a"), ("123.45-67.ab", "123.45-67.89"),
    ("123.45-67.9", "123.45-67.89"), ("123.45-67", "123.45-67.89"), ("123.45-66.89", "123.45-67.89"),
    ("123.45-9.99", "123.45-67.89"), ("123.42-99.99", "123.45-67.89"), ("123-99.99", "123.45-67.89"),
    ("123~rc1-99.99", "123.45-67.89"), ("123~rc1-99.99", "123-45.67.89"), ("123~rc1-99.99", "123~rc2-67.89"),
    ("123~rc1-99.99", "123^aa2-67.89"), ("123~rc1-99.99", "123aa2-67.89"), ("123-99.99", "123.45-67.89"),
    ("123-99.99", "123^aa2-67.89"), ("123-99.99", "123aa2-67.89"), ("123^45-67.89", "123.45-67.89"),
    ("123^aa1-99.99", "123^aa2-67.89"), ("123^aa2-67.89", "123aa2-67.89"), ("123.aa2-67.89", "123aa2-67.89"),
    ("123.aa2-67.89", "123.ab2-67.89"),
]
#: The corner cases and the rpm vectors (RPMVERCMP(a, b, expected)).
CASES = [
    ("123_aa2-67.89", "123aa+2-67.89", 0), ("123.", "123", 1), ("12_3", "123", -1), ("12_3", "12", 1),
    ("12_3", "12.3", 1), ("123.0", "123", 1), ("123_0", "123", 1), ("123..0", "123.0", -1),
    ("0_", "0", 0), ("_0_", "0", 0), ("_0", "0", 0), ("0", "0___", 0), ("", "_", 0), ("_", "", 0), ("_", "_", 0),
    ("", "~", 1), ("~", "", -1), ("~", "~", 0),
    ("1.0", "1.0", 0), ("1.0", "2.0", -1), ("2.0", "1.0", 1), ("2.0.1", "2.0.1", 0), ("2.0", "2.0.1", -1),
    ("2.0.1", "2.0", 1), ("2.0.1a", "2.0.1a", 0), ("2.0.1a", "2.0.1", 1), ("2.0.1", "2.0.1a", -1),
    ("5.5p1", "5.5p1", 0), ("5.5p1", "5.5p2", -1), ("5.5p2", "5.5p1", 1), ("5.5p10", "5.5p10", 0),
    ("5.5p1", "5.5p10", -1), ("5.5p10", "5.5p1", 1), ("10xyz", "10.1xyz", 1), ("10.1xyz", "10xyz", -1),
    ("xyz10", "xyz10", 0), ("xyz10", "xyz10.1", -1), ("xyz10.1", "xyz10", 1), ("xyz.4", "xyz.4", 0),
    ("xyz.4", "8", -1), ("8", "xyz.4", 1), ("xyz.4", "2", -1), ("2", "xyz.4", 1), ("5.5p2", "5.6p1", -1),
    ("5.6p1", "5.5p2", 1), ("5.6p1", "6.5p1", -1), ("6.5p1", "5.6p1", 1), ("6.0.rc1", "6.0", 1),
    ("6.0", "6.0.rc1", -1), ("10b2", "10a1", 1), ("10a2", "10b2", -1), ("1.0aa", "1.0aa", 0),
    ("1.0a", "1.0aa", -1), ("1.0aa", "1.0a", 1), ("10.0001", "10.0001", 0), ("10.0001", "10.1", 0),
    ("10.1", "10.0001", 0), ("10.0001", "10.0039", -1), ("10.0039", "10.0001", 1), ("4.999.9", "5.0", -1),
    ("5.0", "4.999.9", 1), ("20101121", "20101121", 0), ("20101121", "20101122", -1), ("20101122", "20101121", 1),
    ("2_0", "2_0", 0), ("2.0", "2_0", -1), ("2_0", "2.0", 1), ("a", "a", 0), ("a+", "a+", 0), ("a+", "a_", 0),
    ("a_", "a+", 0), ("+a", "+a", 0), ("+a", "_a", 0), ("_a", "+a", 0), ("+_", "+_", 0), ("_+", "+_", 0),
    ("_+", "_+", 0), ("+", "_", 0), ("_", "+", 0), ("1.0~rc1", "1.0~rc1", 0), ("1.0~rc1", "1.0", -1),
    ("1.0", "1.0~rc1", 1), ("1.0~rc1", "1.0~rc2", -1), ("1.0~rc2", "1.0~rc1", 1),
    ("1.0~rc1~git123", "1.0~rc1~git123", 0), ("1.0~rc1~git123", "1.0~rc1", -1), ("1.0~rc1", "1.0~rc1~git123", 1),
    ("1.0^", "1.0^", 0), ("1.0^", "1.0", 1), ("1.0", "1.0^", -1), ("1.0^git1", "1.0^git1", 0),
    ("1.0^git1", "1.0", 1), ("1.0", "1.0^git1", -1), ("1.0^git1", "1.0^git2", -1), ("1.0^git2", "1.0^git1", 1),
    ("1.0^git1", "1.01", -1), ("1.01", "1.0^git1", 1), ("1.0^20160101", "1.0^20160101", 0),
    ("1.0^20160101", "1.0.1", -1), ("1.0.1", "1.0^20160101", 1), ("1.0^20160101^git1", "1.0^20160101^git1", 0),
    ("1.0^20160102", "1.0^20160101^git1", 1), ("1.0^20160101^git1", "1.0^20160102", -1),
    ("1.0~rc1^git1", "1.0~rc1^git1", 0), ("1.0~rc1^git1", "1.0~rc1", 1), ("1.0~rc1", "1.0~rc1^git1", -1),
    ("1.0^git1~pre", "1.0^git1~pre", 0), ("1.0^git1", "1.0^git1~pre", 1), ("1.0^git1~pre", "1.0^git1", -1),
    ("1b.fc17", "1b.fc17", 0), ("1b.fc17", "1.fc17", 1), ("1.fc17", "1b.fc17", -1), ("1g.fc17", "1g.fc17", 0),
    ("1g.fc17", "1.fc17", 1), ("1.fc17", "1g.fc17", -1), ("1.1.α", "1.1.α", 0), ("1.1.α", "1.1.β", 0),
    ("1.1.β", "1.1.α", 0), ("1.1.αα", "1.1.α", 0), ("1.1.α", "1.1.ββ", 0), ("1.1.ββ", "1.1.αα", 0),
    ("1٠١٢٣٤٥٦٧٨٩", "1", 0), ("1๐๑๒๓๔๕๖๗๘๙", "1", 0),
]


def test_version_order_is_systemds_strverscmp_improved() -> None:
    pairs = [(a, b) for i, a in enumerate(ORDERED) for b in ORDERED[i + 1:]] + NEWER
    for older, newer in pairs:
        assert compare(older, newer) == -1, (older, newer)
        assert compare(newer, older) == 1, (newer, older)
        assert compare(older, older) == 0 and compare(newer, newer) == 0
    for a, b, expected in CASES:
        assert compare(a, b) == expected, (a, b, expected)
    assert compare("0.1.0.10", "0.1.0.9") == 1 and compare("0.1.0~rc1", "0.1.0") == -1


# -- building blocks: keys, releases, disks, ESPs ------------------------------------------


def _run(*cmd: str | Path, cwd: Path | None = None) -> None:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, timeout=60, check=False)
    assert done.returncode == 0, f"{cmd}: {done.stderr}"


def make_key(folder: Path, name: str, keys_dir: Path | None = None) -> Path:
    """An Ed25519 private key; its public half goes into ``keys_dir`` when given."""
    folder.mkdir(parents=True, exist_ok=True)
    key = folder / f"{name}.key"
    _run("openssl", "genpkey", "-algorithm", "ed25519", "-out", key)
    if keys_dir is not None:
        keys_dir.mkdir(parents=True, exist_ok=True)
        _run("openssl", "pkey", "-in", key, "-pubout", "-out", keys_dir / f"{name}.pem")
    return key


def sign(folder: Path, key: Path) -> None:
    _run("openssl", "pkeyutl", "-sign", "-rawin", "-inkey", key, "-in", folder / "SHA256SUMS",
         "-out", folder / "SHA256SUMS.sig")


def make_release(folder: Path, version: str, key: Path, *, payload: int = 3_000_000, fs_size: str = "5M") -> Path:
    """A release folder as scripts/build-image makes it: a real ext4 root image (mkfs.ext4 -d)
    compressed by zstd, a UKI stand-in, SHA256SUMS by sha256sum, the signature by openssl."""
    folder.mkdir(parents=True)
    tree = folder.parent / f"tree-{version}"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "os-release").write_text(f"ID=debian\nIMAGE_VERSION={version}\n")
    (tree / "blob").write_bytes(os.urandom(payload))  # incompressible: several chunks to write
    raw = folder.parent / f"root-{version}.raw"
    _run("mkfs.ext4", "-q", "-F", "-d", tree, raw, fs_size)
    _run("zstd", "-q", "-f", raw, "-o", folder / f"appliance_{version}.root.raw.zst")
    (folder / f"appliance_{version}.efi").write_bytes(b"MZ" + os.urandom(200_000))
    done = subprocess.run(["sha256sum", f"appliance_{version}.root.raw.zst", f"appliance_{version}.efi"],
                          capture_output=True, text=True, cwd=folder, check=True)
    (folder / "SHA256SUMS").write_text(done.stdout)
    sign(folder, key)
    return folder


@dataclass
class Box:
    """A disk image (ESP, slots A and B, data), an ESP folder, efivars and os-release."""

    disk: Path
    esp: Path
    efivars: Path
    os_release: Path
    keys: Path
    key: Path
    run_dir: Path

    def region(self, number: int) -> bytes:
        p = gpt.read(self.disk).partition(number)
        with self.disk.open("rb") as f:
            f.seek(p.offset)
            return f.read(p.size)

    def digest(self, number: int) -> str:
        return hashlib.sha256(self.region(number)).hexdigest()

    def esp_files(self) -> dict[str, str]:
        return {str(p.relative_to(self.esp)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(self.esp.rglob("*")) if p.is_file()}

    def labels(self) -> list[str]:
        return [p.name for p in gpt.read(self.disk).partitions]

    def install(self, source: str | Path, **kw: object) -> str:
        args: dict[str, object] = {"disk": self.disk, "esp": self.esp, "keys_dir": self.keys, "tries": 3,
                                       "running": "0.1.0", "run_dir": self.run_dir}
        args.update(kw)
        return install(source, **args)  # type: ignore[arg-type]


@pytest.fixture
def box(tmp_path: Path) -> Box:
    disk = tmp_path / "disk.img"
    gpt.create(disk, 24 * MiB, [gpt.NewPartition(ESP_TYPE, "esp", 2 * MiB),
                                gpt.NewPartition(ROOT_TYPE, "appliance_0.1.0", SLOT),
                                gpt.NewPartition(ROOT_TYPE, "_empty", SLOT),
                                gpt.NewPartition(DATA_TYPE, "appliance-data", 4 * MiB)])
    with disk.open("r+b") as f:  # recognisable content everywhere an update must not write
        for n in (1, 2, 3, 4):
            p = gpt.read(disk).partition(n)
            f.seek(p.offset)
            f.write(os.urandom(p.size))
    esp = tmp_path / "esp"
    (esp / "EFI" / "Linux").mkdir(parents=True)
    (esp / "EFI" / "Linux" / "appliance_0.1.0.efi").write_bytes(b"MZ old")
    (esp / "loader").mkdir()
    (esp / "loader" / "loader.conf").write_text("timeout 0\n")
    os_release = tmp_path / "os-release"
    os_release.write_text('ID=debian\nIMAGE_VERSION="0.1.0"\n')
    keys = tmp_path / "update-keys"
    key = make_key(tmp_path / "signing", "site", keys)
    efivars = tmp_path / "efivars"
    efivars.mkdir()
    return Box(disk, esp, efivars, os_release, keys, key, tmp_path / "run")


def set_efivar(efivars: Path, path: str) -> None:
    """LoaderBootCountPath as efivarfs shows it: 4 bytes of attributes, UTF-16LE, NUL."""
    attrs = (0x1 | 0x2 | 0x4).to_bytes(4, "little")  # non-volatile, boot and runtime access
    (efivars / BOOT_COUNT_VAR).write_bytes(attrs + (path + "\0").encode("utf-16-le"))


# -- the GPT --------------------------------------------------------------------------------


def test_the_gpt_is_read_by_util_linux_and_a_rename_keeps_both_copies_valid(box: Box) -> None:
    def partx() -> list[str]:
        done = subprocess.run(["partx", "--show", "-g", "-o", "NR,START,NAME,TYPE", str(box.disk)],
                              capture_output=True, text=True, check=True)
        return done.stdout.split()

    before = partx()
    assert "appliance_0.1.0" in before and "_empty" in before and ROOT_TYPE in before
    gpt.set_name(box.disk, 3, "appliance_0.1.0.1")
    assert box.labels() == ["esp", "appliance_0.1.0", "appliance_0.1.0.1", "appliance-data"]
    assert "appliance_0.1.0.1" in partx()
    # Destroy the primary header: the backup (rewritten by set_name) is read instead...
    with box.disk.open("r+b") as f:
        f.seek(gpt.SECTOR + 40)
        f.write(b"\xff")
    table = gpt.read(box.disk)
    assert not table.primary_ok and [p.name for p in table.partitions][2] == "appliance_0.1.0.1"
    # ... and a rename repairs the primary from it.
    gpt.set_name(box.disk, 3, "_empty")
    table = gpt.read(box.disk)
    assert table.primary_ok and table.partition(3).name == "_empty" and "_empty" in partx()
    # Neither copy valid: refused in words.
    with box.disk.open("r+b") as f:
        f.seek(gpt.SECTOR + 40)
        f.write(b"\xff")
        f.seek(box.disk.stat().st_size - gpt.SECTOR + 40)
        f.write(b"\xff")
    with pytest.raises(UpdateError, match="no valid GPT partition table"):
        gpt.read(box.disk)


def test_slots_are_found_by_the_running_versions_label(box: Box) -> None:
    slots = find_slots(box.disk, "0.1.0")
    assert (slots.running.letter, slots.running.number, slots.inactive.letter, slots.inactive.number) == \
        ("A", 2, "B", 3)
    assert slots.inactive.version is None and slots.running.version == "0.1.0"
    with pytest.raises(UpdateError, match="no single root slot"):
        find_slots(box.disk, "0.0.9")


# -- releases and signatures ----------------------------------------------------------------


def test_a_signed_release_is_read_and_bad_missing_or_unknown_signatures_are_refused(box: Box,
                                                                                 tmp_path: Path) -> None:
    rel = make_release(tmp_path / "rel", "0.1.0.1", box.key)
    r = read_release(rel, box.keys)
    assert (r.version, r.root_name, r.uki_name) == ("0.1.0.1", "appliance_0.1.0.1.root.raw.zst",
                                                    "appliance_0.1.0.1.efi")
    assert r.sums[r.uki_name] == hashlib.sha256((rel / r.uki_name).read_bytes()).hexdigest()

    # A second trusted key (rotation): a release signed by either one is accepted.
    new = make_key(tmp_path / "signing", "new", box.keys)
    sign(rel, new)
    assert read_release(rel, box.keys).version == "0.1.0.1"

    # Signed by a key the box does not trust.
    stranger = make_key(tmp_path / "signing", "stranger")
    sign(rel, stranger)
    with pytest.raises(UpdateError, match="does not match any trusted key"):
        read_release(rel, box.keys)
    # A manifest changed after signing (a sum replaced).
    sign(rel, box.key)
    text = (rel / "SHA256SUMS").read_text()
    (rel / "SHA256SUMS").write_text(text.replace(text[:64], "0" * 64, 1))
    with pytest.raises(UpdateError, match="changed after signing"):
        read_release(rel, box.keys)
    (rel / "SHA256SUMS").write_text(text)
    assert read_release(rel, box.keys).version == "0.1.0.1"
    # No signature at all.
    (rel / "SHA256SUMS.sig").unlink()
    with pytest.raises(UpdateError, match="not signed"):
        read_release(rel, box.keys)
    # No trusted key on the box.
    sign(rel, box.key)
    with pytest.raises(UpdateError, match="no trusted update key"):
        read_release(rel, tmp_path / "no-keys")
    with pytest.raises(UpdateError, match="holds no SHA256SUMS"):
        read_release(tmp_path, box.keys)


def test_the_newest_version_of_a_manifest_is_picked_and_a_stick_is_recognised(box: Box, tmp_path: Path) -> None:
    stick = tmp_path / "stick"
    rel = make_release(stick / "appliance-update", "0.1.0.9", box.key, payload=1000)
    older = make_release(tmp_path / "older", "0.1.0.10~rc1", box.key, payload=1000)
    sums = (rel / "SHA256SUMS").read_text() + (older / "SHA256SUMS").read_text()
    (rel / "SHA256SUMS").write_text(sums)
    sign(rel, box.key)
    assert read_release(rel, box.keys).version == "0.1.0.10~rc1"
    assert stick_release_dir(stick) == rel and stick_release_dir(tmp_path) is None


# -- installing -----------------------------------------------------------------------------


def test_an_install_writes_only_the_inactive_slot_and_commits_by_the_uki(box: Box, tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    rel = make_release(tmp_path / "rel", "0.1.0.1", box.key)
    before = {n: box.digest(n) for n in (1, 2, 4)}
    seen: list[Progress] = []
    with caplog.at_level("INFO", logger="appliance.update"):
        summary = box.install(rel, progress=seen.append)
    said = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("update: writing version 0.1.0.1 to slot B: ") and m.endswith(" %") for m in said)
    assert said[-1] == f"update done: {summary}"
    assert "version 0.1.0.1 is installed in slot B" in summary
    assert {n: box.digest(n) for n in (1, 2, 4)} == before  # ESP partition, slot A, data untouched
    assert box.labels() == ["esp", "appliance_0.1.0", "appliance_0.1.0.1", "appliance-data"]
    raw = (tmp_path / "root-0.1.0.1.raw").read_bytes()
    assert box.region(3)[:len(raw)] == raw
    linux = box.esp / "EFI" / "Linux"
    assert sorted(p.name for p in linux.iterdir()) == ["appliance_0.1.0.1+3.efi", "appliance_0.1.0.efi"]
    assert (linux / "appliance_0.1.0.1+3.efi").read_bytes() == (rel / "appliance_0.1.0.1.efi").read_bytes()
    phases = [p.phase for p in seen]
    assert phases.index("verifying") < phases.index("preparing") < phases.index("writing") \
        < phases.index("labelling") < phases.index("committing") < phases.index("done")
    assert any(p.phase == "writing" and 0 < p.percent < 100 for p in seen)
    last = read_progress(box.run_dir)
    assert last is not None and last.finished and last.ok and last.version == "0.1.0.1"
    info = version_info(box.esp, box.os_release)
    assert (info.other, info.other_state, info.tries_left) == ("0.1.0.1", "trying", 3)
    assert info.lines()[1] == "Other slot: 0.1.0.1 (installed, boots next, 3 tries)"

    # The next one goes into the same (inactive) slot again, replacing 0.1.0.1's UKI.
    rel2 = make_release(tmp_path / "rel2", "0.1.0.2", box.key, payload=1000)
    box.install(rel2)
    assert sorted(p.name for p in linux.iterdir()) == ["appliance_0.1.0.2+3.efi", "appliance_0.1.0.efi"]
    assert box.labels()[1:3] == ["appliance_0.1.0", "appliance_0.1.0.2"]
    assert {n: box.digest(n) for n in (1, 2, 4)} == before


@pytest.mark.parametrize("artefact", ["root.raw.zst", "efi"])
def test_a_flipped_byte_is_refused_before_anything_is_written(box: Box, tmp_path: Path, artefact: str) -> None:
    rel = make_release(tmp_path / "rel", "0.1.0.1", box.key)
    target = rel / f"appliance_0.1.0.1.{artefact}"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    disk, esp = hashlib.sha256(box.disk.read_bytes()).hexdigest(), box.esp_files()
    with pytest.raises(UpdateError, match=rf"appliance_0\.1\.0\.1\.{artefact} does not match its sha256.*"
                                          "nothing was written"):
        box.install(rel)
    assert hashlib.sha256(box.disk.read_bytes()).hexdigest() == disk
    assert box.esp_files() == esp
    last = read_progress(box.run_dir)
    assert last is not None and last.finished and last.ok is False and "does not match" in last.message


def test_a_bad_signature_is_refused_before_anything_is_written(box: Box, tmp_path: Path) -> None:
    rel = make_release(tmp_path / "rel", "0.1.0.1", box.key)
    sign(rel, make_key(tmp_path / "signing", "stranger"))
    disk, esp = hashlib.sha256(box.disk.read_bytes()).hexdigest(), box.esp_files()
    with pytest.raises(UpdateError, match="does not match any trusted key"):
        box.install(rel)
    assert hashlib.sha256(box.disk.read_bytes()).hexdigest() == disk and box.esp_files() == esp


def test_versions_not_newer_or_marked_bad_are_refused_unless_forced(box: Box, tmp_path: Path) -> None:
    same = make_release(tmp_path / "same", "0.1.0", box.key, payload=1000)
    with pytest.raises(UpdateError, match="is the running version"):
        box.install(same, force=True)
    older = make_release(tmp_path / "older", "0.0.9", box.key, payload=1000)
    with pytest.raises(UpdateError, match="older than the running version 0.1.0"):
        box.install(older)
    linux = box.esp / "EFI" / "Linux"
    (linux / "appliance_0.1.0.1+0-3.efi").write_bytes(b"MZ broken")
    bad = make_release(tmp_path / "bad", "0.1.0.1", box.key, payload=1000)
    with pytest.raises(UpdateError, match=r"failed to become healthy \(appliance_0\.1\.0\.1\+0-3\.efi"):
        box.install(bad)
    assert box.labels()[2] == "_empty"
    box.install(bad, force=True)
    assert sorted(p.name for p in linux.iterdir()) == ["appliance_0.1.0.1+3.efi", "appliance_0.1.0.efi"]
    box.install(older, force=True)  # going back needs force
    assert box.labels()[2] == "appliance_0.0.9"


def test_an_interrupted_install_leaves_the_slot_empty_and_the_old_version_booting(box: Box,
                                                                                  tmp_path: Path) -> None:
    rel = make_release(tmp_path / "rel", "0.1.0.1", box.key)
    gpt.set_name(box.disk, 3, "appliance_0.0.9")  # the slot held an older version with its UKI
    linux = box.esp / "EFI" / "Linux"
    (linux / "appliance_0.0.9.efi").write_bytes(b"MZ older")
    before_b = box.digest(3)
    before = {n: box.digest(n) for n in (1, 2, 4)}

    class PowerCut(Exception):
        pass

    def cut(p: Progress) -> None:
        if p.phase == "writing" and p.percent >= 30:
            raise PowerCut

    with pytest.raises(PowerCut):
        box.install(rel, progress=cut)
    assert box.labels()[2] == "_empty"
    assert box.digest(3) != before_b  # it was cut in the middle of writing
    assert {n: box.digest(n) for n in (1, 2, 4)} == before
    assert sorted(p.name for p in linux.iterdir()) == ["appliance_0.1.0.efi"]  # only the running one boots
    info = version_info(box.esp, box.os_release)
    assert (info.other, info.other_state) == (None, "none") and info.lines()[1] == "Other slot: empty"
    last = read_progress(box.run_dir)
    assert last is not None and last.finished and last.ok is False
    # The next attempt completes.
    box.install(rel)
    assert box.labels()[2] == "appliance_0.1.0.1"


def test_no_install_while_the_running_version_is_on_trial_or_another_install_runs(box: Box,
                                                                                  tmp_path: Path) -> None:
    import fcntl

    rel = make_release(tmp_path / "rel", "0.1.0.1", box.key, payload=1000)
    linux = box.esp / "EFI" / "Linux"
    (linux / "appliance_0.1.0.efi").rename(linux / "appliance_0.1.0+2-1.efi")
    disk = hashlib.sha256(box.disk.read_bytes()).hexdigest()
    with pytest.raises(UpdateError, match="0.1.0 is still on trial"):
        box.install(rel)
    assert hashlib.sha256(box.disk.read_bytes()).hexdigest() == disk
    (linux / "appliance_0.1.0+2-1.efi").rename(linux / "appliance_0.1.0.efi")
    box.run_dir.mkdir(parents=True, exist_ok=True)
    with (box.run_dir / "lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(UpdateError, match="another update is being installed"):
            box.install(rel)
    box.install(rel)
    assert box.labels()[2] == "appliance_0.1.0.1"


def test_the_running_disk_and_partition_nodes_are_found_through_sysfs(tmp_path: Path) -> None:
    """The kernel's views (mountinfo, /sys/dev/block, /sys/class/block) as folders."""
    from appliance.update.slots import disk_of, partition_device, root_device

    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("22 1 259:3 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p3 rw\n"
                         "23 22 259:4 / /var/lib/appliance rw - ext4 /dev/nvme0n1p4 rw\n")
    assert root_device(mountinfo) == "259:3"
    sysfs = tmp_path / "sys"
    part = sysfs / "devices" / "pci0000:00" / "nvme" / "nvme0n1" / "nvme0n1p3"
    part.mkdir(parents=True)
    (part / "partition").write_text("3\n")
    (sysfs / "dev" / "block").mkdir(parents=True)
    (sysfs / "dev" / "block" / "259:3").symlink_to(part)
    assert disk_of("259:3", sysfs / "dev" / "block") == (Path("/dev/nvme0n1"), 3)
    with pytest.raises(UpdateError, match="not on a disk partition"):
        disk_of("7:0", sysfs / "dev" / "block")
    (sysfs / "class" / "block").mkdir(parents=True)
    (sysfs / "class" / "block" / "nvme0n1").symlink_to(part.parent)
    assert partition_device(Path("/dev/nvme0n1"), 3, sysfs / "class" / "block") == Path("/dev/nvme0n1p3")
    assert partition_device(Path("/dev/sda"), 3, sysfs / "class" / "block") == Path("/dev/sda3")


def test_a_root_image_larger_than_the_slot_is_refused(box: Box, tmp_path: Path) -> None:
    rel = make_release(tmp_path / "rel", "0.1.0.1", box.key, payload=1000, fs_size="8M")
    disk = hashlib.sha256(box.disk.read_bytes()).hexdigest()
    with pytest.raises(UpdateError, match="larger than slot B"):
        box.install(rel)
    assert hashlib.sha256(box.disk.read_bytes()).hexdigest() == disk


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_an_install_from_an_http_url(box: Box, tmp_path: Path, http_server: tuple[str, Path]) -> None:
    url, root = http_server
    make_release(root / "releases", "0.1.0.1", box.key)
    before = {n: box.digest(n) for n in (1, 2, 4)}
    box.install(url + "/releases/")
    assert box.labels()[2] == "appliance_0.1.0.1"
    assert {n: box.digest(n) for n in (1, 2, 4)} == before
    assert (box.esp / "EFI" / "Linux" / "appliance_0.1.0.1+3.efi").exists()
    with pytest.raises(UpdateError, match="holds no SHA256SUMS"):
        read_release(url + "/nothing", box.keys)
    (root / "releases" / "appliance_0.1.0.1.efi").unlink()
    with pytest.raises(UpdateError, match="does not exist; the release there is incomplete"):
        box.install(url + "/releases", force=True)
    with pytest.raises(UpdateError, match="cannot download"):
        read_release(f"http://127.0.0.1:{free_port()}/x", box.keys, timeout=5)


def test_a_killed_installer_leaves_the_slot_empty_and_the_old_version_booting(box: Box, tmp_path: Path) -> None:
    """SIGKILL in the middle of writing the slot (the process-level power cut): the HTTP
    server sends half the root image on the second read (pass 2) and then holds the line."""
    import sys
    import time

    from helpers import ROOT, wait_for

    www = tmp_path / "www"
    rel = make_release(www / "rel", "0.1.0.1", box.key)
    root = rel / "appliance_0.1.0.1.root.raw.zst"
    reads: list[str] = []
    release = threading.Event()

    class Stalling(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            reads.append(self.path)
            if self.path.endswith(root.name) and reads.count(self.path) == 2:
                data = root.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[:len(data) // 2])
                self.wfile.flush()
                release.wait(60)
                return
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Stalling, directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    gpt.set_name(box.disk, 3, "appliance_0.0.9")
    linux = box.esp / "EFI" / "Linux"
    (linux / "appliance_0.0.9.efi").write_bytes(b"MZ older")
    before = {n: box.digest(n) for n in (1, 2, 4)}
    before_b = box.digest(3)
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "update", "apply", "--yes", "--source",
         f"http://127.0.0.1:{server.server_address[1]}/rel", "--disk", str(box.disk), "--esp", str(box.esp),
         "--keys", str(box.keys), "--os-release", str(box.os_release), "--run-dir", str(box.run_dir)],
        env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        def writing() -> bool:
            p = read_progress(box.run_dir)
            return p is not None and p.phase == "writing" and p.percent >= 30
        wait_for(writing, timeout=60, what="the installer to write half the slot")
        started = time.monotonic()
        proc.kill()
        assert proc.wait(timeout=30) == -9 and time.monotonic() - started < 30
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
        release.set()
        server.shutdown()
        server.server_close()
        thread.join()
    assert box.labels()[2] == "_empty" and box.digest(3) != before_b  # killed while writing it
    assert {n: box.digest(n) for n in (1, 2, 4)} == before
    assert sorted(p.name for p in linux.iterdir()) == ["appliance_0.1.0.efi"]
    info = version_info(box.esp, box.os_release)
    assert (info.running, info.other_state) == ("0.1.0", "none")
    box.install(rel)  # the next try from the folder completes
    assert box.labels()[2] == "appliance_0.1.0.1"


# -- version information, blessing, boot check ----------------------------------------------


def esp_with(tmp_path: Path, *names: str) -> Path:
    esp = tmp_path / "esp-info"
    shutil.rmtree(esp, ignore_errors=True)
    (esp / "EFI" / "Linux").mkdir(parents=True)
    for n in names:
        (esp / "EFI" / "Linux" / n).write_bytes(b"MZ")
    return esp


def test_version_info_reads_the_boot_counting_names(box: Box, tmp_path: Path) -> None:
    osr = tmp_path / "os-release-info"
    osr.write_text("IMAGE_VERSION=0.1.0.1\n")
    good = version_info(esp_with(tmp_path, "appliance_0.1.0.1.efi", "appliance_0.1.0.efi"), osr)
    assert (good.running, good.other, good.other_state, good.tries_left, good.rolled_back) == \
        ("0.1.0.1", "0.1.0", "good", None, False)
    assert good.lines() == ["System version 0.1.0.1 (running)", "Other slot: 0.1.0 (good, the fallback)"]
    assert good.status_line() == "version 0.1.0.1"

    trial = version_info(esp_with(tmp_path, "appliance_0.1.0.1+2-1.efi", "appliance_0.1.0.efi"), osr)
    assert (trial.running_state, trial.tries_left, trial.other_state) == ("trying", 2, "good")
    assert trial.lines()[0] == "System version 0.1.0.1 (running, on trial until it is healthy; 2 tries left)"
    assert trial.status_line() == "version 0.1.0.1 (on trial)"

    osr.write_text("IMAGE_VERSION=0.1.0.1\n")
    rolled = version_info(esp_with(tmp_path, "appliance_0.1.0.1.efi", "appliance_0.1.0.2+0-3.efi"), osr)
    assert (rolled.other, rolled.other_state, rolled.rolled_back) == ("0.1.0.2", "bad", True)
    assert rolled.lines() == [
        "System version 0.1.0.1 (running)",
        "Other slot: 0.1.0.2 (failed to become healthy, not booted again)",
        "Last update: version 0.1.0.2 failed to become healthy in 3 boots; the box rolled back to 0.1.0.1",
    ]
    assert "rolled back" in rolled.status_line()

    # An older version marked bad is no rollback; an empty other slot is "none".
    old_bad = version_info(esp_with(tmp_path, "appliance_0.1.0.1.efi", "appliance_0.1.0+0-3.efi"), osr)
    assert (old_bad.other_state, old_bad.rolled_back) == ("bad", False)
    alone = version_info(esp_with(tmp_path, "appliance_0.1.0.1.efi", "other.efi"), osr)
    assert (alone.other, alone.other_state) == (None, "none")
    osr.write_text("ID=debian\n")
    with pytest.raises(UpdateError, match="names no IMAGE_VERSION"):
        version_info(box.esp, osr)


def test_bless_renames_the_uki_the_boot_loader_counts(box: Box) -> None:
    linux = box.esp / "EFI" / "Linux"
    (linux / "appliance_0.1.0.1+2-1.efi").write_bytes(b"MZ new")
    assert bless(box.esp, box.efivars) is None  # not counted: nothing to do
    set_efivar(box.efivars, "\\EFI\\Linux\\appliance_0.1.0.1+2-1.efi")
    assert bless(box.esp, box.efivars) == "0.1.0.1"
    assert sorted(p.name for p in linux.iterdir()) == ["appliance_0.1.0.1.efi", "appliance_0.1.0.efi"]
    assert (linux / "appliance_0.1.0.1.efi").read_bytes() == b"MZ new"
    assert bless(box.esp, box.efivars) == "0.1.0.1"  # twice in one boot: already good


def test_boot_check_blesses_a_healthy_counted_boot(box: Box, server) -> None:  # type: ignore[no-untyped-def]
    linux = box.esp / "EFI" / "Linux"
    box.os_release.write_text("IMAGE_VERSION=0.1.0.1\n")
    (linux / "appliance_0.1.0.1+2-1.efi").write_bytes(b"MZ new")
    set_efivar(box.efivars, "\\EFI\\Linux\\appliance_0.1.0.1+2-1.efi")
    reboots: list[int] = []
    result = boot_check(host="127.0.0.1", port=server.port, ae_title=server.ae_title,
                        data_dir=server.store.data_dir, esp=box.esp, efivars=box.efivars,
                        os_release=box.os_release, timeout=30, state=lambda: "active",
                        reboot=lambda: reboots.append(1))
    assert result.healthy and result.counted and not reboots
    assert result.message == "update: version 0.1.0.1 is healthy and marked good"
    assert (linux / "appliance_0.1.0.1.efi").exists() and not (linux / "appliance_0.1.0.1+2-1.efi").exists()


def test_boot_check_reboots_an_unhealthy_boot_only_when_it_is_counted(box: Box, tmp_path: Path) -> None:
    reboots: list[int] = []
    kw = {"host": "127.0.0.1", "port": free_port(), "ae_title": "ELEKTA_STORAGE", "data_dir": tmp_path / "data",
              "esp": box.esp, "efivars": box.efivars, "os_release": box.os_release, "timeout": 1.0, "interval": 0.1,
              "echo_timeout": 1.0, "reboot": lambda: reboots.append(1)}
    result = boot_check(state=lambda: "active", **kw)  # type: ignore[arg-type]
    assert not result.healthy and not result.counted and not reboots
    assert "does not answer C-ECHO" in result.message and "not on trial; no restart" in result.message

    linux = box.esp / "EFI" / "Linux"
    (linux / "appliance_0.1.0+1-2.efi").write_bytes(b"MZ")
    set_efivar(box.efivars, "\\EFI\\Linux\\appliance_0.1.0+1-2.efi")
    result = boot_check(state=lambda: "failed", **kw)  # type: ignore[arg-type]
    assert not result.healthy and result.counted and reboots == [1]
    assert "the appliance service failed" in result.message
    assert (linux / "appliance_0.1.0+1-2.efi").exists()  # not blessed


# -- request files, configuration, command line ---------------------------------------------


def test_request_offer_and_progress_files(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert read_request(run) is None and read_offer(run) is None and read_progress(run) is None
    write_request("/dev/sdb1", "console", run_dir=run)
    req = read_request(run)
    assert req is not None and (req["source"], req["by"], req["force"]) == ("/dev/sdb1", "console", False)
    assert oct((run / "request.json").stat().st_mode & 0o777) == "0o640"
    write_offer("/dev/sdb1", "0.1.0.1", run_dir=run)
    assert read_offer(run) == ("/dev/sdb1", "0.1.0.1")
    clear_offer(run)
    assert read_offer(run) is None
    (run / "request.json").write_text("{not json")
    assert read_request(run) is None
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []


def test_the_update_section_of_the_config(tmp_path: Path) -> None:
    from appliance import config
    from appliance.errors import ConfigError

    c = config.Config()
    assert (c.update.auto_from_usb, c.update.url, c.update.boot_tries) == (False, "", 3)
    p = tmp_path / "a.toml"
    p.write_text('[update]\nauto_from_usb = true\nurl = "https://updates.example.org/appliance"\nboot_tries = 5\n')
    c = config.load(p)
    assert (c.update.auto_from_usb, c.update.url, c.update.boot_tries) == \
        (True, "https://updates.example.org/appliance", 5)
    config.save(c, tmp_path / "b.toml")
    assert config.load(tmp_path / "b.toml") == c
    p.write_text('[update]\nurl = "ftp://x/y"\nboot_tries = 11\n')
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert "update.url 'ftp://x/y' is not an http:// or https:// URL" in str(e.value)
    assert "update.boot_tries 11 is out of range; use 1 to 10" in str(e.value)


def cli(*args: str) -> int:
    from appliance.cli import main

    return main(list(args))


def test_the_update_commands(box: Box, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rel = make_release(tmp_path / "rel", "0.1.0.1", box.key)
    common = ["--esp", str(box.esp), "--os-release", str(box.os_release), "--run-dir", str(box.run_dir)]
    assert cli("update", "check", "--source", str(rel), "--keys", str(box.keys), *common) == 0
    assert "version 0.1.0.1 is available" in capsys.readouterr().out
    assert cli("update", "check", "--source", str(tmp_path), "--keys", str(box.keys), *common) == 1
    assert "holds no SHA256SUMS" in capsys.readouterr().err
    (tmp_path / "appliance.toml").write_text("[update]\nboot_tries = 2\n")
    assert cli("--config", str(tmp_path / "appliance.toml"), "update", "check", "--keys", str(box.keys), *common) == 1
    assert "--source FOLDER or URL, or set update.url" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli("update", "apply", "--frobnicate")
    assert e.value.code == 2
    assert cli("--config", str(tmp_path / "appliance.toml"), "update", "apply", "--source", str(rel), "--yes",
               "--disk", str(box.disk), "--keys", str(box.keys), *common) == 0
    assert box.labels()[2] == "appliance_0.1.0.1"
    assert (box.esp / "EFI" / "Linux" / "appliance_0.1.0.1+2.efi").exists()  # [update] boot_tries = 2
    assert cli("update", "status", *common) == 0
    out = capsys.readouterr().out
    assert "System version 0.1.0 (running)" in out and "Other slot: 0.1.0.1 (installed, boots next, 2 tries)" in out
    assert "Installer: update done: version 0.1.0.1 is installed in slot B" in out
    older = make_release(tmp_path / "older", "0.0.9", box.key, payload=1000)
    assert cli("update", "apply", "--source", str(older), "--yes", "--disk", str(box.disk), "--keys",
               str(box.keys), *common) == 1
    assert "older than the running version" in capsys.readouterr().err
    assert cli("update", "boot-check", "--esp", str(box.esp), "--efivars", str(box.efivars), "--os-release",
               str(box.os_release), "--timeout", "0.5") == 1


def test_apply_request_mounts_a_stick_read_only_and_unmounts_it(box: Box, tmp_path: Path) -> None:
    """A real USB stick stand-in: an ext4 image holding appliance-update/, on a loop device."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup to attach a stick image")
    stick = tmp_path / "stick"
    make_release(stick / "appliance-update", "0.1.0.1", box.key, payload=1000)
    image = tmp_path / "stick.img"
    _run("mkfs.ext4", "-q", "-F", "-d", stick, image, "16M")
    done = subprocess.run(["losetup", "-f", "--show", str(image)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"no loop device: {done.stderr.strip()}")
    device = done.stdout.strip()
    try:
        write_request(device, "media job", run_dir=box.run_dir)
        assert cli("update", "apply", "--request", "--disk", str(box.disk), "--esp", str(box.esp), "--keys",
                   str(box.keys), "--os-release", str(box.os_release), "--run-dir", str(box.run_dir)) == 0
        assert box.labels()[2] == "appliance_0.1.0.1" and read_request(box.run_dir) is None
        assert device not in Path("/proc/self/mounts").read_text()  # unmounted again
        # A stick without a release: refused in words, unmounted, the request gone.
        write_request(device, "media job", run_dir=box.run_dir)
        _run("mkfs.ext4", "-q", "-F", image, "16M")
        assert cli("update", "apply", "--request", "--disk", str(box.disk), "--esp", str(box.esp), "--keys",
                   str(box.keys), "--os-release", str(box.os_release), "--run-dir", str(box.run_dir)) == 1
        assert device not in Path("/proc/self/mounts").read_text() and read_request(box.run_dir) is None
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


def test_apply_request_installs_from_a_folder_and_removes_the_request(box: Box, tmp_path: Path) -> None:
    rel = make_release(tmp_path / "rel", "0.1.0.1", box.key, payload=1000)
    write_request(str(rel), "test", run_dir=box.run_dir)
    write_offer(str(rel), "0.1.0.1", run_dir=box.run_dir)
    assert cli("update", "apply", "--request", "--disk", str(box.disk), "--esp", str(box.esp), "--keys",
               str(box.keys), "--os-release", str(box.os_release), "--run-dir", str(box.run_dir)) == 0
    assert box.labels()[2] == "appliance_0.1.0.1"
    assert read_request(box.run_dir) is None and read_offer(box.run_dir) is None
    progress = json.loads((box.run_dir / "progress.json").read_text())
    assert progress["ok"] is True and progress["message"].startswith("update done: ")
    # A failing request is removed too (else the path unit would start the service again).
    write_request(str(tmp_path / "nothing"), "test", run_dir=box.run_dir)
    assert cli("update", "apply", "--request", "--disk", str(box.disk), "--esp", str(box.esp), "--keys",
               str(box.keys), "--os-release", str(box.os_release), "--run-dir", str(box.run_dir)) == 1
    assert read_request(box.run_dir) is None
    # No request: nothing to do.
    assert cli("update", "apply", "--request", "--run-dir", str(box.run_dir)) == 0
