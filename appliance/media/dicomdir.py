"""The DICOMDIR of a USB file-set (PS3.10 8.2, PS3.3 F.5), through pydicom's FileSet.

The only module that touches pydicom's FileSet internals: two private uses, each in one
small function, pinned by ``tests/test_dicomdir.py`` (byte for byte, with pydicom pinned at
3.0.2 in ``pyproject.toml``). ``FileSet.write()`` cannot serve: it copies every staged
instance itself (no temp name, no fsync) and, when adding to an existing set, copies every
existing file off the stick and back onto it; the exporter writes the files itself,
atomically, and asks this module only for the DICOMDIR's bytes.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filebase import DicomFileLike
from pydicom.fileset import FileSet

from appliance.errors import MediaError

#: The File-set ID of the sets we create (PS3.3 F.5: CS, at most 16 characters).
FILE_SET_ID = "APPLIANCE"


def load(root: Path) -> FileSet:
    """The file-set whose DICOMDIR is at ``root`` (a new empty one if there is none)."""
    path = root / "DICOMDIR"
    if not path.exists():
        fs = FileSet()
        fs.ID = FILE_SET_ID
        return fs
    try:
        return FileSet(path)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for a damaged DICOMDIR
        raise MediaError(f"the stick holds a DICOMDIR that cannot be read ({exc}); nothing was written. "
                         "Move it away or use another stick") from None


def add(fs: FileSet, record_source: Dataset, file_id: str) -> None:
    """Add the records of one instance (``record_source``: its header) to ``fs``, referring
    to the file ``file_id`` (``DICOM/ST.../SE.../IM...``) that the exporter writes itself.

    pydicom names staged files itself; the record's Referenced File ID is set on its
    private record so the DICOMDIR names our file."""
    fs.add(record_source).node._record.ReferencedFileID = file_id.split("/")  # noqa: SLF001


def encode(fs: FileSet) -> bytes:
    """The DICOMDIR of ``fs``, encoded with pydicom's own encoder (a private method: the
    public ``write()`` would also copy the files, see the module docstring)."""
    buf = BytesIO()
    fs._write_dicomdir(DicomFileLike(buf))  # noqa: SLF001
    return buf.getvalue()
