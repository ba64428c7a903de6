"""Hostile peers at the byte level: fuzzed PDUs (each case replayable from its seed and
number) and C-STOREs of hostile values (UIDs with byte 0xFF or a newline, unknown VRs)."""

from __future__ import annotations

import random
import socket
import struct
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

from appliance.conformance import SOPClass, TransferSyntax
from bench.hostile.wire import (
    A_RELEASE_RQ,
    CLIENT_MAX_PDU,
    Target,
    associate,
    associate_rq,
    close_quietly,
    command_status,
    connect,
    echo_rq,
    p_data,
    read_answer,
    store_rq,
)

# -- fuzz ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FuzzCase:
    """Case ``number``: ``kind`` is what was mutated (rq: sent instead of an A-ASSOCIATE-RQ;
    pdata, release: sent inside an accepted association), ``how`` the mutations."""

    number: int
    kind: str
    how: str
    data: bytes


@dataclass(frozen=True)
class FuzzReport:
    """How many cases ran and the SCP's answers, by answer and by mutation."""

    cases: int
    answers: Counter[str]
    mutations: Counter[str]
    not_associated: int
    seconds: float


_STORAGE_CONTEXTS = [
    (SOPClass.VERIFICATION, [TransferSyntax.IMPLICIT_LE]),
    (SOPClass.CT_IMAGE, [TransferSyntax.EXPLICIT_LE, TransferSyntax.IMPLICIT_LE]),
    (SOPClass.RT_STRUCTURE_SET, [TransferSyntax.IMPLICIT_LE]),
]


def _mutate(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    b = bytearray(data) or bytearray(rng.randbytes(rng.randint(1, 64)))  # a second mutation may get b""
    how = rng.choice(["bitflip", "bitflip", "truncate", "pdu_length", "item_length", "pdu_type", "insert", "garbage"])
    if how == "bitflip":
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(len(b))
            b[pos] ^= 1 << rng.randrange(8)
    elif how == "truncate":
        b = b[: rng.randrange(len(b))]
    elif how == "pdu_length":
        lie = rng.choice([0, 1, len(b) - 7, len(b) + rng.randint(1, 4096), 0xFFFFFFFF, 1 << 20, rng.getrandbits(32)])
        b[2:6] = struct.pack(">L", max(0, lie) & 0xFFFFFFFF)
    elif how == "item_length":
        # a 2- or 4-byte length somewhere past the PDU header (item, sub-item or PDV lengths)
        if len(b) > 8:
            pos = rng.randrange(6, len(b) - 2)
            if rng.random() < 0.5 or pos + 4 > len(b):
                b[pos : pos + 2] = struct.pack(">H", rng.choice([0, 1, 0xFFFF, rng.getrandbits(16)]))
            else:
                b[pos : pos + 4] = struct.pack(">L", rng.choice([0, 2, 0xFFFFFFFF, rng.getrandbits(32)]))
    elif how == "pdu_type":
        b[0] = rng.randrange(256)
    elif how == "insert":
        pos = rng.randrange(len(b) + 1)
        if rng.random() < 0.5:
            b[pos:pos] = rng.randbytes(rng.randint(1, 64))
        else:  # repeat a slice (duplicate items)
            a = rng.randrange(len(b))
            b[pos:pos] = b[a : a + rng.randint(1, 80)]
    else:
        b = bytearray(rng.randbytes(rng.randint(0, 300)))
    return how, bytes(b)


def fuzz_cases(called: str, seed: int, first: int, n: int) -> Iterator[FuzzCase]:
    """Cases ``first`` .. ``first + n - 1`` of the run ``seed``; each depends on (seed,
    number) alone."""
    for number in range(first, first + n):
        rng = random.Random(f"{seed}:{number}")
        kind = rng.choices(["rq", "pdata", "release"], weights=[50, 35, 15])[0]
        if kind == "rq":
            base = associate_rq(called, rng.choice([None, _STORAGE_CONTEXTS]))
        elif kind == "pdata":
            if rng.random() < 0.5:
                base = p_data((1, 0x03, echo_rq(rng.randint(1, 65535))))
            else:
                uid = f"2.25.{rng.getrandbits(100)}".encode()
                base = p_data((3, 0x03, store_rq(SOPClass.CT_IMAGE, uid)), (3, 0x00, rng.randbytes(200)))
        else:
            base = A_RELEASE_RQ
        hows = []
        data = base
        for _ in range(1 if rng.random() < 0.8 else 2):
            how, data = _mutate(rng, data)
            hows.append(how)
        yield FuzzCase(number, kind, "+".join(hows), data)


def _run_case(target: Target, case: FuzzCase, read_timeout: float) -> tuple[str, bool]:
    """Send one case on its own connection; return (answer, associated first)."""
    sock: socket.socket | None = None
    try:
        if case.kind == "rq":
            sock = connect(target, 5.0)
        else:
            assoc = associate(target, _STORAGE_CONTEXTS)
            sock = assoc.sock
            if not assoc.accepted:
                return assoc.answer.kind, False
        try:
            sock.sendall(case.data)
        except OSError:
            return "reset", True
        return read_answer(sock, read_timeout, max_body=1 << 16).kind, True
    except OSError as exc:
        return f"connect failed ({exc.strerror})", False
    finally:
        if sock is not None:
            close_quietly(sock)


def fuzz(
    target: Target, seed: int, n: int, *, first: int = 0, workers: int = 4, read_timeout: float = 0.25
) -> FuzzReport:
    """Send cases ``first`` .. ``first + n - 1`` of the run ``seed``, ``workers`` at a time,
    each on its own connection, reading the answer for up to ``read_timeout`` s."""
    start = time.monotonic()
    cases = list(fuzz_cases(target.ae_title, seed, first, n))
    answers: Counter[str] = Counter()
    mutations: Counter[str] = Counter(c.how for c in cases)
    not_associated = 0
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fuzz") as pool:
        for answer, associated in pool.map(lambda c: _run_case(target, c, read_timeout), cases):
            answers[answer] += 1
            if not associated:
                not_associated += 1
    return FuzzReport(len(cases), answers, mutations, not_associated, time.monotonic() - start)


# -- hostile values -----------------------------------------------------------------------------


@dataclass(frozen=True)
class HostileResult:
    """One hostile C-STORE: the answer (``P-DATA-TF`` when a C-STORE-RSP came), its status."""

    label: str
    answer: str
    status: int | None
    seconds: float


def _ct_dataset(sop_instance_uid: str, seed: int):  # type: ignore[no-untyped-def]
    """A small generated CT image (16x16) with the given SOP Instance UID."""
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    rng = random.Random(seed)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = str(SOPClass.CT_IMAGE)
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyDate = "20260101"
    ds.Modality = "CT"
    ds.PatientName = "Hostile^Values"
    ds.PatientID = "HOSTILE-1"
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[f"hostile-study-{seed}"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[f"hostile-series-{seed}"])
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = [0.0, 0.0, 0.0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = 1.0
    ds.Rows, ds.Columns = 16, 16
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 0
    ds.PixelData = rng.randbytes(16 * 16 * 2)
    return ds


def _encode(ds, ts: str) -> bytes:  # type: ignore[no-untyped-def]
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buf = DicomBytesIO()
    buf.is_little_endian = True
    buf.is_implicit_VR = ts == TransferSyntax.IMPLICIT_LE
    write_dataset(buf, ds)
    return bytes(buf.getvalue())


def hostile_objects(seed: int = 0) -> list[tuple[str, str, bytes, bytes]]:
    """(label, transfer syntax, SOP Instance UID bytes, data set) of each hostile object:
    the UID with byte 0xFF and the UID ending in a newline are the same bytes in the
    command and the data set; the unknown-VR object carries private elements of VR ``LK``
    and ``TS`` (Explicit VR LE)."""
    from pydicom.uid import generate_uid

    out = []
    for label, last in (("uid-0xFF", b"\xff"), ("uid-newline", b"\n")):
        placeholder = str(generate_uid(entropy_srcs=[f"hostile-{label}-{seed}"]))
        if len(placeholder) % 2:
            placeholder = placeholder[:-1]
        uid = placeholder.encode()[:-1] + last  # same length: the encoded lengths stay right
        body = _encode(_ct_dataset(placeholder, seed), TransferSyntax.IMPLICIT_LE)
        assert body.count(placeholder.encode()) == 1
        out.append((label, str(TransferSyntax.IMPLICIT_LE), uid, body.replace(placeholder.encode(), uid)))
    from pydicom.dataset import Dataset

    uid_s = generate_uid(entropy_srcs=[f"hostile-vr-{seed}"])
    ds = _ct_dataset(uid_s, seed)
    low, high = Dataset(), Dataset()
    for elem in ds:
        (low if elem.tag < 0x00110000 else high).add(elem)
    private = (
        struct.pack("<HH", 0x0011, 0x0010) + b"LO" + struct.pack("<H", 8) + b"HOSTILE "
        + struct.pack("<HH", 0x0011, 0x1001) + b"LK" + struct.pack("<H", 4) + b"ABCD"
        + struct.pack("<HH", 0x0011, 0x1002) + b"TS" + struct.pack("<H", 4) + b"WXYZ"
    )
    body = _encode(low, TransferSyntax.EXPLICIT_LE) + private + _encode(high, TransferSyntax.EXPLICIT_LE)
    for label in ("vr-LK-TS", "vr-LK-TS-again"):
        out.append((label, str(TransferSyntax.EXPLICIT_LE), uid_s.encode(), body))
    return out


def hostile_store(target: Target, *, seed: int = 0, timeout: float = 10.0) -> list[HostileResult]:
    """Send each of :func:`hostile_objects` in a C-STORE on its own association and wait up
    to ``timeout`` s for the C-STORE-RSP."""
    results = []
    for label, ts, uid, body in hostile_objects(seed):
        start = time.monotonic()
        assoc = associate(target, [(SOPClass.CT_IMAGE, [ts])], timeout=timeout)
        sock = assoc.sock
        try:
            if not assoc.accepted or assoc.results.get(1) != 0:
                results.append(HostileResult(label, f"refused ({assoc.answer.kind})", None, time.monotonic() - start))
                continue
            fragment = min(CLIENT_MAX_PDU, (assoc.peer_max_pdu or CLIENT_MAX_PDU)) - 12
            sock.sendall(p_data((1, 0x03, store_rq(SOPClass.CT_IMAGE, uid))))
            for pos in range(0, len(body), fragment):
                last = pos + fragment >= len(body)
                sock.sendall(p_data((1, 0x02 if last else 0x00, body[pos : pos + fragment])))
            answer = read_answer(sock, timeout)
            status = None
            if answer.kind == "P-DATA-TF" and len(answer.body) > 6:
                status = command_status(answer.body[6:])
                try:
                    sock.sendall(A_RELEASE_RQ)
                    read_answer(sock, timeout)
                except OSError:
                    pass
            results.append(HostileResult(label, answer.kind, status, time.monotonic() - start))
        except OSError as exc:
            results.append(HostileResult(label, f"error ({exc.strerror})", None, time.monotonic() - start))
        finally:
            close_quietly(sock)
    return results

