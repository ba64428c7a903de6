"""Test helpers: the shared sample corpus, generated series, waiting on conditions, DCMTK."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from appliance.conformance import SOPClass, TransferSyntax

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = Path(os.environ.get("APPLIANCE_SAMPLES", ROOT.parent / "shared" / "dicom-samples"))


@dataclass(frozen=True)
class Sample:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    modality: str
    expected: str
    roles: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.path.name


def samples() -> list[Sample]:
    """The shared corpus, from its manifest."""
    manifest = json.loads((SAMPLES / "manifest.json").read_text())
    return [
        Sample(
            SAMPLES / e["file"],
            e["sop_class_uid"],
            e["sop_instance_uid"],
            e["transfer_syntax"],
            e["modality"],
            e["expected"],
            tuple(e["roles"]),
        )
        for e in manifest
    ]


def sample(role: str) -> Sample:
    """The sample playing ``role`` in the manifest (e.g. 'ct_ele')."""
    for s in samples():
        if role in s.roles:
            return s
    raise KeyError(role)


@contextlib.contextmanager
def tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A real tmpfs mounted at ``where`` (created) with ``options`` ("size=8m,..."), lazily
    unmounted afterwards (a failed test may still hold files); skips the test without root
    or when the mount is refused."""
    import pytest

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def wait_for(condition: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> object:
    """Poll ``condition`` until it returns something truthy, or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def _ephemeral_ports() -> tuple[int, int]:
    """The kernel's range of local ports for outgoing connections (and for binding port 0)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a server started later (a process told it in
    its configuration). Picked at random below the kernel's ephemeral range: a port from that
    range (what binding port 0 gives) can meanwhile become the local port of any outgoing
    connection, such as a test's echoscu probes, and the server's bind then fails (seen in
    CI); below it only another pick or a listener can take it."""
    low = _ephemeral_ports()[0]
    picks = random.Random()  # not seeded: tests running at once must not pick alike
    for _ in range(100):
        port = picks.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # that range is full: whatever the kernel gives
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dcmtk(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise RuntimeError(f"DCMTK's {tool} is not installed; scripts/test installs Debian's dcmtk")
    return path


def run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def ct_series(
    n: int = 5,
    *,
    spacing: float = 2.0,
    thickness: float = 2.0,
    rows: int = 16,
    cols: int = 16,
    study_uid: str | None = None,
    patient: str = "Test^Volume",
) -> list[Dataset]:
    """A generated axial CT series of ``n`` slices (Explicit VR LE), evenly spaced."""
    study = study_uid or generate_uid()
    series = generate_uid()
    frame = generate_uid()
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = str(SOPClass.CT_IMAGE)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyDate = "20261128"
        ds.StudyTime = "101500"
        ds.Modality = "CT"
        ds.Manufacturer = "Test"
        ds.PatientName = patient
        ds.PatientID = "VOL-1"
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.SeriesNumber = 3
        ds.InstanceNumber = i + 1
        ds.FrameOfReferenceUID = frame
        ds.ImagePositionPatient = [-10.0, -10.0, i * spacing]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceThickness = thickness
        ds.SpacingBetweenSlices = spacing
        ds.SliceLocation = i * spacing
        ds.PixelSpacing = [0.5, 0.5]
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = rng.integers(-1000, 2000, size=(rows, cols), dtype=np.int16).tobytes()
        out.append(ds)
    return out


def write_series(datasets: list[Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        p = folder / f"slice{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def encode(ds: Dataset, ts: str = TransferSyntax.EXPLICIT_LE) -> bytes:
    """Encode ``ds`` (no file meta) as a data set body in transfer syntax ``ts``."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    syntax = TransferSyntax(ts)
    buf = DicomBytesIO()
    buf.is_implicit_VR = syntax.is_implicit_vr
    buf.is_little_endian = syntax.is_little_endian
    clean = Dataset()
    clean.update(ds)
    bits = ds.get("BitsAllocated", 8)
    if not syntax.is_little_endian and "PixelData" in ds and bits in (16, 32):
        # pydicom writes Pixel Data bytes as given (little-endian words here): hand it the
        # big-endian words, so that the object means the same pixels in every syntax.
        import numpy as np
        from pydicom.dataelem import DataElement

        width = bits // 8
        words = np.frombuffer(ds.PixelData, f"<u{width}").astype(f">u{width}").tobytes()
        clean[0x7FE00010] = DataElement(0x7FE00010, ds[0x7FE00010].VR, words)  # ds's own element stays
    write_dataset(buf, clean)
    return buf.getvalue()


# -- raw upper-layer PDUs (PS3.8 9.3), for tests that must misbehave as a client ----------


def associate_rq_pdu(called: str = "ELEKTA_STORAGE",
                     contexts: list[tuple[str, list[str]]] | None = None, calling: str = "RAW") -> bytes:
    """A real A-ASSOCIATE-RQ PDU (default: the Verification context in Implicit VR LE)."""
    from pynetdicom import build_context
    from pynetdicom._globals import APPLICATION_CONTEXT_NAME
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.transport import AddressInformation

    prim = A_ASSOCIATE()
    prim.application_context_name = APPLICATION_CONTEXT_NAME
    prim.calling_ae_title = calling
    prim.called_ae_title = called
    prim.calling_presentation_address = AddressInformation("127.0.0.1", 1)
    prim.called_presentation_address = AddressInformation("127.0.0.1", 2)
    cxs = []
    for i, (abstract, syntaxes) in enumerate(contexts or [(SOPClass.VERIFICATION, [TransferSyntax.IMPLICIT_LE])]):
        cx = build_context(abstract, syntaxes)
        cx.context_id = 2 * i + 1
        cxs.append(cx)
    prim.presentation_context_definition_list = cxs
    ml = MaximumLengthNotification()
    ml.maximum_length_received = 16384
    prim.user_information = [ml]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    return bytes(pdu.encode())


def p_data_pdu(cx_id: int, control: int, data: bytes) -> bytes:
    """A P-DATA-TF PDU with one PDV item (control: bit 0 command, bit 1 last fragment)."""
    import struct

    pdv = struct.pack(">LBB", len(data) + 2, cx_id, control) + data
    return struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """Read one PDU: (type, body); (0, b"") when the peer closed the connection."""
    import struct

    head = b""
    while len(head) < 6:
        chunk = sock.recv(6 - len(head))
        if not chunk:
            return 0, b""
        head += chunk
    (length,) = struct.unpack(">L", head[2:])
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            return 0, b""
        body += chunk
    return head[0], body
