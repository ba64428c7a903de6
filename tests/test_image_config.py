"""The image's build-time checks that run without building it: image/tools/check_initrd.py."""

import importlib.util
import subprocess
import sys

from helpers import ROOT

spec = importlib.util.spec_from_file_location("check_initrd", ROOT / "image" / "tools" / "check_initrd.py")
assert spec and spec.loader
check_initrd = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_initrd)


def newc(entries: dict[str, bytes]) -> bytes:
    """A newc cpio archive of regular files (what mkosi puts in an initrd), with its trailer."""
    out = b""
    for ino, (name, data) in enumerate([*entries.items(), ("TRAILER!!!", b"")], 1):
        fields = [ino, 0o100644, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        out += header + name.encode() + b"\0"
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return out


def test_the_include_list_is_read_from_the_image_s_mkosi_conf():
    patterns = check_initrd.include_patterns((ROOT / "image" / "mkosi.conf").read_text())
    assert "/nvme.ko" not in patterns and "default" not in patterns  # nvme comes with "default"
    assert {"/vmd.ko", "/mmc_block.ko", "/megaraid_sas.ko"} <= set(patterns)


def test_entry_names_are_read_across_concatenated_padded_archives():
    kver = "usr/lib/modules/6.1.0-1-amd64/kernel/drivers"
    first = newc({"usr/bin/udevadm": b"x" * 5, f"{kver}/nvme/host/nvme.ko": b"elf"})
    second = newc({f"{kver}/md/dm-mod.ko": b"elf!"})
    names = check_initrd.cpio_names(first + b"\0" * 8 + second)
    assert names == ["usr/bin/udevadm", f"{kver}/nvme/host/nvme.ko", "TRAILER!!!", f"{kver}/md/dm-mod.ko",
                     "TRAILER!!!"]


def test_a_pattern_no_module_matches_fails_the_check(tmp_path):
    conf = tmp_path / "mkosi.conf"
    conf.write_text("[Content]\nKernelModulesInitrdInclude=default\n        /nvme.ko\n        /nvmme-typo.ko\n")
    initrd = tmp_path / "initrd"
    cpio = newc({"usr/lib/modules/6.1/kernel/drivers/nvme/host/nvme.ko": b"elf"})
    initrd.write_bytes(subprocess.run(["zstd", "-q", "-c"], input=cpio, capture_output=True, check=True).stdout)
    done = subprocess.run([sys.executable, ROOT / "image" / "tools" / "check_initrd.py", conf, initrd],
                          capture_output=True, text=True)
    assert done.returncode == 1 and "/nvmme-typo.ko" in done.stderr and "nvme.ko," not in done.stderr
    conf.write_text("KernelModulesInitrdInclude=/nvme.ko\n")
    done = subprocess.run([sys.executable, ROOT / "image" / "tools" / "check_initrd.py", conf, initrd],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
