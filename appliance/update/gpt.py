"""Reading a GUID partition table and renaming one partition, in pure Python (UEFI spec 2.10,
section 5.3). The box's disk has 512-byte sectors; the primary header is at LBA 1, its entry
array after it, the backup entries and header at the end of the disk. Both copies are checked
(header and entry-array CRC32) and both are rewritten, with correct CRCs, by a rename.
"""

from __future__ import annotations

import os
import struct
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from appliance.update import UpdateError

SECTOR = 512
SIGNATURE = b"EFI PART"
#: Header layout up to its 92 bytes (the rest of the sector is zero).
_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
#: An entry's fixed part; 72 bytes of UTF-16LE name follow.
_ENTRY = struct.Struct("<16s16sQQQ")
NAME_CHARS = 36


@dataclass(frozen=True)
class Partition:
    """One used entry of the table."""

    number: int  # 1-based, as /dev/sda<N>
    type_guid: str
    guid: str
    first_lba: int
    last_lba: int
    attributes: int
    name: str

    @property
    def offset(self) -> int:
        return self.first_lba * SECTOR

    @property
    def size(self) -> int:
        return (self.last_lba - self.first_lba + 1) * SECTOR


@dataclass(frozen=True)
class Header:
    current_lba: int
    backup_lba: int
    first_usable: int
    last_usable: int
    disk_guid: bytes
    entries_lba: int
    entries: int
    entry_size: int
    entries_crc: int
    revision: int = 0x00010000
    size: int = 92

    def pack(self) -> bytes:
        """The header sector with its CRC."""
        def raw(crc: int) -> bytes:
            return _HEADER.pack(SIGNATURE, self.revision, self.size, crc, 0, self.current_lba, self.backup_lba,
                                self.first_usable, self.last_usable, self.disk_guid, self.entries_lba,
                                self.entries, self.entry_size, self.entries_crc)
        crc = zlib.crc32(raw(0)[:self.size])
        return raw(crc).ljust(SECTOR, b"\0")


@dataclass(frozen=True)
class Table:
    """A verified table: the header it was read from, the raw entry array and its partitions."""

    header: Header
    array: bytes
    partitions: tuple[Partition, ...]
    #: False when the primary copy was damaged and the backup was read.
    primary_ok: bool

    def partition(self, number: int) -> Partition:
        for p in self.partitions:
            if p.number == number:
                return p
        raise UpdateError(f"the disk has no partition {number}")


def _read_at(fd: int, offset: int, size: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise UpdateError(f"the disk ends before byte {offset + size}; it holds no valid partition table")
    return data


def _disk_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


def _header_at(fd: int, lba: int) -> tuple[Header, bytes] | str:
    """The header at ``lba`` and its entry array, or why it is not valid."""
    raw = _read_at(fd, lba * SECTOR, SECTOR)
    sig, rev, size, crc, _, cur, backup, first, last, dguid, elba, n, esize, ecrc = _HEADER.unpack_from(raw)
    if sig != SIGNATURE:
        return "no GPT signature"
    if not 92 <= size <= SECTOR:
        return f"header size {size}"
    if zlib.crc32(raw[:16] + b"\0\0\0\0" + raw[20:size]) != crc:
        return "header CRC mismatch"
    if cur != lba or esize < 128 or esize % 8 or not 0 < n <= 1024:
        return "header fields out of range"
    array = _read_at(fd, elba * SECTOR, n * esize)
    if zlib.crc32(array) != ecrc:
        return "partition entries CRC mismatch"
    return Header(cur, backup, first, last, dguid, elba, n, esize, ecrc, rev, size), array


def _partitions(array: bytes, header: Header) -> tuple[Partition, ...]:
    out = []
    for i in range(header.entries):
        raw = array[i * header.entry_size:(i + 1) * header.entry_size]
        tguid, pguid, first, last, attrs = _ENTRY.unpack_from(raw)
        if tguid == bytes(16):
            continue
        name = raw[56:128].decode("utf-16-le", errors="replace").split("\0", 1)[0]
        out.append(Partition(i + 1, str(uuid.UUID(bytes_le=tguid)), str(uuid.UUID(bytes_le=pguid)),
                             first, last, attrs, name))
    return tuple(out)


def _read(fd: int, where: str) -> Table:
    primary = _header_at(fd, 1)
    if isinstance(primary, tuple):
        header, array = primary
        return Table(header, array, _partitions(array, header), True)
    last = _disk_size(fd) // SECTOR - 1
    backup = _header_at(fd, last) if last > 1 else "disk too small"
    if isinstance(backup, tuple):
        header, array = backup
        return Table(header, array, _partitions(array, header), False)
    raise UpdateError(f"{where} holds no valid GPT partition table (primary: {primary}; backup: {backup})")


def read(disk: Path) -> Table:
    """The partition table of ``disk`` (a block device or an image file): the primary copy,
    or the backup when the primary's CRCs do not match. Raise UpdateError if neither is valid."""
    try:
        fd = os.open(disk, os.O_RDONLY)
    except OSError as exc:
        raise UpdateError(f"cannot open the disk {disk}: {exc.strerror}") from None
    try:
        return _read(fd, str(disk))
    finally:
        os.close(fd)


def _encode_name(name: str) -> bytes:
    raw = name.encode("utf-16-le")
    if len(raw) > NAME_CHARS * 2:
        raise UpdateError(f"the partition name {name!r} is longer than {NAME_CHARS} characters")
    return raw.ljust(NAME_CHARS * 2, b"\0")


def set_name(disk: Path, number: int, name: str) -> None:
    """Set partition ``number``'s name in the primary and the backup table (entry arrays and
    header CRCs recomputed; the backup first, then the primary), then fsync."""
    encoded = _encode_name(name)
    try:
        fd = os.open(disk, os.O_RDWR)
    except OSError as exc:
        raise UpdateError(f"cannot open the disk {disk} for writing: {exc.strerror}") from None
    try:
        table = _read(fd, str(disk))
        table.partition(number)
        h = table.header
        start = (number - 1) * h.entry_size
        array = bytearray(table.array)
        array[start + 56:start + 128] = encoded
        crc = zlib.crc32(bytes(array))
        primary_lba = 1 if table.primary_ok else h.backup_lba
        backup_lba = h.backup_lba if table.primary_ok else h.current_lba
        # The backup's entries sit just before its header; the primary's after LBA 1.
        primary = replace(h, current_lba=primary_lba, backup_lba=backup_lba, entries_lba=2, entries_crc=crc)
        backup_entries = backup_lba - (len(array) + SECTOR - 1) // SECTOR
        backup = replace(h, current_lba=backup_lba, backup_lba=primary_lba, entries_lba=backup_entries,
                         entries_crc=crc)
        for hdr in (backup, primary):
            os.pwrite(fd, bytes(array), hdr.entries_lba * SECTOR)
            os.pwrite(fd, hdr.pack(), hdr.current_lba * SECTOR)
            os.fsync(fd)
    except OSError as exc:
        raise UpdateError(f"cannot write the partition table of {disk}: {exc.strerror}") from None
    finally:
        os.close(fd)


@dataclass(frozen=True)
class NewPartition:
    """A partition for :func:`create`: its type, name and size in bytes (a multiple of 512)."""

    type_guid: str
    name: str
    size: int


def create(path: Path, size: int, partitions: Sequence[NewPartition], align: int = 1 << 20) -> Table:
    """Write a fresh GPT (protective MBR, primary and backup) for a disk of ``size`` bytes at
    ``path`` (an image file, created sparse), partitions laid out from 1 MiB, each aligned to
    ``align``. For tests and tools; the box's own disk is made by systemd-repart."""
    sectors = size // SECTOR
    entries, esize = 128, 128
    array_sectors = entries * esize // SECTOR
    first_usable, last_usable = 2 + array_sectors, sectors - 2 - array_sectors
    array = bytearray(entries * esize)
    lba = align // SECTOR
    for i, p in enumerate(partitions):
        n = p.size // SECTOR
        if lba + n - 1 > last_usable:
            raise UpdateError(f"the partitions do not fit on a disk of {size} bytes")
        array[i * esize:(i + 1) * esize] = _ENTRY.pack(uuid.UUID(p.type_guid).bytes_le, uuid.uuid4().bytes_le,
                                                       lba, lba + n - 1, 0) + _encode_name(p.name)
        lba = -(-(lba + n) // (align // SECTOR)) * (align // SECTOR)
    crc = zlib.crc32(bytes(array))
    primary = Header(1, sectors - 1, first_usable, last_usable, uuid.uuid4().bytes_le, 2, entries, esize, crc)
    backup = replace(primary, current_lba=sectors - 1, backup_lba=1, entries_lba=sectors - 1 - array_sectors)
    mbr = bytearray(SECTOR)
    mbr[446:462] = struct.pack("<B3sB3sII", 0, b"\x00\x02\x00", 0xEE, b"\xff\xff\xff", 1,
                               min(sectors - 1, 0xFFFFFFFF))
    mbr[510:512] = b"\x55\xaa"
    with path.open("r+b" if path.exists() else "w+b") as f:
        f.truncate(size)
        for offset, data in ((0, bytes(mbr)), (SECTOR, primary.pack()), (2 * SECTOR, bytes(array)),
                             (backup.entries_lba * SECTOR, bytes(array)), (backup.current_lba * SECTOR,
                                                                           backup.pack())):
            f.seek(offset)
            f.write(data)
    return read(path)
