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


def _unit_setting(name: str) -> str:
    unit = (ROOT / "udev" / "units" / "appliance.service").read_text()
    values = [line.split("=", 1)[1].strip() for line in unit.splitlines() if line.startswith(f"{name}=")]
    assert len(values) == 1, f"appliance.service sets {name}= {len(values)} times"
    return values[0]


def test_the_unit_s_descriptor_and_task_limits_cover_the_scp_at_its_configured_maxima():
    from appliance.config import ScpConfig, from_dict
    from appliance.errors import ConfigError

    most = 64  # the highest scp.max_associations the configuration accepts
    from_dict({"scp": {"max_associations": most}})
    try:
        from_dict({"scp": {"max_associations": most + 1}})
    except ConfigError:
        pass
    else:
        raise AssertionError(f"scp.max_associations {most + 1} is accepted: resize LimitNOFILE and TasksMax")
    per_association = 4  # socket, temp file, pooled index connection (database + WAL)
    base = 40
    assert int(_unit_setting("LimitNOFILE")) >= most * per_association + ScpConfig().max_pending_connections + base
    assert int(_unit_setting("TasksMax")) >= most + base
    assert _unit_setting("MemoryMax").endswith(("M", "G"))


def _repart(name: str) -> dict[str, str]:
    text = (ROOT / "image" / "mkosi.repart" / name).read_text()
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))


def test_two_system_slots_of_one_size_and_each_uki_boots_its_own_slot():
    a, b = _repart("10-root-a.conf"), _repart("11-root-b.conf")
    assert a["Type"] == b["Type"] == "root"
    assert (a["SizeMinBytes"], a["SizeMaxBytes"]) == (b["SizeMinBytes"], b["SizeMaxBytes"])
    assert a["Label"] == "appliance_%A" and b["Label"] == "_empty" and "CopyFiles" not in b
    conf = (ROOT / "image" / "mkosi.conf").read_text()
    assert "root=PARTLABEL=appliance_%v" in conf and "UnifiedKernelImageFormat=appliance_%v" in conf
    from appliance.update import slot_label  # the names the updater gives a slot must be the image's

    assert slot_label("1.2") == "appliance_1.2"


def test_gpt_slot_finds_slot_a_in_a_partition_table_systemd_repart_wrote(tmp_path):
    import shutil

    import pytest

    repart = shutil.which("systemd-repart")
    if repart is None:
        pytest.skip("systemd-repart is not installed")
    defs = tmp_path / "defs"
    defs.mkdir()
    for conf in sorted((ROOT / "image" / "mkosi.repart").glob("*.conf")):
        kept = [line for line in conf.read_text().splitlines()
                if line.startswith(("[", "Type=", "Label=", "SizeMinBytes=", "SizeMaxBytes="))]
        (defs / conf.name).write_text("\n".join(kept).replace("%A", "1.2") + "\n")
    disk = tmp_path / "disk.raw"
    done = subprocess.run([repart, "--empty=create", "--size=auto", f"--definitions={defs}", "--dry-run=no",
                           "--seed=5c360ea3-770c-4a0b-b00c-211bfe936fc9", str(disk)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    tool = ROOT / "image" / "tools" / "gpt_slot.py"
    out = subprocess.run([sys.executable, tool, disk, "appliance_1.2"], capture_output=True, text=True, check=True)
    start, count = map(int, out.stdout.split())
    assert count * 512 == 1536 * 2**20 and start > 0
    missing = subprocess.run([sys.executable, tool, disk, "appliance_9"], capture_output=True, text=True)
    assert missing.returncode != 0 and "no partition labelled appliance_9" in missing.stderr
