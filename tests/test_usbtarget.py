"""The FAT image medium's reader (appliance/media/usbtarget.FatReader) on real images made
by mtools: files whose clusters are one run (what mcopy writes onto an empty stick) and a
file split over several runs (written into the holes that deleted files left)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from appliance.media import usbtarget


def _mtools(*args: str) -> bytes:
    return subprocess.run(list(args), check=True, capture_output=True).stdout


def _runs(reader: usbtarget.FatReader, name: str) -> int:
    first, size = reader.find(name)
    return len(reader._chain(first, -(-size // reader._cluster)))


@pytest.mark.parametrize(("kib", "fat"), [(1440, 12), (16 * 1024, 16), (48 * 1024, 32)])
def test_the_fat_reader_reads_split_and_whole_cluster_chains_as_mtools_does(tmp_path: Path, kib: int, fat: int) -> None:
    image = tmp_path / "stick.img"
    subprocess.run(["truncate", "-s", f"{kib}K", str(image)], check=True)
    _mtools("mformat", *(["-F"] if fat == 32 else []), "-i", str(image), "::")
    assert f"FAT{fat}" in _mtools("minfo", "-i", str(image), "::").decode()
    _mtools("mmd", "-i", str(image), "::/DICOM")
    cluster = int(re.search(r"cluster size: (\d+) sectors", _mtools("minfo", "-i", str(image), "::").decode())[1]) * 512
    files: dict[str, bytes] = {}

    def copy(name: str, data: bytes) -> None:
        files[name] = data
        (tmp_path / "f").write_bytes(data)
        _mtools("mcopy", "-i", str(image), str(tmp_path / "f"), f"::/{name}")

    for n in range(6):  # small files of 1 to 3 clusters
        copy(f"DICOM/SMALL{n}", os.urandom(cluster * (1 + n % 3) - 7))
    copy("DICOM/EMPTY", b"")
    # The rest of the stick filled (one run; its folder may take a cluster more), then every
    # other small file deleted: the holes they leave (1, 3 and 2 clusters) are the free space.
    free = int(re.search(r"([\d ]+) bytes free", _mtools("mdir", "-i", str(image), "::").decode())[1].replace(" ", ""))
    copy("DICOM/FILLER", os.urandom(free - cluster))
    for n in (0, 2, 4):
        _mtools("mdel", "-i", str(image), f"::/DICOM/SMALL{n}")
        del files[f"DICOM/SMALL{n}"]
    copy("DICOM/SPLIT", os.urandom(cluster * 6 - 5))  # into the holes
    fd = os.open(image, os.O_RDONLY)
    try:
        reader = usbtarget.FatReader(fd)
        assert _runs(reader, "DICOM/SPLIT") >= 3  # the holes (and what the folder left)
        assert _runs(reader, "DICOM/FILLER") == _runs(reader, "DICOM/SMALL1") == 1
        for name, data in files.items():
            assert bytes(reader.read(name)) == data, name
        assert _mtools("mtype", "-i", str(image), "::/DICOM/SPLIT") == files["DICOM/SPLIT"]
    finally:
        os.close(fd)


def test_a_folder_medium_reserves_empty_files_that_writes_fill_and_never_truncates_or_raises(tmp_path: Path) -> None:
    stick = tmp_path / "stick"
    stick.mkdir()
    medium = usbtarget.FolderMedium(stick)
    (stick / "DICOM" / "ST000001" / "SE000001").mkdir(parents=True)
    (stick / "DICOM" / "ST000001" / "SE000001" / "IM000001").write_bytes(b"old")  # a half-done export's file
    (stick / "DICOM" / "ST000001" / "SE000001" / "IM000003").mkdir()  # cannot be a file: left to write
    names = [f"DICOM/ST000001/SE00000{s}/IM00000{i}" for s in (1, 2) for i in (1, 2, 3)]
    medium.reserve(names)
    assert (stick / names[0]).read_bytes() == b"old"
    assert [(stick / n).stat().st_size for n in names if n != names[2]] == [3, 0, 0, 0, 0]
    assert (stick / names[2]).is_dir()
    medium.write(names[1], b"new")
    assert (stick / names[1]).read_bytes() == b"new"
    with pytest.raises(IsADirectoryError):
        medium.write(names[2], b"new")
    medium.close()


@pytest.mark.parametrize("direct", [True, False])
def test_a_folder_medium_reads_back_what_is_on_the_medium_whatever_its_size(tmp_path: Path, direct: bool) -> None:
    stick = tmp_path / "stick"
    stick.mkdir()
    medium = usbtarget.FolderMedium(stick, direct=direct)
    sizes = [0, 1, 4095, 4096, 4097, 3 * 4096, 70001]
    written = {f"DICOM/ST000001/SE000001/IM{n:06d}": os.urandom(size) for n, size in enumerate(sizes)}
    for name, data in written.items():
        medium.write(name, data)
    medium.flush()
    names = list(written)
    with open(stick / names[4], "r+b") as f:  # changed on the medium after it was written
        f.seek(4096)
        f.write(b"\0" if written[names[4]][4096] else b"\1")
    with open(stick / names[3], "ab") as f:  # longer than written
        f.write(b"x")
    back = [bytes(view) for view in medium.read_back(names)]
    assert back[4] != written[names[4]] and len(back[4]) == 4097
    assert back[3] == written[names[3]] + b"x"
    assert [b for n, b in enumerate(back) if n not in (3, 4)] == [d for n, d in enumerate(written.values()) if n not in (3, 4)]
    assert bytes(next(iter(medium.read_back(names[5:6])))) == written[names[5]]
    medium.close()
