"""The factory reset (:mod:`appliance.ops.factoryreset`) against a real ext4 file image.

The data partition is a file holding an ext4 made with old data in it (a stored object, a
configuration); the reset formats it with the real ``mkfs.ext4`` and ``debugfs`` then reads
it back: a fresh file system with the image's empty config folder and nothing else, the
label ``appliance-data``, as systemd-repart makes it. ``systemctl`` and ``umount`` are
recorded, not run (a test must not stop units or reboot the machine). The service password
is checked against a shadow file whose hash ``openssl passwd`` made.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from appliance.ops.factoryreset import (
    CONFIRM_WORD,
    UNITS,
    FactoryReset,
    ResetError,
    check_password,
)

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("mkfs.ext4", "debugfs", "dumpe2fs", "openssl")),
    reason="needs e2fsprogs (mkfs.ext4, debugfs, dumpe2fs) and openssl")

PASSWORD = "s3rvice pass"


def shadow_file(folder: Path, password: str | None = PASSWORD, field: str | None = None) -> Path:
    """An /etc/shadow with root's hash of ``password`` (or the literal ``field``)."""
    if field is None:
        assert password is not None
        field = subprocess.run(["openssl", "passwd", "-6", "-stdin"], input=password, capture_output=True,
                               text=True, check=True).stdout.strip()
    path = folder / "shadow"
    path.write_text(f"daemon:*:20000:0:99999:7:::\nroot:{field}:20000:0:99999:7:::\nnobody:*:20000::::::\n")
    return path


def old_data_partition(folder: Path) -> Path:
    """A 32 MB ext4 image holding a store object and a configuration, as a used box's data partition."""
    src = folder / "old"
    (src / "objects" / "1.2.3").mkdir(parents=True)
    (src / "objects" / "1.2.3" / "1.2.3.4.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"patient data" * 100)
    (src / "config").mkdir()
    (src / "config" / "appliance.toml").write_text('[scp]\nae_title = "OLD_BOX"\n')
    image = folder / "data.img"
    subprocess.run(["truncate", "-s", "32M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-L", "old-label", "-d", str(src), str(image)], check=True)
    assert "1.2.3.4.dcm" in ls(image, "/objects/1.2.3")
    return image


def ls(image: Path, folder: str = "/") -> set[str]:
    """The names in ``folder`` of the ext4 ``image``, as debugfs lists them."""
    out = subprocess.run(["debugfs", "-R", f"ls -l {folder}", str(image)], capture_output=True, text=True,
                         check=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()} - {".", ".."}


def superblock(image: Path) -> dict[str, str]:
    out = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True, check=True).stdout
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines()) if v}


class Recorder:
    """Records every command; runs only mkfs.ext4 for real; a command may be made to fail."""

    def __init__(self, fail: str = "") -> None:
        self.calls: list[list[str]] = []
        self.fail = fail

    def __call__(self, cmd: Sequence[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(cmd))
        if cmd[0] == "mkfs.ext4":
            return subprocess.run(list(cmd), capture_output=True, text=True, check=False)
        if self.fail and self.fail in " ".join(cmd):
            return subprocess.CompletedProcess(list(cmd), 32, "", f"umount: {cmd[-1]}: target is busy.")
        return subprocess.CompletedProcess(list(cmd), 0, "", "")

    def names(self) -> list[str]:
        return [" ".join(c[:2]) for c in self.calls]


def test_the_password_is_checked_against_the_shadow_file(tmp_path: Path) -> None:
    shadow = shadow_file(tmp_path)
    check_password(PASSWORD, shadow)
    with pytest.raises(ResetError, match="wrong service password: nothing was erased"):
        check_password("s3rvice", shadow)
    for locked in ("*", "!", "!$6$abc$def", ""):
        with pytest.raises(ResetError, match="the box has no service \\(root\\) password.*set one first"):
            check_password("", shadow_file(tmp_path, field=locked))
    with pytest.raises(ResetError, match="cannot read .*missing"):
        check_password(PASSWORD, tmp_path / "missing")


def test_the_word_must_be_erase(tmp_path: Path) -> None:
    reset = FactoryReset(shadow=shadow_file(tmp_path))
    reset.check(CONFIRM_WORD, PASSWORD)
    for word in ("erase", "ERASE ", "yes", ""):
        with pytest.raises(ResetError, match=f"not {CONFIRM_WORD}: nothing was erased"):
            reset.check(word, PASSWORD)


def test_the_data_partition_is_formatted_fresh_and_the_box_reboots(tmp_path: Path) -> None:
    image = old_data_partition(tmp_path)
    runner = Recorder()
    said: list[str] = []
    mount = tmp_path / "var-lib-appliance"
    FactoryReset(device=image, mountpoint=mount, shadow=shadow_file(tmp_path), runner=runner).run(said.append)
    assert runner.names() == ["systemctl stop", f"umount {mount}", "mkfs.ext4 -F", "systemctl reboot"]
    assert runner.calls[0][2:] == list(UNITS)
    assert runner.calls[2][-1] == str(image)
    assert [s.split(" ", 1)[0] for s in said] == ["1/4", "2/4", "3/4", "4/4"]
    assert "Formatting the data partition" in said[2]
    # A fresh ext4: the image's empty config folder (0750) and lost+found, nothing of the old data.
    assert ls(image) == {"lost+found", "config"}
    assert ls(image, "/config") == set()
    mode = subprocess.run(["debugfs", "-R", "stat /config", str(image)], capture_output=True, text=True,
                          check=True).stdout
    assert re.search(r"Mode:\s+0750", mode), mode
    sb = superblock(image)
    assert sb["Filesystem volume name"] == "appliance-data"
    assert sb["Inode size"] == "256" and sb["Block size"] == "4096" and sb["Reserved block count"] == "0"
    assert "has_journal" in sb["Filesystem features"]


def test_a_busy_partition_is_not_formatted_and_the_appliance_starts_again(tmp_path: Path) -> None:
    image = old_data_partition(tmp_path)
    before = image.read_bytes()
    runner = Recorder(fail="umount")
    said: list[str] = []
    reset = FactoryReset(device=image, mountpoint=tmp_path / "mnt", shadow=shadow_file(tmp_path), runner=runner)
    with pytest.raises(ResetError, match="cannot unmount .*mnt .*umount answered umount: .*target is busy"):
        reset.run(said.append)
    assert runner.names() == ["systemctl stop", f"umount {tmp_path / 'mnt'}", "systemctl start"]
    assert "Nothing was erased; starting the appliance again." in said
    assert image.read_bytes() == before


def test_a_failed_format_says_the_partition_is_as_it_was(tmp_path: Path) -> None:
    runner = Recorder()
    said: list[str] = []
    reset = FactoryReset(device=tmp_path / "no-such-device", mountpoint=tmp_path / "mnt",
                         shadow=shadow_file(tmp_path), runner=runner)
    with pytest.raises(ResetError, match="cannot format .*no-such-device: mkfs.ext4 answered"):
        reset.run(said.append)
    assert "systemctl reboot" not in runner.names()
    assert said[-1].startswith("The data partition is not formatted.")
