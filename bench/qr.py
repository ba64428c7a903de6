"""Query/Retrieve benchmark (``scripts/bench-qr``): C-FIND latency over 10,000 studies, and
C-FIND and C-MOVE against DCMTK ``dcmqrscp`` serving the same files, as ratios.

What it measures
----------------
Generated once into a cache folder: ``--studies`` small studies (one 8x8 CT image each;
patient names from 997 surnames, IDs, study dates over 15 years, Implicit VR LE Part 10
files), and a CT series (``--slices`` of ``--size`` pixels, ``bench/series.py``) to move.

* ``ours, all``: ``appliance scp`` (the real program, Query/Retrieve on by default) holding
  every study and the CT, loaded with DCMTK ``storescu`` (it stores durably, so loading
  10,000 studies takes a minute or so; not measured).
* ``ours`` and ``dcmqrscp``: the same first ``--compare`` studies and the CT, in a second
  ``appliance scp`` and in ``dcmqrscp`` (registered with ``dcmqridx``; the files stay in the
  cache). dcmqrscp keeps at most 500 studies per storage area (DCMTK's DB_UpperMaxStudies; it
  deletes the oldest beyond), so it cannot be compared over 10,000: the default is 499
  studies and the CT.

C-FIND: each query (Study Root, STUDY level, asking for the patient's name and ID, the study
date and UID) is sent ``--repeat`` times over an association of our own making (plain
sockets, so that no client library's latency is in the figure), timed from the request to
the final response; the median is reported. The ratio is ours/dcmqrscp in time (below 1:
ours answers sooner).

C-MOVE: ``movescu`` moves the CT (STUDY level) to a DCMTK ``storescp``, ``--rounds`` times,
alternating which SCP goes first; timed from launching movescu to its exit (every object
stored by storescp and the final response received). The ratio is ours/dcmqrscp in images
per second (above 1: ours is faster). Our SCP sends the sub-operations through pynetdicom
(the client AE's association code), dcmqrscp through DCMTK.

Every DCMTK tool runs with ``TCP_NODELAY=1``. This is a benchmark, not a test: it asserts
nothing about speed. It exits 1 if a run failed (an SCP did not start, a query or a move
failed or answered the wrong number), 2 on a usage error, else 0.

Usage
-----
    scripts/bench-qr                                     # 10,000 studies, CT 100 x 512x512
    scripts/bench-qr --studies 600 --compare 50 --slices 10 --size 64 --repeat 3 --rounds 1
    scripts/bench-qr --json /tmp/qr.json                 # also the results as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID

from appliance.conformance import DEFAULT_SCP_AE_TITLE, SOPClass, TransferSyntax
from appliance.net.dimse import CommandField, Tag, decode_command, encode_command, uid, us
from bench import series as seriesgen
from bench.launch import REPO
from bench.scp.processes import DCMTK_ENV, LOOPBACK, ReceiverProcess, RunError, free_port, usage_error, with_log

DEST_AE = "BENCH_DEST"
DCMTK_AE = "BENCH_QRSCP"
#: dcmqrscp's most studies per storage area (DCMTK's DB_UpperMaxStudies).
DCMQRSCP_MAX_STUDIES = 500
#: Bump when the generated studies change, so that stale caches are not reused.
STUDIES_VERSION = 1
SEED = 7
#: The queries timed: a name, keys as findscu's -k would give them.
QUERIES: tuple[tuple[str, dict[str, str]], ...] = (
    ("patient name, wildcard", {"PatientName": "NAME042^*"}),
    ("study date, a week", {"StudyDate": "20150301-20150307"}),
    ("patient ID", {"PatientID": "BQ00042"}),
    ("every study", {}),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    default_cache = Path(os.environ.get("XDG_CACHE_HOME") or tempfile.gettempdir()) / "appliance-bench-qr"
    p = argparse.ArgumentParser(prog="bench-qr", description=__doc__.split("\n")[0])
    p.add_argument("--studies", metavar="N", type=int, default=10_000, help="studies for C-FIND (default 10000)")
    p.add_argument("--compare", metavar="N", type=int, default=DCMQRSCP_MAX_STUDIES - 1,
                   help=f"of them, in both SCPs (default {DCMQRSCP_MAX_STUDIES - 1}: dcmqrscp's limit with the CT)")
    p.add_argument("--slices", metavar="N", type=int, default=100, help="CT slices to move (default 100)")
    p.add_argument("--size", metavar="PIXELS", type=int, default=512, help="CT rows and columns (default 512)")
    p.add_argument("--repeat", metavar="N", type=int, default=15, help="times each query is sent (default 15)")
    p.add_argument("--rounds", metavar="N", type=int, default=3, help="moves per SCP (default 3)")
    p.add_argument("--timeout", metavar="SECONDS", type=float, default=600.0,
                   help="seconds allowed for loading or one move (default 600)")
    p.add_argument("--cache-dir", metavar="DIR", type=Path, default=default_cache,
                   help=f"generated studies and series (default {default_cache})")
    p.add_argument("--work-dir", metavar="DIR", type=Path,
                   help="where the SCPs write (default: a new folder under $TMPDIR)")
    p.add_argument("--json", metavar="FILE", type=Path, help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.studies < 1 or not 1 <= args.compare <= min(args.studies, DCMQRSCP_MAX_STUDIES - 1):
        usage_error(f"--studies must be at least 1, --compare 1 to --studies and at most "
                    f"{DCMQRSCP_MAX_STUDIES - 1} (dcmqrscp keeps {DCMQRSCP_MAX_STUDIES} studies with the CT)")
    if args.slices < 2 or args.size < 8 or args.repeat < 1 or args.rounds < 1:
        usage_error("--slices must be at least 2, --size 8, --repeat and --rounds 1")
    for what in ("cache_dir", "work_dir"):
        path = getattr(args, what)
        if path is not None:
            path = path.expanduser().resolve()
            if path == REPO or REPO in path.parents:
                usage_error(f"--{what.replace('_', '-')} {path} is inside the repository; choose a folder outside it")
            setattr(args, what, path)
    return args


def _tool(name: str) -> str:
    """The DCMTK build of ``name`` on PATH (pynetdicom installs look-alikes of some)."""
    for directory in os.get_exec_path():
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            try:
                r = subprocess.run([candidate, "--version"], capture_output=True, text=True, timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if "dcmtk" in r.stdout.lower():
                return candidate
    usage_error(f"DCMTK's {name} not found on PATH (apt-get install dcmtk)")


# -- the studies ------------------------------------------------------------------------------


def _uid(*parts: object) -> str:
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, '/'.join(['appliance bench-qr', *map(str, parts)])).int}"


def studies(cache_dir: Path, n: int) -> list[Path]:
    """``n`` one-image studies, generated once into ``cache_dir`` (a file per study)."""
    folder = cache_dir / f"studies-v{STUDIES_VERSION}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:05d}.dcm" for i in range(n)]
    missing = [i for i, p in enumerate(paths) if not p.exists()]
    if missing:
        print(f"generating {len(missing)} studies into {folder} ...", flush=True)
    rng = np.random.default_rng(SEED)
    pixels = rng.integers(-1000, 1000, size=(8, 8), dtype=np.int16).tobytes()
    for i in missing:
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = UID(SOPClass.CT_IMAGE)
        ds.SOPInstanceUID = _uid("instance", i)
        ds.StudyDate = f"{2010 + i % 15}{1 + i % 12:02d}{1 + i % 28:02d}"
        ds.StudyTime = f"{8 + i % 10:02d}{i % 60:02d}00"
        ds.AccessionNumber = f"ACC{i:06d}"
        ds.Modality = "CT"
        ds.Manufacturer = "appliance bench-qr"
        ds.PatientName = f"NAME{i % 997:03d}^GIVEN{i}"
        ds.PatientID = f"BQ{i:05d}"
        ds.StudyInstanceUID = _uid("study", i)
        ds.SeriesInstanceUID = _uid("series", i)
        ds.StudyID = str(i)
        ds.SeriesNumber = 1
        ds.InstanceNumber = 1
        ds.ImagePositionPatient = ["0", "0", "0"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.PixelSpacing = ["1", "1"]
        ds.SliceThickness = "1"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = 8
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = pixels
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = UID(TransferSyntax.IMPLICIT_LE)
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        tmp = paths[i].with_suffix(".tmp")
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, paths[i])
    return paths


# -- the SCPs ---------------------------------------------------------------------------------


@dataclass
class Scp:
    """A running Q/R SCP: its name in the report, AE title, port, process, and the storescp
    its moves go to."""

    name: str
    ae_title: str
    port: int
    process: ReceiverProcess
    dest: ReceiverProcess
    dest_folder: Path

    def stop(self) -> None:
        self.process.kill()
        self.dest.kill()


def _storescp(storescp: str, echoscu: str, folder: Path) -> tuple[ReceiverProcess, int]:
    port = free_port()
    folder.mkdir(parents=True)
    proc = ReceiverProcess([storescp, "-aet", DEST_AE, "-dhl", "-od", str(folder), str(port)],
                           folder.with_suffix(".log"), None, DCMTK_ENV)
    proc.wait_until_ready(echoscu, port, DEST_AE)
    return proc, port


def start_ours(name: str, folder: Path, files: list[Path], tools: dict[str, str], args: argparse.Namespace) -> Scp:
    """``appliance scp`` with a destination for the moves, loaded with ``files`` by storescu."""
    folder.mkdir(parents=True)
    dest, dest_port = _storescp(tools["storescp"], tools["echoscu"], folder / "dest")
    port = free_port()
    config = folder / "appliance.toml"
    config.write_text(f'[destinations.BENCH]\nae_title = "{DEST_AE}"\nhost = "{LOOPBACK}"\nport = {dest_port}\n')
    argv = [sys.executable, "-m", "appliance", "--config", str(config), "--data-dir", str(folder / "data"),
            "scp", "--bind", LOOPBACK, str(port)]
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    proc = ReceiverProcess(argv, folder / "scp.log", REPO, {**os.environ, "PYTHONPATH": path})
    scp = Scp(name, DEFAULT_SCP_AE_TITLE, port, proc, dest, folder / "dest")
    try:
        proc.wait_until_ready(tools["echoscu"], port, DEFAULT_SCP_AE_TITLE)
        parts = [files[i::4] for i in range(4)]
        procs = [subprocess.Popen([tools["storescu"], "-xi", "-aec", DEFAULT_SCP_AE_TITLE, LOOPBACK, str(port),
                                   *map(str, part)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  env=DCMTK_ENV) for part in parts if part]
        for p in procs:
            _, err = p.communicate(timeout=args.timeout)
            if p.returncode != 0:
                raise RunError(f"loading {name}: storescu exited with status {p.returncode}: "
                               f"{err.decode(errors='replace')[-500:]}")
    except BaseException:
        scp.stop()
        raise
    return scp


def start_dcmqrscp(folder: Path, files: list[Path], tools: dict[str, str]) -> Scp:
    """``dcmqrscp`` with ``files`` registered by ``dcmqridx`` and a storescp to move to."""
    folder.mkdir(parents=True)
    dest, dest_port = _storescp(tools["storescp"], tools["echoscu"], folder / "dest")
    db = folder / "db"
    db.mkdir()
    port = free_port()
    config = folder / "dcmqrscp.cfg"
    config.write_text(f"""NetworkTCPPort  = {port}
MaxPDUSize      = 65536
MaxAssociations = 16
HostTable BEGIN
bench = ({DEST_AE}, {LOOPBACK}, {dest_port})
HostTable END
VendorTable BEGIN
VendorTable END
AETable BEGIN
{DCMTK_AE} {db} RW ({DCMQRSCP_MAX_STUDIES}, 1024mb) ANY
AETable END
""")
    for i in range(0, len(files), 1000):
        r = subprocess.run([tools["dcmqridx"], str(db), *map(str, files[i:i + 1000])], capture_output=True, text=True)
        if r.returncode != 0:
            raise RunError(f"dcmqridx exited with status {r.returncode}: {r.stderr[-500:]}")
    proc = ReceiverProcess([tools["dcmqrscp"], "-c", str(config)], folder / "dcmqrscp.log", folder, DCMTK_ENV)
    scp = Scp("dcmqrscp", DCMTK_AE, port, proc, dest, folder / "dest")
    try:
        proc.wait_until_ready(tools["echoscu"], port, DCMTK_AE)
    except BaseException:
        scp.stop()
        raise
    return scp


# -- C-FIND over an association of our own ----------------------------------------------------


def _associate_rq(called: str, abstract_syntax: str) -> bytes:
    """An A-ASSOCIATE-RQ proposing one context in Implicit VR LE (max PDU 64 KiB)."""
    from pynetdicom import build_context
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.transport import AddressInformation

    prim = A_ASSOCIATE()
    prim.application_context_name = "1.2.840.10008.3.1.1.1"
    prim.calling_ae_title = "BENCH_FIND"
    prim.called_ae_title = called
    prim.calling_presentation_address = AddressInformation(LOOPBACK, 1)
    prim.called_presentation_address = AddressInformation(LOOPBACK, 2)
    cx = build_context(abstract_syntax, [str(TransferSyntax.IMPLICIT_LE)])
    cx.context_id = 1
    prim.presentation_context_definition_list = [cx]
    ml = MaximumLengthNotification()
    ml.maximum_length_received = 65536
    prim.user_information = [ml]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    return bytes(pdu.encode())


def _pdu(s: socket.socket) -> tuple[int, bytes]:
    head = _exactly(s, 6)
    return head[0], _exactly(s, struct.unpack(">L", head[2:])[0])


def _exactly(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise RunError("the SCP closed the connection")
        buf += chunk
    return bytes(buf)


def _p_data(control: int, data: bytes) -> bytes:
    pdv = struct.pack(">LBB", len(data) + 2, 1, control) + data
    return struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv


def find(port: int, ae_title: str, keys: dict[str, str], repeat: int) -> tuple[list[float], int]:
    """Send one Study Root C-FIND ``repeat`` times over one association; return the
    milliseconds from each request to its final response, and the number of matches."""
    model = str(SOPClass.STUDY_ROOT_FIND)
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyDate = ""
    q.PatientName = ""
    q.PatientID = ""
    q.StudyInstanceUID = ""
    for k, v in keys.items():
        setattr(q, k, v)
    buf = DicomBytesIO()
    buf.is_implicit_VR, buf.is_little_endian = True, True
    write_dataset(buf, q)
    identifier = buf.getvalue()
    times, matches = [], -1
    with socket.create_connection((LOOPBACK, port), timeout=60) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(_associate_rq(ae_title, model))
        if _pdu(s)[0] != 0x02:
            raise RunError(f"{ae_title} did not accept the C-FIND association")
        for n in range(repeat):
            command = encode_command([
                (Tag.AFFECTED_SOP_CLASS_UID, uid(model)), (Tag.COMMAND_FIELD, us(CommandField.C_FIND_RQ)),
                (Tag.MESSAGE_ID, us(n + 1)), (Tag.PRIORITY, us(0)), (Tag.COMMAND_DATA_SET_TYPE, us(0)),
            ])
            t0 = time.perf_counter()
            s.sendall(_p_data(0x03, command) + _p_data(0x02, identifier))
            pending = _answers(s)
            times.append((time.perf_counter() - t0) * 1000)
            if matches not in (-1, pending):
                raise RunError(f"{ae_title} answered {pending} matches, then {matches}")
            matches = pending
        s.sendall(bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0]))  # A-RELEASE-RQ
        _pdu(s)
    return times, matches


def _answers(s: socket.socket) -> int:
    """Read C-FIND responses up to the final one; return the number of Pending ones."""
    pending, command = 0, b""
    while True:
        kind, body = _pdu(s)
        if kind != 0x04:
            raise RunError(f"PDU type 0x{kind:02X} while reading C-FIND responses")
        pos = 0
        while pos < len(body):
            (length,) = struct.unpack_from(">L", body, pos)
            control, data = body[pos + 5], body[pos + 6 : pos + 4 + length]
            pos += 4 + length
            if not control & 0x01:
                continue
            command += data
            if control & 0x02:
                status = struct.unpack("<H", decode_command(command)[Tag.STATUS])[0]
                command = b""
                if status not in (0xFF00, 0xFF01):
                    if status != 0:
                        raise RunError(f"C-FIND ended with status 0x{status:04X}")
                    return pending
                pending += 1


# -- C-MOVE -----------------------------------------------------------------------------------


def move(scp: Scp, study_uid: str, count: int, movescu: str, log: Path, timeout: float) -> float:
    """Move a study to the SCP's storescp with movescu; return seconds until it exited."""
    for f in scp.dest_folder.iterdir():
        f.unlink()
    argv = [movescu, "-S", "-aec", scp.ae_title, "-aem", DEST_AE, "-to", "10", LOOPBACK, str(scp.port),
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}"]
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        try:
            r = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=DCMTK_ENV, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RunError(f"movescu to {scp.name} did not finish within {timeout:.0f} s") from None
        seconds = time.perf_counter() - t0
    arrived = len(list(scp.dest_folder.iterdir()))
    if r.returncode != 0 or arrived != count:
        raise RunError(with_log(f"the move from {scp.name} ended with status {r.returncode}, {arrived} of {count} "
                                "objects at storescp", log))
    return seconds


# -- the run ------------------------------------------------------------------------------------


@dataclass
class Results:
    """Medians in ms by query, per SCP, with the match counts; move seconds per SCP."""

    find_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    matches: dict[str, dict[str, int]] = field(default_factory=dict)
    move_s: dict[str, list[float]] = field(default_factory=dict)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tools = {name: _tool(name) for name in ("storescu", "storescp", "echoscu", "movescu", "dcmqrscp", "dcmqridx")}
    study_files = studies(args.cache_dir, args.studies)
    spec = seriesgen.SeriesSpec("CT", args.slices, args.size, SEED)
    ct = seriesgen.cached(args.cache_dir, spec) or seriesgen.generate(args.cache_dir, spec)
    from pydicom import dcmread

    ct_study = str(dcmread(ct.files[0], stop_before_pixels=True).StudyInstanceUID)
    print(f"bench-qr: C-FIND over {args.studies} studies (ours) and {args.compare} (ours and dcmqrscp, which keeps "
          f"{DCMQRSCP_MAX_STUDIES}); C-MOVE of {ct.describe()} to storescp; {args.repeat} queries, "
          f"{args.rounds} move(s) each", flush=True)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-qr-"))
    results = Results()
    scps: list[Scp] = []
    try:
        t0 = time.monotonic()
        all_of_them = start_ours("ours, all", work / "ours-all", study_files, tools, args)
        scps.append(all_of_them)
        print(f"loaded {args.studies} studies into appliance scp in {time.monotonic() - t0:.0f} s", flush=True)
        compared = study_files[: args.compare] + list(ct.files)
        ours = start_ours("ours", work / "ours", compared, tools, args)
        scps.append(ours)
        dcmtk = start_dcmqrscp(work / "dcmqrscp", compared, tools)
        scps.append(dcmtk)
        for scp in (all_of_them, ours, dcmtk):
            results.find_ms[scp.name], results.matches[scp.name] = {}, {}
            for what, keys in QUERIES:
                times, matches = find(scp.port, scp.ae_title, keys, args.repeat)
                results.find_ms[scp.name][what] = statistics.median(times)
                results.matches[scp.name][what] = matches
        for what, _ in QUERIES:
            if results.matches["ours"][what] != results.matches["dcmqrscp"][what]:
                raise RunError(f"'{what}': ours found {results.matches['ours'][what]}, dcmqrscp "
                               f"{results.matches['dcmqrscp'][what]}")
        for n in range(args.rounds):
            for scp in ((ours, dcmtk) if n % 2 == 0 else (dcmtk, ours)):
                seconds = move(scp, ct_study, len(ct.files), tools["movescu"], work / f"move-{scp.name}-{n + 1}.log",
                               args.timeout)
                results.move_s.setdefault(scp.name, []).append(seconds)
                print(f"move {n + 1}, {scp.name}: {seconds:.2f} s ({len(ct.files) / seconds:.0f} img/s)", flush=True)
    except RunError as exc:
        print(f"bench-qr: a run failed: {exc}", file=sys.stderr)
        print(f"bench-qr: its logs are in {work}", file=sys.stderr)
        return 1
    finally:
        for scp in scps:
            scp.stop()
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return _report(args, results, len(ct.files), ct.nbytes)


def _report(args: argparse.Namespace, r: Results, count: int, nbytes: int) -> int:
    print(f"\nC-FIND, request to final response, median of {args.repeat} (ms; matches in brackets):")
    head = f"{'query':24} {f'ours, {args.studies}':>16} {f'ours, {args.compare}':>14} " \
           f"{f'dcmqrscp, {args.compare}':>16} {'ours/dcmqrscp':>14}"
    print(head)
    ratios = {}
    for what, _ in QUERIES:
        ratios[what] = r.find_ms["ours"][what] / r.find_ms["dcmqrscp"][what]
        cells = [f"{r.find_ms[n][what]:.1f} [{r.matches[n][what]}]" for n in ("ours, all", "ours", "dcmqrscp")]
        print(f"{what:24} {cells[0]:>16} {cells[1]:>14} {cells[2]:>16} {ratios[what]:>14.2f}")
    speed = {n: count / statistics.median(s) for n, s in r.move_s.items()}
    move_ratio = speed["ours"] / speed["dcmqrscp"]
    print(f"\nC-MOVE of {count} CT images ({nbytes / 1e6:.0f} MB) to storescp, median of {args.rounds}: ours "
          f"{speed['ours']:.0f} img/s, dcmqrscp {speed['dcmqrscp']:.0f} img/s")
    print(f"ours/dcmqrscp: C-FIND time {statistics.median(ratios.values()):.2f} (median over the queries; below 1 "
          f"is faster), C-MOVE throughput {move_ratio:.2f} (above 1 is faster)")
    if args.json:
        args.json.write_text(json.dumps({
            "studies": args.studies, "compare": args.compare, "ct_images": count,
            "find_ms": r.find_ms, "matches": r.matches, "find_ratio": ratios,
            "move_seconds": r.move_s, "move_images_per_s": speed, "move_ratio": move_ratio,
        }, indent=2))
    return 0
