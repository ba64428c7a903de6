"""Forwarding benchmark (``scripts/bench-forward``): the box forwarding a CT to DCMTK
``storescp``, against DCMTK ``storescu`` sending the same files to ``storescp`` directly.

What it measures
----------------
A CT series (default 300 slices of 512x512 int16, Implicit VR LE Part 10 files) is generated
once into a cache folder (``bench/series.py``; a second series of the same size with other
UIDs serves the third case). Each round then runs, on loopback, every receiver fresh (a new
``storescp`` on a new output folder, a new ``appliance run`` on a new data folder, all in one
work folder on the same disk, synced before each case; run as root, that disk is a journaled
ext4 image made and mounted as the box's data partition, as ``scripts/bench-scp`` does,
``--fs root`` the file system of ``--work-dir``):

* ``direct``: ``storescu`` sends the series to ``storescp``; the time from launching storescu
  to its exit (every object acknowledged, so written by storescp). ``direct span``: the same
  run from the first to the last arrival (scaled from N - 1 intervals to N objects), the
  measure ``series`` takes: without storescu's start, association and release.
* ``forward``: ``storescu`` sends the series to the box (``appliance run``, the real program)
  as ``BENCH_LIVE``, which a ``[[forward]]`` rule sends on to another ``storescp`` object by
  object as it arrives; the time from launching storescu to the last object appearing in that
  storescp's folder. ``ingest`` is when storescu exited (the box had acknowledged everything).
* ``series``: the second series, sent as ``BENCH_SERIES``, which a rule with ``stable_after``
  forwards once the whole series is stored, in one association: the time from the first to
  the last object appearing at the destination (scaled from N - 1 intervals to N objects),
  i.e. the forwarder alone, not waiting on the box's own Storage SCP.

Images/s are objects over those times; the ratio ``forward/direct`` is the forward case's
images/s over the direct case's, per round, and its median is the figure issue 16 asks to
quote (at least 0.80). The forwarder alone is compared both with ``direct`` (as before) and,
like for like, with ``direct span``. The order of direct and forward alternates round by round. ``box CPU``
is the user+system time per object of the box's two processes during the forward case: the
supervisor (which runs the forwarder) and its Storage SCP child.

Latency: once, on a fresh box and ``storescp``, a pynetdicom client sends the first objects
of the series (``--latency-objects``) over one association as ``BENCH_LIVE``, one every
``--latency-gap`` ms (a scanner sending as it reconstructs), noting when each C-STORE response
comes back; the latency of an object is from that acknowledgement to its file appearing at the
destination. Arrivals are noted by polling the destination folders every 2 ms (so a time is at
most that late); pynetdicom notices a response up to a few ms late, which shortens a latency
by as much.

The destinations run ``storescp -aet BENCH_DEST -pdu PDU -dhl``; every DCMTK tool runs with
``TCP_NODELAY=1`` (see ``bench/scp/processes.py``); storescu proposes Implicit VR LE only,
with the same PDU. The box runs with its defaults apart from its port and loopback bind.

This is a benchmark, not a test: it asserts nothing about speed. It exits 1 if a run failed (a
receiver did not start, storescu failed, or not every object arrived once), 2 on a usage
error, else 0.

Usage
-----
    scripts/bench-forward                                  # 300 x 512x512, 3 rounds (~1 min)
    scripts/bench-forward --slices 20 --size 64 --rounds 1 --latency-objects 5   # smoke check
    scripts/bench-forward --json /tmp/forward.json         # also the results as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.conformance import DEFAULT_SCP_AE_TITLE, SOPClass, TransferSyntax
from bench import series as seriesgen
from bench.launch import REPO
from bench.scp.fs import FsUnavailable, WorkFs
from bench.scp.processes import (DCMTK_ENV, LOOPBACK, Dcmtk, ReceiverProcess, RunError, free_port, usage_error,
                                  wait_exactly, with_log)

DEST_AE = "BENCH_DEST"
#: The calling AE titles the box's two rules match: per object, and per stable series.
LIVE_AE = "BENCH_LIVE"
SERIES_AE = "BENCH_SERIES"
#: Seconds without a new object after which the series rule forwards a series.
STABLE_AFTER = 1.0
#: Seconds between two looks at a destination's folder.
ARRIVAL_POLL = 0.002
#: Seed of the throughput series (and of the latency objects); the series case uses the next.
SEED = 1


#: The sparse ext4 image's size: a round holds the series three times (storescp, the box,
#: the box's destination), and the latency run a part of it.
FS_SIZE_GB = 4


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    default_cache = Path(os.environ.get("XDG_CACHE_HOME") or tempfile.gettempdir()) / "appliance-bench-forward"
    p = argparse.ArgumentParser(prog="bench-forward", description=__doc__.split("\n")[0])
    p.add_argument("--slices", metavar="N", type=int, default=300, help="CT slices (default 300)")
    p.add_argument("--size", metavar="PIXELS", type=int, default=512, help="rows and columns (default 512)")
    p.add_argument("--rounds", metavar="N", type=int, default=3, help="rounds of every case (default 3)")
    p.add_argument("--latency-objects", metavar="N", type=int, default=50,
                   help="objects whose latency is measured (0: skip; default 50)")
    p.add_argument("--latency-gap", metavar="MS", type=float, default=100.0,
                   help="milliseconds between two of them (default 100)")
    p.add_argument("--pdu", metavar="BYTES", type=int, default=65536,
                   help="max PDU of storescu and of the destinations (default 65536)")
    p.add_argument("--timeout", metavar="SECONDS", type=float, default=600.0,
                   help="seconds allowed for one case (default 600)")
    p.add_argument("--cache-dir", metavar="DIR", type=Path, default=default_cache,
                   help=f"generated series (default {default_cache})")
    p.add_argument("--work-dir", metavar="DIR", type=Path,
                   help="where the ext4 image, or with --fs root the receivers' and boxes' folders, go "
                        "(default: $TMPDIR)")
    p.add_argument("--fs", choices=("ext4", "root"),
                   help="where receivers and boxes write: ext4, a journaled ext4 image made as the box's data "
                        "partition is, loop-mounted for the run (needs root), as scripts/bench-scp does; root, "
                        "the file system of --work-dir (default: ext4 when root and the mount works, else root)")
    p.add_argument("--json", metavar="FILE", type=Path, help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.slices < 2 or args.size < 8 or args.rounds < 1 or args.latency_objects < 0 or args.latency_gap < 0:
        usage_error("--slices must be at least 2, --size 8, --rounds 1; --latency-objects and --latency-gap "
                    "cannot be negative")
    args.latency_objects = min(args.latency_objects, args.slices)
    for what in ("cache_dir", "work_dir"):
        path = getattr(args, what)
        if path is not None:
            path = path.expanduser().resolve()
            if path == REPO or REPO in path.parents:
                usage_error(f"--{what.replace('_', '-')} {path} is inside the repository; choose a folder outside it")
            setattr(args, what, path)
    return args


# -- watching a destination -------------------------------------------------------------


class Arrivals:
    """Notes, from a thread, when each file first appears in ``folder`` (``time.perf_counter``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"arrivals-{folder.name}", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            now = time.perf_counter()
            with os.scandir(self.folder) as entries:
                for e in entries:
                    if e.name not in self.seen:
                        self.seen[e.name] = now
            self._stop.wait(ARRIVAL_POLL)

    def wait(self, count: int, timeout: float) -> list[float]:
        """Wait until ``count`` files have appeared; return their times, sorted."""
        deadline = time.monotonic() + timeout
        while len(self.seen) < count:
            if time.monotonic() > deadline:
                raise RunError(f"{len(self.seen)} of {count} objects arrived in {self.folder} within {timeout:.0f} s")
            time.sleep(ARRIVAL_POLL)
        return sorted(self.seen.values())

    def by_uid(self) -> dict[str, float]:
        """Arrival times by SOP Instance UID (storescp names a file MODALITY.UID)."""
        return {name.partition(".")[2]: t for name, t in self.seen.items()}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# -- the processes ------------------------------------------------------------------------


class Destination:
    """A fresh DCMTK storescp writing into ``folder``, its arrivals watched."""

    def __init__(self, dcmtk: Dcmtk, folder: Path, pdu: int) -> None:
        self.port = free_port()
        self.folder = folder
        folder.mkdir(parents=True)
        self.process = ReceiverProcess([dcmtk.storescp, "-aet", DEST_AE, "-pdu", str(pdu), "-dhl", "-od", str(folder),
                                        str(self.port)], folder.with_suffix(".log"), None, DCMTK_ENV)
        self.process.wait_until_ready(dcmtk.echoscu, self.port, DEST_AE)
        self.arrivals = Arrivals(folder)

    def stop(self) -> None:
        self.arrivals.stop()
        self.process.kill()


class Box:
    """``appliance run`` on a fresh data folder, forwarding ``LIVE_AE``'s objects to ``live``
    as they arrive and ``SERIES_AE``'s series to ``series`` once stable."""

    def __init__(self, dcmtk: Dcmtk, folder: Path, live: int, series: int) -> None:
        self.port = free_port()
        folder.mkdir(parents=True)
        config = folder / "appliance.toml"
        config.write_text(f"""[scp]
port = {self.port}
bind = "{LOOPBACK}"

[destinations.LIVE]
ae_title = "{DEST_AE}"
host = "{LOOPBACK}"
port = {live}

[destinations.SERIES]
ae_title = "{DEST_AE}"
host = "{LOOPBACK}"
port = {series}

[[forward]]
calling_ae = ["{LIVE_AE}"]
to = ["LIVE"]

[[forward]]
calling_ae = ["{SERIES_AE}"]
to = ["SERIES"]
stable_after = {STABLE_AFTER}
""")
        # Its sockets in a short path of their own (a Unix socket's path holds 107 bytes at most).
        self.runtime = Path(tempfile.mkdtemp(prefix="bench-forward-run-"))
        argv = [sys.executable, "-m", "appliance", "--config", str(config), "--data-dir", str(folder / "data"),
                "run", "--runtime-dir", str(self.runtime), "--no-media"]
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        try:
            self.process = ReceiverProcess(argv, folder / "appliance.log", REPO, {**os.environ, "PYTHONPATH": path})
            self.process.wait_until_ready(dcmtk.echoscu, self.port, DEFAULT_SCP_AE_TITLE)
        except BaseException:
            shutil.rmtree(self.runtime, ignore_errors=True)
            raise

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far of the supervisor (the forwarder's process) and of its children (the SCP)."""
        pid = self.process.proc.pid
        children = [int(c) for f in Path(f"/proc/{pid}/task").glob("*/children") for c in f.read_text().split()]
        return _cpu(pid), sum(_cpu(c) for c in children)

    def stop(self) -> None:
        stopped = self.process.stop()
        shutil.rmtree(self.runtime, ignore_errors=True)
        if stopped.killed or stopped.exit_status != 0:
            raise RunError(with_log(f"appliance run ended with status {stopped.exit_status}"
                                    + (" after SIGKILL" if stopped.killed else ""), self.process.log))


def _cpu(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def storescu(dcmtk: Dcmtk, files: tuple[Path, ...], port: int, called: str, calling: str, args: argparse.Namespace,
             log: Path) -> float:
    """Send ``files`` over one association; return perf_counter at launch (raise if it fails)."""
    argv = [dcmtk.storescu, "-aet", calling, "-aec", called, "-xi", "-R", "-pdu", str(args.pdu),
            "-to", "10", "-ta", "30", "-ts", "60", LOOPBACK, str(port), *map(str, files)]
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=DCMTK_ENV)
        if wait_exactly([proc], args.timeout):
            raise RunError(f"storescu did not finish within {args.timeout:.0f} s")
    if proc.returncode != 0:
        raise RunError(with_log(f"storescu exited with status {proc.returncode}", log))
    return start


# -- one round ------------------------------------------------------------------------------


@dataclass
class Round:
    direct_s: float = 0.0
    direct_span_s: float = 0.0  # first to last arrival
    forward_s: float = 0.0
    ingest_s: float = 0.0
    series_s: float = 0.0  # first to last arrival
    forwarder_cpu_ms: float = 0.0  # per object, forward case
    scp_cpu_ms: float = 0.0


def span(times: list[float]) -> float:
    """First to last arrival, scaled from ``count - 1`` intervals to ``count``. Arrivals are
    seen by polling, so a span shorter than one poll (a few small files) reads as one poll."""
    count = len(times)
    return max(times[-1] - times[0], ARRIVAL_POLL) * count / max(count - 1, 1)


def run_round(n: int, dcmtk: Dcmtk, live: seriesgen.Series, other: seriesgen.Series, work: Path,
              args: argparse.Namespace) -> Round:
    r = Round()
    count = len(live.files)
    for case in (("direct", "forward") if n % 2 == 0 else ("forward", "direct")):
        os.sync()
        if case == "direct":
            dest = Destination(dcmtk, work / "direct", args.pdu)
            try:
                start = storescu(dcmtk, live.files, dest.port, DEST_AE, "BENCH_SCU", args, work / "direct-scu.log")
                r.direct_s = time.perf_counter() - start
                r.direct_span_s = span(dest.arrivals.wait(count, 10))
            finally:
                dest.stop()
            continue
        dest = Destination(dcmtk, work / "forward", args.pdu)
        dest_series = Destination(dcmtk, work / "series", args.pdu)
        box = None
        try:
            box = Box(dcmtk, work / "box", dest.port, dest_series.port)
            cpu0 = box.cpu()
            start = storescu(dcmtk, live.files, box.port, DEFAULT_SCP_AE_TITLE, LIVE_AE, args, work / "forward-scu.log")
            r.ingest_s = time.perf_counter() - start
            r.forward_s = dest.arrivals.wait(count, args.timeout)[-1] - start
            cpu1 = box.cpu()
            r.forwarder_cpu_ms = (cpu1[0] - cpu0[0]) / count * 1e3
            r.scp_cpu_ms = (cpu1[1] - cpu0[1]) / count * 1e3
            os.sync()
            storescu(dcmtk, other.files, box.port, DEFAULT_SCP_AE_TITLE, SERIES_AE, args, work / "series-scu.log")
            r.series_s = span(dest_series.arrivals.wait(count, args.timeout))
            if len(dest.arrivals.seen) != count or len(dest_series.arrivals.seen) != count:
                raise RunError("a destination received more objects than were sent")
        finally:
            if box is not None:
                box.stop()
            dest.stop()
            dest_series.stop()
    return r


def measure_latency(dcmtk: Dcmtk, live: seriesgen.Series, work: Path, args: argparse.Namespace) -> list[float]:
    """Milliseconds from each object's C-STORE response to its arrival at the destination."""
    from pydicom import dcmread
    from pynetdicom import AE, _config

    files = live.files[:args.latency_objects]
    uids = [str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    dest = Destination(dcmtk, work / "latency", args.pdu)
    box = None
    try:
        box = Box(dcmtk, work / "box", dest.port, free_port())
        _config.STORE_SEND_CHUNKED_DATASET = True  # send each file as it is, as storescu does
        ae = AE(ae_title=LIVE_AE)
        ae.add_requested_context(str(SOPClass.CT_IMAGE), [str(TransferSyntax.IMPLICIT_LE)])
        assoc = ae.associate(LOOPBACK, box.port, ae_title=DEFAULT_SCP_AE_TITLE, max_pdu=args.pdu)
        if not assoc.is_established:
            raise RunError("the latency client could not associate with the box")
        acked: dict[str, float] = {}
        try:
            for f, uid in zip(files, uids, strict=True):
                rsp = assoc.send_c_store(f)
                acked[uid] = time.perf_counter()
                if not rsp or rsp.get("Status", -1) != 0:
                    raise RunError(f"the box did not store {uid}: {rsp}")
                time.sleep(args.latency_gap / 1e3)  # pacing, not waiting on a condition
        finally:
            assoc.release()
        dest.arrivals.wait(len(files), args.timeout)
        arrived = dest.arrivals.by_uid()
        return [(arrived[u] - acked[u]) * 1e3 for u in uids]
    finally:
        if box is not None:
            box.stop()
        dest.stop()


# -- the report -----------------------------------------------------------------------------


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[18] if len(values) > 1 else values[0]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dcmtk = Dcmtk.find()
    specs = [seriesgen.SeriesSpec("CT", args.slices, args.size, seed) for seed in (SEED, SEED + 1)]
    made = []
    for spec in specs:
        series = seriesgen.cached(args.cache_dir, spec)
        if series is None:
            print(f"generating {spec.key} into {args.cache_dir} ...", flush=True)
            series = seriesgen.generate(args.cache_dir, spec)
        made.append(series)
    live, other = made
    mb = live.nbytes / 1e6
    print(f"bench-forward: {live.describe()}; {args.rounds} round(s); direct: storescu -> storescp; forward: "
          f"storescu -> appliance run -> storescp ([[forward]] per object); series: the box forwards a stored "
          f"series ([[forward]] stable_after = {STABLE_AFTER:g} s)", flush=True)
    work_fs = _work_fs(args)
    work_root = work_fs.path
    print(f"receivers and boxes write to: {work_fs.description}", flush=True)
    rounds: list[Round] = []
    latencies: list[float] = []
    try:
        for n in range(args.rounds):
            work = work_root / f"round{n + 1}"
            work.mkdir(parents=True)
            r = run_round(n, dcmtk, live, other, work, args)
            rounds.append(r)
            print(f"round {n + 1}: direct {r.direct_s:.2f} s ({len(live.files) / r.direct_s:.0f} img/s; span "
                  f"{r.direct_span_s:.2f} s), "
                  f"forward {r.forward_s:.2f} s ({len(live.files) / r.forward_s:.0f} img/s; ingest {r.ingest_s:.2f} s), "
                  f"series {r.series_s:.2f} s; box CPU/img: forwarder {r.forwarder_cpu_ms:.1f} ms, "
                  f"SCP {r.scp_cpu_ms:.1f} ms", flush=True)
            _remove(work)
        if args.latency_objects:
            work = work_root / "latency"
            work.mkdir(parents=True)
            latencies = measure_latency(dcmtk, live, work, args)
            _remove(work)
    except RunError as exc:
        print(f"bench-forward: a run failed: {exc}", file=sys.stderr)
        print(f"bench-forward: its logs are in {work_root}", file=sys.stderr)
        work_fs.close(keep=True)
        return 1
    except BaseException:
        work_fs.close()
        raise
    work_fs.close()
    return _report(args, live, mb, rounds, latencies)


def _work_fs(args: argparse.Namespace) -> WorkFs:
    """The journaled ext4 image (``--fs ext4``, or by default when it can be mounted), as
    the box's data partition is, or a folder on the file system of ``--work-dir``."""
    if args.work_dir:
        args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.fs != "root":
        try:
            return WorkFs.ext4(args.work_dir, FS_SIZE_GB)
        except FsUnavailable as exc:
            if args.fs == "ext4":
                usage_error(f"--fs ext4: {exc}")
            print(f"no ext4 image ({exc}); measuring on the root file system", file=sys.stderr, flush=True)
    return WorkFs.root(args.work_dir)


def _report(args: argparse.Namespace, live: seriesgen.Series, mb: float, rounds: list[Round],
            latencies: list[float]) -> int:
    count = len(live.files)
    med = statistics.median

    def row(name: str, seconds: list[float], note: str) -> dict[str, float]:
        rates = [count / s for s in seconds]
        print(f"{name:<8} {med(rates):7.1f} img/s {mb * med(rates) / count:7.1f} MB/s   "
              f"({min(rates):.1f} to {max(rates):.1f} img/s; {med(seconds):.2f} s)  {note}")
        return {"images_per_s": med(rates), "mb_per_s": mb * med(rates) / count, "seconds": med(seconds)}

    print(f"\nmedians of {len(rounds)} round(s), {count} objects, {mb:.1f} MB:")
    result: dict[str, Any] = {"objects": count, "mb": mb, "rounds": [r.__dict__ for r in rounds]}
    result["direct"] = row("direct", [r.direct_s for r in rounds], "storescu -> storescp")
    result["direct_span"] = row("span", [r.direct_span_s for r in rounds],
                                "the same, first to last arrival (series' measure)")
    result["forward"] = row("forward", [r.forward_s for r in rounds],
                            "storescu -> box -> storescp, to the last arrival")
    result["ingest"] = row("ingest", [r.ingest_s for r in rounds], "storescu -> box, acknowledged (same runs)")
    result["series"] = row("series", [r.series_s for r in rounds], "the forwarder alone: a stored series, "
                                                                    "first to last arrival")
    ratio = med([r.direct_s / r.forward_s for r in rounds])
    alone = med([r.direct_s / r.series_s for r in rounds])
    alone_span = med([r.direct_span_s / r.series_s for r in rounds])
    result["ratio_forward_direct"] = ratio
    result["ratio_series_direct"] = alone
    result["ratio_series_direct_span"] = alone_span
    result["box_cpu_ms_per_object"] = {"forwarder": med([r.forwarder_cpu_ms for r in rounds]),
                                       "scp": med([r.scp_cpu_ms for r in rounds])}
    print(f"box CPU per object (forward case): forwarder {result['box_cpu_ms_per_object']['forwarder']:.1f} ms, "
          f"Storage SCP {result['box_cpu_ms_per_object']['scp']:.1f} ms")
    print(f"forward/direct throughput: {ratio:.2f} (issue 16 asks for at least 0.80); "
          f"the forwarder alone (series/direct): {alone:.2f}, like for like (series/span): {alone_span:.2f}")
    if latencies:
        result["latency_ms"] = {"objects": len(latencies), "gap_ms": args.latency_gap, "median": med(latencies),
                                "p95": p95(latencies), "max": max(latencies), "all": latencies}
        print(f"latency, C-STORE acknowledged by the box -> arrived at storescp ({len(latencies)} objects, one every "
              f"{args.latency_gap:g} ms): median {med(latencies):.0f} ms, p95 {p95(latencies):.0f} ms, "
              f"max {max(latencies):.0f} ms")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def _remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
