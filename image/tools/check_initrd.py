#!/usr/bin/env python3
"""Check that a built initrd holds a kernel module for every pattern mkosi.conf lists.

    check_initrd.py MKOSI_CONF INITRD

The image's ``KernelModulesInitrdExclude=.*`` keeps every module out of the UKI's initrd
except those ``KernelModulesInitrdInclude=`` names. mkosi skips a pattern that matches no
module without a word, so a misspelt storage driver would only show as a box that does not
boot on that hardware. This reads the initrd (zstd frames of newc cpio archives, as mkosi
writes them, padded to 4 bytes) and fails, naming them, when a pattern matched nothing.
Needs the ``zstd`` command. Prints how many modules the initrd holds.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
CPIO_MAGICS = (b"070701", b"070702")


def include_patterns(conf: str) -> list[str]:
    """The values of ``KernelModulesInitrdInclude=``, continuation lines included."""
    patterns: list[str] = []
    collecting = False
    for line in conf.splitlines():
        if line.startswith("KernelModulesInitrdInclude="):
            collecting = True
            patterns += line.split("=", 1)[1].split()
        elif collecting and line[:1].isspace() and line.strip():
            patterns += line.split()
        else:
            collecting = False
    return [p for p in patterns if p not in ("default", "host") and not p.startswith("#")]


def cpio_names(data: bytes) -> list[str]:
    """Names of the entries of the (concatenated, uncompressed) newc cpio archives in data."""
    names, i = [], 0
    while i + 110 <= len(data):
        if data[i : i + 6] not in CPIO_MAGICS:
            i += 4  # padding between archives
            continue
        filesize, namesize = int(data[i + 54 : i + 62], 16), int(data[i + 94 : i + 102], 16)
        names.append(data[i + 110 : i + 110 + namesize - 1].decode("utf-8", "replace"))
        i = (i + 110 + namesize + 3) & ~3
        i = (i + filesize + 3) & ~3
    return names


def initrd_names(initrd: bytes) -> list[str]:
    """Entry names of every zstd frame of the initrd that decodes (zstd stops at padding)."""
    names: list[str] = []
    for m in re.finditer(re.escape(ZSTD_MAGIC), initrd):
        out = subprocess.run(["zstd", "-dc"], input=initrd[m.start() :], capture_output=True).stdout
        if out[:6] in CPIO_MAGICS:
            names += cpio_names(out)
    return names


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    patterns = include_patterns(Path(argv[0]).read_text())
    modules = [n for n in initrd_names(Path(argv[1]).read_bytes()) if "/modules/" in n and ".ko" in n]
    missing = [p for p in patterns if not any(re.search(p, m) for m in modules)]
    if not modules or missing:
        print(f"check_initrd: {argv[1]} holds {len(modules)} kernel modules; none matches "
              f"{', '.join(missing) or 'the include list'} (KernelModulesInitrdInclude= in {argv[0]})",
              file=sys.stderr)
        return 1
    print(f"initrd: {len(modules)} kernel modules, every one of the {len(patterns)} listed drivers among them")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
