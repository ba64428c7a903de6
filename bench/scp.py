"""Throughput benchmark: our Storage SCP against DCMTK's ``storescp``.

What it measures
----------------
DCMTK ``storescu`` sends generated series over loopback (127.0.0.1, Implicit VR Little
Endian, the same max PDU everywhere) to two receivers in turn: ours (``appliance scp``)
and DCMTK ``storescp``. The series are a CT of 300 slices of 512x512 int16 and an MR of
200 slices of 256x256 uint16, generated once with pydicom into a cache directory
(``$XDG_CACHE_HOME`` or ``/tmp``, never the repository). For each series two cases run:

* ``x1``: one storescu sends the whole series over one association;
* ``xN``: the series is split into N contiguous parts (default 5, the appliance's
  association limit) sent by N storescu processes at once; storescp runs with ``--fork``.

Every run starts the receiver afresh on a new, empty output directory and a free port,
waits until it answers C-ECHO (``echoscu``), measures C-ECHO latency, times the storescu
process(es) from launch to exit, stops the receiver with SIGTERM and checks that it
stored exactly as many objects as were sent. DCMTK tools run with ``TCP_NODELAY=1``.
The receivers alternate run by run (and which goes first alternates too), so that drift
on the machine hits both alike; the file system is synced between runs so that one
run's write-back does not land in the next.

Reading the results
-------------------
``images/s`` and ``MB/s`` (10^6 bytes of Part 10 files sent) are medians over the
rounds, with min and max. The ratio ours/DCMTK is ours' median images/s over DCMTK's for
the same case: 1.00 is parity, 0.50 means ours takes twice as long to take the same
series, above 1 ours is faster. Both receivers get the same sender, data, PDU and disk,
but not the same work: storescp parses and writes each file, nothing more; ours
validates each object, writes it to a temporary file, fsyncs, renames and indexes it
before it answers. The ratio includes that price of a crash-safe store; that is the
point of measuring against the tool the vendor's own Storage Server was built on.

``peak RSS`` is VmHWM summed over the receiver's processes alive just before it is
stopped, the largest over the rounds. Ours is one process (our acceptor, a thread per association),
so that is its true peak; ``storescp --fork``'s per-association children have exited by
then, so DCMTK's xN figure is the listening parent's alone. ``CPU/img`` is the
user+system CPU time the receiver's process tree spent while storescu ran (reaped
children included) per image, median over rounds; it counts in 10 ms clock ticks, so it
means little for tiny series. ``echo`` is the median round trip of one C-ECHO over an
established association (``--echo-count`` per run), ``assoc`` the median time from
A-ASSOCIATE-RQ to -AC. Both are taken with a minimal raw-socket client
(``bench/echo.py``): pynetdicom's client polls and adds about 3 ms per message, which
would hide the receiver's own latency.

The floor (``--floor``)
----------------------
With one association storescu waits for each answer, so a receiver that answers only once
the object is durable cannot hide the commit behind anything. ``--floor`` measures the two
parts of that least time on the same machine and disk: a third receiver, the sink
(``bench/sink.py``: our acceptor, every data set dropped), gives the time of the sender,
loopback and our protocol code; bare durable commits of a file of the series' object size
(write it to a temp file, rename it into a folder, fsync the file and the folder) give the
cost of durability. Their sum is printed next to DCMTK's time per image and ours: when it is
above DCMTK's, parity over one association is out of reach on that machine for any
receiver that commits before it answers, however fast its code.

This is a benchmark, not a test: it asserts nothing about speed. It exits 1 if any run
failed (a receiver did not start or answer, storescu reported an error, or the number of
stored objects differs from the number sent), 2 on a usage error, else 0.

Usage
-----
It needs DCMTK (storescu, storescp, echoscu) and the project's Python (pydicom, numpy):
run ``scripts/setup-venv`` once; the script switches to ``.venv/bin/python`` by itself.

    scripts/bench-scp                                            # full size, 5 rounds (~1.5 min)
    scripts/bench-scp --ct-slices 30 --mr-slices 20 --rounds 1   # smoke check (~5 s)
    scripts/bench-scp --json /tmp/bench.json                     # also write the results as JSON
    scripts/bench-scp --floor     # also a sink and bare durable commits: what any durable receiver needs
    # another command as "ours", with placeholders {port} {data_dir} {aet} {pdu}
    # {max_associations} {storescp}; what it stores is counted with --ours-count
    # (a glob under {data_dir}, '**/*.dcm' by default with --ours-cmd):
    scripts/bench-scp --ours-cmd '{storescp} --fork -aet {aet} -pdu {pdu} -od {data_dir} -fe .dcm {port}'
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

REPO = Path(__file__).resolve().parent.parent

from appliance.conformance import CLIENT_AE_TITLE, DEFAULT_MAX_ASSOCIATIONS, DEFAULT_SCP_AE_TITLE
from bench import series as seriesgen
from bench.echo import EchoError, measure_echo

LOOPBACK = "127.0.0.1"
#: Environment of every DCMTK tool: DCMTK reads TCP_NODELAY from it. Without it, Nagle's
#: algorithm and delayed ACKs add ~40 ms to every small message.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
#: Our SCP, started the way the console script would, without needing it installed.
OURS_ARGV = (
    *(sys.executable, "-c", "from appliance.cli import main; raise SystemExit(main())"),
    *("--data-dir", "{data_dir}", "scp", "-aet", "{aet}", "-pdu", "{pdu}"),
    *("--max-associations", "{max_associations}", "--bind", LOOPBACK, "{port}"),
)
#: What ours stored, under its data directory (see appliance/store/store.py).
OURS_COUNT = "objects/**/*.dcm"
#: The sink (bench/sink.py): our acceptor, every data set dropped; it writes its count to
#: {data_dir}/received on SIGTERM.
SINK_ARGV = (
    *(sys.executable, "-m", "bench.sink", "--data-dir", "{data_dir}", "--aet", "{aet}", "--pdu", "{pdu}"),
    *("--max-associations", "{max_associations}", "--bind", LOOPBACK, "{port}"),
)
SINK_COUNT_FILE = "received"
#: Durable commits timed per series and round with --floor.
FLOOR_COMMITS = 50
STORESCP_ARGV = ("storescp", "-aet", "{aet}", "-pdu", "{pdu}", "-dhl", "-od", "{data_dir}", "{port}")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0


class RunError(Exception):
    """One run could not be completed or its result is wrong."""


def usage_error(message: str) -> NoReturn:
    """Stop with ``message`` and exit status 2, as argparse does."""
    print(f"bench-scp: {message}", file=sys.stderr)
    raise SystemExit(2)


@dataclass(frozen=True)
class Dcmtk:
    """Paths of the DCMTK tools used."""

    storescu: str
    storescp: str
    echoscu: str

    @classmethod
    def find(cls) -> Dcmtk:
        """The first DCMTK build of each tool on PATH.

        pynetdicom installs look-alike ``storescu``/``storescp``/``echoscu`` scripts (into a
        venv's bin, for one), so a name alone may not be DCMTK's: ask each for its version.
        """
        found, missing = {}, []
        for tool in ("storescu", "storescp", "echoscu"):
            for directory in os.get_exec_path():
                candidate = os.path.join(directory, tool)
                if not os.access(candidate, os.X_OK):
                    continue
                try:
                    version = subprocess.run([candidate, "--version"], capture_output=True, text=True, timeout=10)
                except (OSError, subprocess.TimeoutExpired):
                    continue
                if "dcmtk" in version.stdout.lower():
                    found[tool] = candidate
                    break
            else:
                missing.append(tool)
        if missing:
            usage_error(f"DCMTK's {', '.join(missing)} not found on PATH (apt-get install dcmtk)")
        return cls(**found)


# -- processes -------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _with_log(message: str, log: Path, lines: int = 8) -> str:
    """``message``, followed by the last ``lines`` of ``log`` if it has any."""
    try:
        tail = log.read_text(errors="replace").rstrip().splitlines()[-lines:]
    except OSError:
        tail = []
    return "\n".join([message] + ["    | " + line for line in tail])


def _process_tree(root: int) -> list[int]:
    """``root`` and its live (or zombie) descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def _tree_usage(root: int) -> tuple[int, float]:
    """Summed VmHWM (KiB) and CPU seconds (own + reaped children) of ``root``'s tree."""
    hwm_kib, ticks = 0, 0
    for pid in _process_tree(root):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                hwm_kib += int(line.split()[1])
    return hwm_kib, ticks / os.sysconf("SC_CLK_TCK")


@dataclass
class Stopped:
    """How a receiver ended, and its usage just before it was told to stop."""

    exit_status: int  # as subprocess reports it: negative for a signal
    peak_rss_kib: int
    cpu_s: float
    terminated: bool  # it was running and got SIGTERM (not: it had already exited)
    killed: bool  # it did not stop within STOP_TIMEOUT of SIGTERM


class ReceiverProcess:
    """A receiver running in its own session, with its output in ``log``."""

    def __init__(self, argv: list[str], log: Path, cwd: Path | None, env: dict[str, str]) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )

    def wait_until_ready(self, echoscu: str, port: int, aet: str) -> None:
        """Return once the receiver answers C-ECHO (DCMTK echoscu); raise if it never does."""
        deadline = time.monotonic() + START_TIMEOUT
        argv = [echoscu, "-aet", CLIENT_AE_TITLE, "-aec", aet, "-to", "2", "-ta", "2", "-td", "2", LOOPBACK, str(port)]
        while True:
            if self.proc.poll() is not None:
                raise RunError(
                    _with_log(f"exited with status {self.proc.returncode} before answering C-ECHO", self.log)
                )
            try:
                if subprocess.run(argv, env=DCMTK_ENV, capture_output=True, timeout=10).returncode == 0:
                    return
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                raise RunError(_with_log(f"did not answer C-ECHO within {START_TIMEOUT:.0f} s", self.log))
            time.sleep(0.05)

    def usage(self) -> tuple[int, float]:
        """Summed VmHWM (KiB) and CPU seconds so far of the receiver's process tree.

        Not ru_maxrss: a child forked from this (large) Python process inherits its
        high-water mark across exec, so wait4() would report ours, not the receiver's.
        """
        return _tree_usage(self.proc.pid)

    def stop(self) -> Stopped:
        """Take the usage, SIGTERM, wait (SIGKILL after STOP_TIMEOUT); report how it ended."""
        if self.proc.poll() is not None:
            return Stopped(self.proc.returncode, 0, 0.0, terminated=False, killed=False)
        hwm_kib, cpu_s = self.usage()
        self.proc.send_signal(signal.SIGTERM)
        killed = False
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            killed = True
            self._kill_group()
            self.proc.wait()
        self._kill_group()  # anything the receiver left behind
        return Stopped(self.proc.returncode, hwm_kib, cpu_s, terminated=True, killed=killed)

    def kill(self) -> None:
        """Make sure nothing of the receiver survives (for ``finally``)."""
        if self.proc.returncode is None:
            self._kill_group()
            self.proc.wait()
        self._kill_group()

    def _kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def send(storescu: str, parts: list[tuple[Path, ...]], port: int, args: argparse.Namespace, log_dir: Path) -> float:
    """Run one storescu per part, all at once; return the seconds until the last exits."""
    aet, pdu, timeout = args.aet, args.pdu, args.timeout
    argv = [
        storescu,
        *("-aet", CLIENT_AE_TITLE, "-aec", aet),
        *("-xi", "-R"),  # propose Implicit VR LE only, and only the SOP classes of the files
        *("-pdu", str(pdu)),
        *("-to", "10", "-ta", "30", "-ts", "60"),  # connection, ACSE and socket timeouts
        *(LOOPBACK, str(port)),
    ]
    log_paths = [log_dir / f"storescu-{i + 1}.log" for i in range(len(parts))]
    procs: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as logs:
        try:
            start = time.perf_counter()
            for files, log_path in zip(parts, log_paths, strict=True):
                log = logs.enter_context(open(log_path, "wb"))
                command = argv + [str(f) for f in files]
                procs.append(
                    subprocess.Popen(
                        command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=DCMTK_ENV
                    )
                )
            deadline = time.monotonic() + timeout
            for p in procs:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            elapsed = time.perf_counter() - start
        except subprocess.TimeoutExpired:
            raise RunError(f"storescu did not finish within {timeout:.0f} s") from None
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    for p, log_path in zip(procs, log_paths, strict=True):
        if p.returncode != 0:
            raise RunError(_with_log(f"{log_path.stem} of {len(procs)} exited with status {p.returncode}", log_path))
    return elapsed


# -- the benchmark ---------------------------------------------------------------------


@dataclass(frozen=True)
class Receiver:
    """One side of the comparison."""

    name: str
    single: tuple[str, ...]  # argv template, one association at a time
    parallel: tuple[str, ...]  # argv template, concurrent associations
    count_glob: str  # what it stored, under {data_dir}; or, if it starts with "=", a file there holding a count
    clean_exit: bool  # exit status 0 on SIGTERM is part of its contract
    cwd: Path | None = None
    env: dict[str, str] = field(default_factory=lambda: dict(DCMTK_ENV))


@dataclass(frozen=True)
class Case:
    series: seriesgen.Series
    associations: int

    @property
    def name(self) -> str:
        return f"{self.series.spec.modality} x{self.associations}"

    def parts(self) -> list[tuple[Path, ...]]:
        files, n = self.series.files, self.associations
        return [files[i * len(files) // n : (i + 1) * len(files) // n] for i in range(n)]


@dataclass
class Run:
    """One receiver taking one case once."""

    case: str
    receiver: str
    round: int
    images: int
    nbytes: int
    seconds: float | None = None
    stored: int | None = None
    assoc_ms: float | None = None
    echo_ms: list[float] = field(default_factory=list)
    peak_rss_kib: int | None = None
    cpu_s: float | None = None
    exit_status: int | None = None
    error: str | None = None
    warning: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.seconds is not None

    @property
    def images_per_s(self) -> float:
        assert self.seconds
        return self.images / self.seconds

    @property
    def mb_per_s(self) -> float:
        assert self.seconds
        return self.nbytes / 1e6 / self.seconds


def run_once(
    receiver: Receiver, case: Case, round_no: int, dcmtk: Dcmtk, args: argparse.Namespace, work_dir: Path
) -> Run:
    """Start ``receiver`` afresh, send ``case`` to it, stop it and check what it stored."""
    run = Run(case.name, receiver.name, round_no, len(case.series.files), case.series.nbytes)
    run_dir = Path(tempfile.mkdtemp(prefix=f"{receiver.name}-", dir=work_dir))
    data_dir = run_dir / "data"
    data_dir.mkdir()
    port = free_port()
    values = {
        "port": port,
        "data_dir": data_dir,
        "aet": args.aet,
        "pdu": args.pdu,
        "max_associations": max(DEFAULT_MAX_ASSOCIATIONS, args.parallel),
        "storescp": dcmtk.storescp,
    }
    template = receiver.parallel if case.associations > 1 else receiver.single
    argv = [part.format(**values) for part in template]
    try:
        process = ReceiverProcess(argv, run_dir / "receiver.log", receiver.cwd, receiver.env)
    except OSError as exc:
        shutil.rmtree(run_dir, ignore_errors=True)
        run.error = f"could not start {argv[0]}: {exc}"
        return run
    try:
        try:
            process.wait_until_ready(dcmtk.echoscu, port, args.aet)
            if args.echo_count:
                assoc, echoes = measure_echo(LOOPBACK, port, args.aet, args.echo_count)
                run.assoc_ms, run.echo_ms = assoc * 1e3, [e * 1e3 for e in echoes]
            cpu_before = process.usage()[1]
            run.seconds = send(dcmtk.storescu, case.parts(), port, args, run_dir)
        except (RunError, EchoError, OSError) as exc:
            run.error = str(exc)
        finally:
            stopped = process.stop()
        run.exit_status, run.peak_rss_kib = stopped.exit_status, stopped.peak_rss_kib
        if run.seconds is not None:
            run.cpu_s = stopped.cpu_s - cpu_before
        if stopped.killed:
            run.warning = f"did not stop within {STOP_TIMEOUT:.0f} s of SIGTERM; killed"
        elif receiver.clean_exit and stopped.terminated and stopped.exit_status != 0:
            run.warning = _with_log(f"exited with status {stopped.exit_status} on SIGTERM, expected 0", process.log)
        run.stored = _count(data_dir, receiver.count_glob)
        if run.error is None and run.stored != run.images:
            run.error = _with_log(f"stored {run.stored} objects, {run.images} were sent", process.log)
    finally:
        process.kill()
        if args.keep:
            print(f"  kept {run_dir}", file=sys.stderr)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
        os.sync()  # so that this run's write-back is not paid for by the next one
    return run


def _count(data_dir: Path, count_glob: str) -> int:
    """What a receiver stored: the files matching ``count_glob``, or the number written in
    the file ``count_glob[1:]`` if it starts with ``=`` (the sink, which stores nothing)."""
    if count_glob.startswith("="):
        try:
            return int((data_dir / count_glob[1:]).read_text())
        except (OSError, ValueError):
            return 0
    return sum(1 for p in data_dir.glob(count_glob) if p.is_file())


def commit_floor(work_dir: Path, size: int, count: int) -> list[float]:
    """Seconds each of ``count`` durable commits of a ``size``-byte file took in ``work_dir``:
    write it whole to a temp file, rename it into another directory, fsync the file and the
    directory. That is the least a receiver must do per object to answer success only once
    the object survives a power cut; it leaves out receiving, validating and indexing."""
    data = os.urandom(size)
    tmp, final = work_dir / "floor-tmp", work_dir / "floor-final"
    tmp.mkdir()
    final.mkdir()
    times = []
    dir_fd = os.open(final, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(count):
            start = time.perf_counter()
            fd = os.open(tmp / f"{i}.part", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                os.write(fd, data)
                os.rename(tmp / f"{i}.part", final / f"{i}.dcm")
                os.fsync(fd)
                os.fsync(dir_fd)
            finally:
                os.close(fd)
            times.append(time.perf_counter() - start)
    finally:
        os.close(dir_fd)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        os.sync()
    return times


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(runs: list[Run], cases: list[Case], receivers: list[Receiver]) -> list[dict[str, Any]]:
    """Per case and receiver: throughput, latency and resource figures over the good runs."""
    rows = []
    for case in cases:
        for receiver in receivers:
            mine = [r for r in runs if r.case == case.name and r.receiver == receiver.name]
            good = [r for r in mine if r.ok]
            row: dict[str, Any] = {"case": case.name, "receiver": receiver.name, "runs": len(mine), "ok": len(good)}
            if good:
                echoes = [e for r in good for e in r.echo_ms]
                assocs = [r.assoc_ms for r in good if r.assoc_ms is not None]
                row |= {
                    "images_per_s": _stats([r.images_per_s for r in good]),
                    "mb_per_s": _stats([r.mb_per_s for r in good]),
                    "seconds": _stats([r.seconds for r in good if r.seconds is not None]),
                    "peak_rss_mib": max((r.peak_rss_kib or 0) for r in good) / 1024,
                    "cpu_ms_per_image": statistics.median((r.cpu_s or 0.0) * 1e3 / r.images for r in good),
                    "echo_ms": statistics.median(echoes) if echoes else None,
                    "assoc_ms": statistics.median(assocs) if assocs else None,
                }
            rows.append(row)
    return rows


def ratios(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Ours' median images/s over DCMTK's, per case."""
    by_key = {(r["case"], r["receiver"]): r for r in rows}
    out: dict[str, float | None] = {}
    for case in dict.fromkeys(r["case"] for r in rows):
        ours, dcmtk = by_key.get((case, "ours"), {}), by_key.get((case, "dcmtk"), {})
        if "images_per_s" in ours and "images_per_s" in dcmtk:
            out[case] = ours["images_per_s"]["median"] / dcmtk["images_per_s"]["median"]
        else:
            out[case] = None
    return out


COLUMNS = (
    "case",
    "receiver",
    "ok",
    "images/s med [min..max]",
    "MB/s med [min..max]",
    "peak RSS",
    "CPU/img",
    "echo",
    "assoc",
)


def _cells(row: dict[str, Any]) -> list[str]:
    """One row of the table: the case, the receiver and its figures."""
    cells = [row["case"], row["receiver"], f"{row['ok']}/{row['runs']}"]
    if "images_per_s" not in row:
        return cells + ["-"] * (len(COLUMNS) - len(cells))

    def spread(s: dict[str, float]) -> str:
        return f"{s['median']:.1f} [{s['min']:.1f}..{s['max']:.1f}]"

    def ms(v: float | None, digits: int) -> str:
        return "-" if v is None else f"{v:.{digits}f} ms"

    return cells + [
        spread(row["images_per_s"]),
        spread(row["mb_per_s"]),
        f"{row['peak_rss_mib']:.0f} MiB",
        ms(row["cpu_ms_per_image"], 2),
        ms(row["echo_ms"], 3),
        ms(row["assoc_ms"], 2),
    ]


def print_report(rows: list[dict[str, Any]], case_ratios: dict[str, float | None], header: list[str]) -> None:
    """The header lines, the table, and the ratio of each case."""
    print()
    print("\n".join(header))
    print()
    table = [list(COLUMNS)] + [_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    for n, line in enumerate(table):
        # the names left-aligned, the figures right-aligned
        print("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths, strict=True))))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print()
    print("ours/DCMTK, median images/s (1.00 = parity, below 1 = ours slower):")
    for case, ratio in case_ratios.items():
        if ratio is None:
            print(f"  {case:8}  -     (no successful runs on one side)")
        else:
            print(f"  {case:8}  {ratio:.2f}  (ours takes {1 / ratio:.2f}x DCMTK's time)")


def print_floor(rows: list[dict[str, Any]], floors: dict[str, list[float]], series: list[seriesgen.Series]) -> None:
    """The least time per image a receiver that commits each object durably before it
    answers can take over one association, next to DCMTK's and ours.

    With one association storescu waits for each answer, so nothing overlaps the commit:
    such a receiver needs at least what the sink needs (sender, loopback, our protocol
    code) plus one durable commit of an object of that size."""
    by_key = {(r["case"], r["receiver"]): r for r in rows}

    def ms(case: str, receiver: str) -> float | None:
        row = by_key.get((case, receiver), {})
        return 1e3 / row["images_per_s"]["median"] if "images_per_s" in row else None

    print("\none association, ms per image (medians):")
    for s in series:
        case = f"{s.spec.modality} x1"
        dcmtk, ours, sink = ms(case, "dcmtk"), ms(case, "ours"), ms(case, "sink")
        commits = floors.get(s.spec.modality)
        if dcmtk is None or ours is None or sink is None or not commits:
            print(f"  {case:8}  -  (a run failed)")
            continue
        commit = statistics.median(commits) * 1e3
        least = sink + commit
        print(
            f"  {case:8}  DCMTK {dcmtk:.2f}; sink {sink:.2f} + durable commit of {s.nbytes // len(s.files) // 1000} kB "
            f"{commit:.2f} = at least {least:.2f} for a durable receiver (at best {dcmtk / least:.2f}x DCMTK); "
            f"ours {ours:.2f} ({dcmtk / ours:.2f}x)"
        )


def _outside_repo(path: Path, what: str) -> Path:
    path = path.expanduser().resolve()
    if path == REPO or REPO in path.parents:
        usage_error(f"the {what} {path} is inside the repository; choose a directory outside it")
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    default_cache = Path(os.environ.get("XDG_CACHE_HOME") or tempfile.gettempdir()) / "appliance-bench-scp"
    p = argparse.ArgumentParser(
        prog="bench-scp",
        description="Throughput of our Storage SCP against DCMTK storescp (see the module docstring).",
    )
    p.add_argument(
        "--ct-slices", metavar="N", type=int, default=300, help="CT slices, 512x512 (0 to skip CT; default 300)"
    )
    p.add_argument(
        "--mr-slices", metavar="N", type=int, default=200, help="MR slices, 256x256 (0 to skip MR; default 200)"
    )
    p.add_argument("--rounds", metavar="N", type=int, default=5, help="runs per receiver and case (default 5)")
    p.add_argument(
        "--parallel", metavar="N", type=int, default=5, help="associations in the parallel case (1: skip it; default 5)"
    )
    p.add_argument(
        "--pdu", metavar="BYTES", type=int, default=65536, help="max PDU for every receiver and sender (default 65536)"
    )
    p.add_argument("--aet", default=DEFAULT_SCP_AE_TITLE, help=f"called AE title (default {DEFAULT_SCP_AE_TITLE})")
    p.add_argument(
        "--echo-count", metavar="N", type=int, default=20, help="C-ECHOs timed per run (0 to skip; default 20)"
    )
    p.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        default=600.0,
        help="seconds allowed for one run's storescu (default 600)",
    )
    p.add_argument(
        "--cache-dir", metavar="DIR", type=Path, default=default_cache, help=f"generated data (default {default_cache})"
    )
    p.add_argument(
        "--work-dir", metavar="DIR", type=Path, help="where receivers write (default: a new directory under $TMPDIR)"
    )
    p.add_argument("--keep", action="store_true", help="keep each run's output directory and logs")
    p.add_argument(
        "--ours-cmd",
        metavar="CMD",
        help="command line for 'ours' instead of 'appliance scp', with placeholders "
        "{port} {data_dir} {aet} {pdu} {max_associations} {storescp}",
    )
    p.add_argument(
        "--ours-count",
        metavar="GLOB",
        help=f"glob under {{data_dir}} of what 'ours' stored (default {OURS_COUNT}, or '**/*.dcm' with --ours-cmd)",
    )
    p.add_argument(
        "--floor",
        action="store_true",
        help="also run a sink (our acceptor, storing nothing) and time bare durable commits, "
        "and print the least time per image a durable receiver can take here",
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON to FILE")
    args = p.parse_args(argv)
    if args.ct_slices < 0 or args.mr_slices < 0 or args.ct_slices + args.mr_slices == 0:
        p.error("--ct-slices and --mr-slices must not be negative, and not both 0")
    if args.rounds < 1 or args.parallel < 1 or args.echo_count < 0:
        p.error("--rounds and --parallel must be at least 1, --echo-count at least 0")
    if not 4096 <= args.pdu <= 131072:
        p.error("--pdu must be 4096..131072 (DCMTK's range)")
    if args.parallel > max(args.ct_slices, args.mr_slices):
        p.error("--parallel is larger than the series")
    return args


def load_series(args: argparse.Namespace) -> list[seriesgen.Series]:
    """The series to send, generated into the cache on first use, and read once so that
    no receiver pays for a cold page cache."""
    cache_dir = _outside_repo(args.cache_dir, "cache directory")
    specs = [
        seriesgen.SeriesSpec("CT", args.ct_slices, 512, seed=1),
        seriesgen.SeriesSpec("MR", args.mr_slices, 256, seed=2),
    ]
    loaded = []
    for spec in specs:
        if spec.slices == 0:
            continue
        series = seriesgen.cached(cache_dir, spec)
        if series is None:
            print(f"generating {spec.key} in {cache_dir} ...", file=sys.stderr, flush=True)
            series = seriesgen.generate(cache_dir, spec)
        for f in series.files:
            f.read_bytes()
        loaded.append(series)
    return loaded


def make_receivers(args: argparse.Namespace, dcmtk: Dcmtk) -> list[Receiver]:
    """Ours (``appliance scp``, or ``--ours-cmd``) and DCMTK storescp (``--fork`` when parallel)."""
    if args.ours_cmd:
        argv = tuple(shlex.split(args.ours_cmd))
        ours = Receiver("ours", argv, argv, args.ours_count or "**/*.dcm", clean_exit=True)
    else:
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        ours = Receiver(
            "ours",
            OURS_ARGV,
            OURS_ARGV,
            args.ours_count or OURS_COUNT,
            clean_exit=True,
            cwd=REPO,
            env={**DCMTK_ENV, "PYTHONPATH": path},
        )
    storescp = (dcmtk.storescp, *STORESCP_ARGV[1:])
    forking = (dcmtk.storescp, "--fork", *STORESCP_ARGV[1:])
    receivers = [ours, Receiver("dcmtk", storescp, forking, "*", clean_exit=False)]
    if args.floor:
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        receivers.append(
            Receiver(
                "sink",
                SINK_ARGV,
                SINK_ARGV,
                "=" + SINK_COUNT_FILE,
                clean_exit=True,
                cwd=REPO,
                env={**DCMTK_ENV, "PYTHONPATH": path},
            )
        )
    return receivers


def _show(argv: tuple[str, ...]) -> str:
    """A command line template, quoted only where a shell would need it (placeholders stay bare)."""
    return " ".join(shlex.quote(a) if " " in a or ";" in a else a for a in argv)


def report_problems(runs: list[Run]) -> None:
    """Print the warnings (grouped) and the failed runs."""
    warnings: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        if r.warning:
            warnings.setdefault((r.receiver, r.warning.splitlines()[0]), []).append(r)
    if warnings:
        print("\nwarnings:")
        for (receiver, first_line), which in warnings.items():
            print(f"  {receiver}: {first_line} ({len(which)} of {len(runs)} runs)")
            for line in (which[0].warning or "").splitlines()[1:]:
                print(line)
    failures = [r for r in runs if r.error]
    if failures:
        print(f"\nFAILED: {len(failures)} of {len(runs)} runs (left out of the figures above):")
        for r in failures:
            print(f"  round {r.round} {r.case} {r.receiver}: {r.error}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dcmtk = Dcmtk.find()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the finally blocks run
    series = load_series(args)
    cases = [Case(s, n) for s in series for n in dict.fromkeys((1, args.parallel))]
    receivers = make_receivers(args, dcmtk)

    work_parent = _outside_repo(args.work_dir, "work directory") if args.work_dir else None
    if work_parent:
        work_parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-scp-", dir=work_parent))
    runs: list[Run] = []
    floors: dict[str, list[float]] = {}
    total = args.rounds * len(cases) * len(receivers)
    try:
        for round_no in range(1, args.rounds + 1):
            for i, case in enumerate(cases):
                order = receivers if (round_no + i) % 2 else receivers[::-1]
                for receiver in order:
                    run = run_once(receiver, case, round_no, dcmtk, args, work)
                    runs.append(run)
                    outcome = (
                        f"{run.images_per_s:7.1f} images/s {run.mb_per_s:6.1f} MB/s ({run.seconds:.2f} s)"
                        if run.ok
                        else f"FAILED: {run.error}"
                    )
                    print(
                        f"[{len(runs):>3}/{total}] round {round_no} {case.name:6} {receiver.name:5}  {outcome}",
                        file=sys.stderr,
                        flush=True,
                    )
            if args.floor:
                for s in series:
                    floor_dir = Path(tempfile.mkdtemp(prefix="floor-", dir=work))
                    times = commit_floor(floor_dir, s.nbytes // len(s.files), FLOOR_COMMITS)
                    floors.setdefault(s.spec.modality, []).extend(times)
                    print(
                        f"        round {round_no} {s.spec.modality} durable commit: "
                        f"{statistics.median(times) * 1e3:.2f} ms median of {len(times)}",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = summarise(runs, cases, receivers)
    case_ratios = ratios(rows)
    ours, storescp = receivers[:2]
    header = [
        f"Storage SCP throughput: DCMTK storescu -> {LOOPBACK}, Implicit VR LE, max PDU {args.pdu}, "
        f"{args.rounds} round(s), {os.cpu_count()} CPU(s)",
        "series: " + "; ".join(s.describe() for s in series),
        "ours:   " + _show(ours.single),
        "dcmtk:  " + _show(storescp.single) + f"  (with --fork for x{args.parallel})",
    ]
    print_report(rows, case_ratios, header)
    if args.floor:
        print_floor(rows, floors, series)
    report_problems(runs)
    sys.stdout.flush()

    failed = sum(1 for r in runs if r.error)
    if args.json:
        result = {
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "cpus": os.cpu_count(),
            "dcmtk": asdict(dcmtk),
            "series": [
                {
                    "modality": s.spec.modality,
                    "slices": len(s.files),
                    "size": s.spec.size,
                    "bytes": s.nbytes,
                    "directory": str(s.files[0].parent),
                }
                for s in series
            ],
            "commands": {r.name: {"single": list(r.single), "parallel": list(r.parallel)} for r in receivers},
            "summary": rows,
            "ratios": case_ratios,
            "runs": [
                asdict(r) | ({"images_per_s": r.images_per_s, "mb_per_s": r.mb_per_s} if r.ok else {}) for r in runs
            ],
            "failed": failed,
            "durable_commit_ms": {k: [t * 1e3 for t in v] for k, v in floors.items()},
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"results written to {args.json}", file=sys.stderr)
    return 1 if failed else 0


