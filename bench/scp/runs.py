"""One run of bench-scp: a receiver (ours, DCMTK's, the sink) started afresh, sent one case
(a series over one or N associations), stopped and checked; and the bare durable commits of
``--floor``."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from appliance.conformance import DEFAULT_MAX_ASSOCIATIONS
from bench import series as seriesgen
from bench.echo import EchoError, measure_echo
from bench.scp.processes import (
    DCMTK_ENV,
    LOOPBACK,
    STOP_TIMEOUT,
    Dcmtk,
    ReceiverProcess,
    RunError,
    children_cpu,
    free_port,
    machine_cpu,
    send,
    with_log,
)


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


#: The receiver name of DCMTK's storescp with every file it writes fsynced before it is
#: closed (bench/scp/fsync_on_close.c): a durable DCMTK, run with --floor.
DURABLE_DCMTK = "dcmtk+fsync"


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
    #: Journal commits of the file system written to while the series was sent (ext4 only).
    journal_commits: int | None = None
    #: CPU seconds of the storescu processes, and (busy, all) CPU seconds of the whole
    #: machine, while the series was sent.
    sender_cpu_s: float | None = None
    machine_busy_s: float | None = None
    machine_all_s: float | None = None
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
            commits_before = journal_commits(data_dir)
            senders_before, machine_before = children_cpu(), machine_cpu()
            run.seconds = send(dcmtk.storescu, case.parts(), port, args, run_dir)
            machine_after, senders_after = machine_cpu(), children_cpu()
            commits_after = journal_commits(data_dir)
            run.sender_cpu_s = senders_after - senders_before
            run.machine_busy_s = machine_after[0] - machine_before[0]
            run.machine_all_s = machine_after[1] - machine_before[1]
            if commits_before is not None and commits_after is not None:
                run.journal_commits = commits_after - commits_before
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
            run.warning = with_log(f"exited with status {stopped.exit_status} on SIGTERM, expected 0", process.log)
        run.stored = _count(data_dir, receiver.count_glob)
        if run.error is None and run.stored != run.images:
            run.error = with_log(f"stored {run.stored} objects, {run.images} were sent", process.log)
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


def journal_commits(path: Path) -> int | None:
    """How many transactions the ext4 journal of the file system holding ``path`` has
    committed so far (``/proc/fs/jbd2/<device>-8/info``), or None without one. Their count
    over a run says how many device flushes the receiver's commits took: fewer than one per
    image means concurrent commits shared them."""
    try:
        dev = os.stat(path).st_dev
        uevent = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/uevent").read_text()
        name = next(line.split("=", 1)[1] for line in uevent.splitlines() if line.startswith("DEVNAME="))
        first = Path(f"/proc/fs/jbd2/{name.replace('/', '!')}-8/info").read_text().split(None, 1)[0]
        return int(first)
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def parallel_commit_floor(work_dir: Path, size: int, count: int, threads: int) -> float:
    """Seconds per commit when ``threads`` threads each make ``count`` durable commits of a
    ``size``-byte file at once (as :func:`commit_floor` does one at a time): wall time over
    all commits. That is what the disk allows a durable receiver over that many associations,
    whatever its CPU; the threads' writes and fsyncs run outside the GIL."""
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(commit_floor, work_dir / f"t{i}", size, count) for i in range(threads)]
        for f in futures:
            f.result()
    return (time.perf_counter() - start) / (count * threads)


def commit_floor(work_dir: Path, size: int, count: int, cpu: list[float] | None = None) -> list[float]:
    """Seconds each of ``count`` durable commits of a ``size``-byte file took in ``work_dir``:
    write it whole to a temp file, rename it into another directory, fsync the file and the
    directory. That is the least a receiver must do per object to answer success only once
    the object survives a power cut; it leaves out receiving, validating and indexing.
    With ``cpu``, also append the CPU seconds each commit cost the committing thread."""
    data = os.urandom(size)
    tmp, final = work_dir / "floor-tmp", work_dir / "floor-final"
    tmp.mkdir(parents=True)
    final.mkdir()
    times = []
    dir_fd = os.open(final, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(count):
            start, cpu_start = time.perf_counter(), time.thread_time()
            fd = os.open(tmp / f"{i}.part", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                os.write(fd, data)
                os.rename(tmp / f"{i}.part", final / f"{i}.dcm")
                os.fsync(fd)
                os.fsync(dir_fd)
            finally:
                os.close(fd)
            times.append(time.perf_counter() - start)
            if cpu is not None:
                cpu.append(time.thread_time() - cpu_start)
    finally:
        os.close(dir_fd)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        os.sync()
    return times
