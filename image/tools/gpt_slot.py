"""Print the first sector and the sector count of the GPT partition called NAME in a disk image.

Used by scripts/build-image to cut the root file system of system slot A
(PARTLABEL appliance_<version>) out of the disk image it built, for the release.

    python3 gpt_slot.py IMAGE NAME   ->   "<first LBA> <count>" (512-byte sectors)
"""

from __future__ import annotations

import struct
import sys
import zlib

SECTOR = 512


def find(image: str, name: str) -> tuple[int, int]:
    with open(image, "rb") as f:
        f.seek(SECTOR)
        header = f.read(92)
        if header[:8] != b"EFI PART":
            raise SystemExit(f"gpt_slot: {image} has no GPT")
        entries_lba, n_entries, entry_size, entries_crc = struct.unpack_from("<QIII", header, 72)
        f.seek(entries_lba * SECTOR)
        table = f.read(n_entries * entry_size)
    if zlib.crc32(table) != entries_crc:
        raise SystemExit(f"gpt_slot: {image}: the partition entries' CRC is wrong")
    for i in range(n_entries):
        entry = table[i * entry_size : (i + 1) * entry_size]
        first, last = struct.unpack_from("<QQ", entry, 32)
        if entry[56:128].decode("utf-16-le").rstrip("\0") == name:
            return first, last - first + 1
    raise SystemExit(f"gpt_slot: {image} has no partition labelled {name}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    start, count = find(sys.argv[1], sys.argv[2])
    print(start, count)
