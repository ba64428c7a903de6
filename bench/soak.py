"""Soak run: our Storage SCP under sustained real senders and hostile peers at once.

What it does
------------
Starts ``appliance scp`` on a free loopback port with a data directory of its own
(``--data-dir``, else a temporary one, removed afterwards) under a descriptor limit
(``--fd-limit``, 1024 like systemd's default). Then, for ``--minutes`` M or until
``--associations`` N have been made:

* ``--parallel`` K loops each run DCMTK ``storescu`` once per association with one real
  object from the shared corpus (``../shared/dicom-samples``: a CT, an MR and an RT
  Structure Set in turn), rewritten with pydicom to a fresh SOP Instance UID (ten objects
  to a series), as scanners do;
* in the background, at a modest rate, the generators of ``bench/hostile/``: a connect
  flood (300 bare connects every 30 s), slow peers (2 trickling inside an association and 2
  trickling an A-ASSOCIATE-RQ, every 40 s), memory bombs (a 64 MiB never-ending command and
  50 headers announcing 1 MiB PDUs, every 60 s), fuzzing (batches of 50 mutated PDUs, seed
  fixed, continuously) and the hostile UIDs/VRs (every 60 s);
* the SCP's descriptors, threads and RSS are read from ``/proc`` every second.

At the end the generators stop, the SCP gets ``--settle`` s to close what they left, and a
C-ECHO and a C-STORE round trip are timed (DCMTK, process start included).

Reading the table
-----------------
``associations`` counts storescu runs and how they ended; ``refusals`` counts them by
answer (A-ASSOCIATE-RJ reasons, C-STORE failure statuses: a scanner refused while slow
peers hold the slots is the SCP keeping its limits, not a failure). ``start`` is sampled
after a warm-up of 5 associations per sender loop, ``peak`` over the run, ``end`` after
the settle. The index's connections are a pool (at most one per association slot, each
with 2 descriptors: the database and its WAL), so they are checked against that bound and
every other descriptor against the start. ``index vs files`` compares the
instance rows of ``index.sqlite`` with the ``.dcm`` files under ``objects/``, and checks
that every object acknowledged with Success is indexed.

It exits 1 if a check fails: the SCP died or logged a traceback, a storescu failed other
than by a refusal, descriptors (other than the index pool) or threads did not come back
within 3/1 of the start, the index pool is above its bound, RSS
not within max(8 MiB, 5 %), index != files or an acknowledged object is missing, or the
final C-ECHO or C-STORE took 1 s or more. 2 on a usage error, else 0.

Usage
-----
    scripts/soak --minutes 2                 # about 2.5 minutes in all
    scripts/soak --associations 500 --parallel 2
    scripts/soak --minutes 30 --data-dir /var/tmp/soak --keep
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent

import pydicom
from pydicom.uid import generate_uid

from appliance.store.index import Index
from bench import hostile

LOOPBACK = "127.0.0.1"
SAMPLES = Path(os.environ.get("APPLIANCE_SAMPLES", REPO.parent / "shared" / "dicom-samples"))
#: Samples sent in turn (manifest roles): a CT, an MR, an RT Structure Set.
ROLES = ("ct_ele", "mr_ele", "rtstruct_ile")
#: The SCP's [scp] settings: short enough that slow peers and floods are dealt with
#: within a run, room for the K senders beside the slow peers.
SCP_SETTINGS = {
    "acse_timeout": 5.0,
    "pdu_timeout": 10.0,
    "network_timeout": 30.0,
    "idle_timeout": 60.0,
    "max_pending_connections": 64,
}
FUZZ_SEED = 20260114
#: Associations per sender before ``start`` is sampled.
WARM_UP = 5
MiB = 1 << 20


def sample_paths() -> list[Path]:
    import json

    manifest = json.loads((SAMPLES / "manifest.json").read_text())
    by_role = {role: SAMPLES / e["file"] for e in manifest for role in e["roles"]}
    return [by_role[r] for r in ROLES]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@dataclass
class Tally:
    """What the senders and generators did; guarded by ``lock``."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    associations: int = 0
    stored: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    refusals: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    acknowledged: set[str] = field(default_factory=set)
    generators: Counter[str] = field(default_factory=Counter)


_REJECTED = re.compile(r"Association Rejected:?\s*\n?.*?Result:\s*(.+?)\n.*?Reason:\s*(.+?)\n", re.S)


class Senders:
    """K loops of storescu, one object per association."""

    def __init__(self, port: int, aet: str, folder: Path, tally: Tally, budget: int | None) -> None:
        self.port, self.aet, self.folder, self.tally, self.budget = port, aet, folder, tally, budget
        self.sources = [pydicom.dcmread(p) for p in sample_paths()]
        self._next = 0
        self._lock = threading.Lock()

    def take(self) -> int | None:
        with self._lock:
            if self.budget is not None and self._next >= self.budget:
                return None
            self._next += 1
            return self._next - 1

    def one(self, number: int) -> None:
        ds = self.sources[number % len(self.sources)]
        uid = generate_uid(entropy_srcs=["soak", str(number)])
        path = self.folder / f"{number}.dcm"
        with self._lock:
            ds.SOPInstanceUID = uid
            ds.file_meta.MediaStorageSOPInstanceUID = uid
            ds.SeriesInstanceUID = generate_uid(entropy_srcs=["soak series", str(number // 10)])
            ds.save_as(path, enforce_file_format=True)
        try:
            proc = subprocess.run(
                ["storescu", "-v", "-R", "-aet", "SOAK", "-aec", self.aet, "-to", "60", "-ta", "60", "-td", "60",
                 LOOPBACK, str(self.port), str(path)],
                capture_output=True, text=True, errors="replace", timeout=300, env={**os.environ, "TCP_NODELAY": "1"},
            )
            out = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired:
            out, proc = "storescu did not finish in 300 s", None
        finally:
            path.unlink(missing_ok=True)
        statuses = hostile.store_status(out)
        t = self.tally
        with t.lock:
            t.associations += 1
            if statuses == ["Success"]:
                t.stored += 1
                t.acknowledged.add(uid)
                t.outcomes["stored"] += 1
            elif m := _REJECTED.search(out):
                t.refusals[f"A-ASSOCIATE-RJ {m.group(1).strip()}, {m.group(2).strip()}"] += 1
                t.outcomes["refused"] += 1
            elif statuses:
                t.refusals[f"C-STORE {statuses[0]}"] += 1
                t.outcomes["refused"] += 1
            else:
                t.outcomes["failed"] += 1
                last = out.strip().splitlines()[-3:]
                t.failures.append(f"association {number}: {' | '.join(last)}")

    def loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            number = self.take()
            if number is None:
                return
            self.one(number)


#: Generators that raised (each is also printed): the run did not test all it claims.
GENERATOR_ERRORS: list[str] = []


def every(seconds: float, stop: threading.Event, what: Callable[[], None], first: float = 5.0) -> None:
    """Run ``what`` every ``seconds`` until ``stop`` (first after ``first`` s)."""
    if stop.wait(first):
        return
    while True:
        try:
            what()
        except Exception:  # noqa: BLE001 - a generator's bug must not end it silently
            import traceback

            print(f"soak: generator {threading.current_thread().name} failed:", file=sys.stderr)
            traceback.print_exc()
            GENERATOR_ERRORS.append(threading.current_thread().name)
        if stop.wait(seconds):
            return


def start_generators(target: hostile.Target, tally: Tally, stop: threading.Event) -> list[threading.Thread]:
    def count(key: str, n: int = 1) -> None:
        with tally.lock:
            tally.generators[key] += n

    def flood() -> None:
        r = hostile.connect_flood(target, 300, 150, hold=1.0)
        count("flood connects", r.opened)
        count("flood connects shed by the SCP", r.shed)

    def slow() -> None:
        out: list[hostile.SlowPeer] = []
        t = threading.Thread(target=lambda: out.extend(hostile.slow_peers(target, 2, "before", seconds=20)))
        t.start()
        out.extend(hostile.slow_peers(target, 2, "inside", seconds=25))
        t.join()
        for p in out:
            count(f"slow peers {p.mode}")
            if p.dropped_after is None:
                count(f"slow peers {p.mode}: never dropped")
            else:
                count(f"slow peers {p.mode}: dropped ({p.how}) after {p.dropped_after:.0f} s")

    def bombs() -> None:
        sent, ended = hostile.command_bomb(target, 64 * MiB)
        count("command bombs")
        count(f"command bombs ended by the SCP ({ended})" if ended else "command bombs taken whole")
        opened, dropped = hostile.header_bomb(target, 50)
        count("header bombs", opened)

    def values() -> None:
        for r in hostile.hostile_store(target, seed=14):
            count("hostile C-STOREs")
            count(f"hostile C-STOREs answered ({r.answer}, status {r.status if r.status is None else hex(r.status)})")

    first = [0]

    def fuzz_batch() -> None:
        r = hostile.fuzz(target, FUZZ_SEED, 50, first=first[0], workers=1)
        first[0] += 50
        count("fuzz cases", r.cases)

    threads = [
        threading.Thread(target=every, args=(30, stop, flood, 10), name="flood", daemon=True),
        threading.Thread(target=every, args=(40, stop, slow, 15), name="slow", daemon=True),
        threading.Thread(target=every, args=(60, stop, bombs, 20), name="bombs", daemon=True),
        threading.Thread(target=every, args=(60, stop, values, 25), name="values", daemon=True),
        threading.Thread(target=every, args=(2, stop, fuzz_batch, 5), name="fuzz", daemon=True),
    ]
    for t in threads:
        t.start()
    return threads


def others(files: Counter[str]) -> int:
    """Descriptors other than the index's (its connections are a pool, one per association
    slot at most, kept on purpose)."""
    return sum(v for k, v in files.items() if k != "index")


class Sampler:
    """The SCP's descriptors, threads and RSS, every second."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = hostile.proc_stats(pid)
        self.alive = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.sample()

    def sample(self) -> hostile.ProcStats | None:
        try:
            s = hostile.proc_stats(self.pid)
        except OSError:
            self.alive = False
            return None
        p = self.peak
        self.peak = hostile.ProcStats(max(p.fds, s.fds), max(p.threads, s.threads), max(p.rss, s.rss),
                                      max(p.hwm, s.hwm))
        return s

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="scripts/soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, help="run this long (default 2 unless --associations)")
    ap.add_argument("--associations", type=int, help="stop after this many storescu associations")
    ap.add_argument("--parallel", type=int, default=4, help="storescu loops at once (default 4)")
    ap.add_argument("--data-dir", type=Path, help="the SCP's data directory (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the data directory and the SCP's log")
    ap.add_argument("--fd-limit", type=int, default=1024, help="the SCP's RLIMIT_NOFILE (default 1024)")
    ap.add_argument("--max-associations", type=int, default=8,
                    help="the SCP's max_associations (default 8: K senders beside the slow peers)")
    ap.add_argument("--settle", type=float, default=40.0,
                    help="seconds the SCP gets after the run to close what the generators left (default 40)")
    ap.add_argument("--no-generators", action="store_true", help="only the storescu loops")
    args = ap.parse_args(argv)
    if args.minutes is None and args.associations is None:
        args.minutes = 2.0
    if (args.minutes is not None and args.minutes <= 0) or (args.associations is not None and args.associations < 1):
        ap.error("--minutes and --associations must be positive")
    for tool in ("storescu", "echoscu"):
        if shutil.which(tool) is None:
            ap.error(f"DCMTK's {tool} is not installed (Debian package dcmtk)")

    work = Path(tempfile.mkdtemp(prefix="soak-"))
    data = args.data_dir or work / "data"
    port = free_port()
    aet = "ELEKTA_STORAGE"
    config = work / "appliance.toml"
    settings = {**SCP_SETTINGS, "port": port, "max_associations": args.max_associations}
    config.write_text("[scp]\n" + "".join(f"{k} = {v!r}\n" for k, v in settings.items())
                      + "[store]\nmin_free_mb = 0\n")
    log_path = work / "scp.log"
    limit = args.fd_limit
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance", "--config", str(config), "--data-dir", str(data),
             "scp", "--bind", LOOPBACK, str(port)],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)),
        )
    try:
        deadline = time.monotonic() + 30
        while not hostile.echo_ok(LOOPBACK, port, aet).ok:
            if proc.poll() is not None or time.monotonic() > deadline:
                print(f"soak: the SCP did not start:\n{log_path.read_text(errors='replace')[-2000:]}", file=sys.stderr)
                return 1
            time.sleep(0.2)  # the SCP is starting
        tally = Tally()
        folder = work / "send"
        folder.mkdir()
        senders = Senders(port, aet, folder, tally, args.associations)
        # Warm up with K senders at once, so that what the SCP keeps on purpose (a pool of
        # index connections, one per association storing at once) is there at the start.
        def warm_up() -> None:
            for _ in range(WARM_UP):
                number = senders.take()
                if number is not None:
                    senders.one(number)

        warm = [threading.Thread(target=warm_up) for _ in range(args.parallel)]
        for t in warm:
            t.start()
        for t in warm:
            t.join()
        start_stats = hostile.proc_stats(proc.pid)
        start_files = hostile.open_files(proc.pid)
        sampler = Sampler(proc.pid)
        stop = threading.Event()
        started = time.monotonic()
        loops = [threading.Thread(target=senders.loop, args=(stop,), name=f"storescu-{i}", daemon=True)
                 for i in range(args.parallel)]
        for t in loops:
            t.start()
        gens = [] if args.no_generators else start_generators(hostile.Target(LOOPBACK, port, aet), tally, stop)
        end_at = started + args.minutes * 60 if args.minutes else None
        while any(t.is_alive() for t in loops) and (end_at is None or time.monotonic() < end_at):
            stop.wait(1.0)
            if proc.poll() is not None:
                break
        stop.set()
        for t in loops + gens:
            t.join(120)
        ran = time.monotonic() - started

        # Let the SCP close what the generators left, then measure.
        settle_until = time.monotonic() + args.settle
        end_stats = sampler.sample()
        def settled() -> bool:
            try:
                files = hostile.open_files(proc.pid)
            except OSError:
                return True  # gone: nothing to wait for
            return end_stats is None or (others(files) <= others(start_files) + 3
                                         and end_stats.threads <= start_stats.threads + 1)

        while end_stats is not None and time.monotonic() < settle_until and not settled():
            time.sleep(0.5)  # polling the SCP's descriptors
            end_stats = sampler.sample()
        sampler.stop()
        alive = proc.poll() is None
        end_files = hostile.open_files(proc.pid) if alive else Counter()
        echo = hostile.echo_ok(LOOPBACK, port, aet) if alive else hostile.RoundTrip(False, 0, "SCP dead")
        probe = hostile.fresh_copy(sample_paths()[0], work / "probe", 0, seed=int(time.time()))
        store = hostile.store_ok(LOOPBACK, port, aet, probe) if alive else hostile.RoundTrip(False, 0, "SCP dead")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    files = list((data / "objects").rglob("*.dcm"))
    index = Index(data / "index.sqlite")
    try:
        rows = index.counts()["instances"]
        missing = [uid for uid in tally.acknowledged if index.instance(uid) is None]
    finally:
        index.close()
    log_text = log_path.read_text(errors="replace")
    tracebacks = log_text.count("Traceback")

    s, p, e = start_stats, sampler.peak, end_stats or hostile.ProcStats(0, 0, 0, 0)
    rss_ok = end_stats is not None and e.rss <= s.rss + max(8 * MiB, s.rss // 20)
    checks = [
        ("SCP alive to the end", alive and sampler.alive, "" if alive else f"exit {proc.returncode}"),
        ("no traceback in the log", tracebacks == 0, f"{tracebacks} tracebacks"),
        ("no storescu failed (other than refusals)", not tally.failures, "; ".join(tally.failures[:3])),
        ("fds other than the index's back within 3 of start", end_stats is not None and others(end_files) <= others(
            start_files) + 3, f"{others(start_files)} -> {others(end_files)}"),
        ("index connections within the pool's bound (2 per association slot)",
         end_files["index"] <= 2 * args.max_associations + 3, f"{start_files['index']} -> {end_files['index']}"),
        ("threads back within 1 of start", end_stats is not None and e.threads <= s.threads + 1,
         f"{s.threads} -> {e.threads}"),
        ("RSS within max(8 MiB, 5 %) of start", rss_ok, f"{s.rss / MiB:.1f} -> {e.rss / MiB:.1f} MiB"),
        ("index rows == .dcm files", rows == len(files), f"{rows} rows, {len(files)} files"),
        ("every acknowledged object indexed", not missing, f"{len(missing)} missing"),
        ("C-ECHO at the end < 1 s", echo.ok, f"{echo.seconds * 1000:.0f} ms {'' if echo.ok else echo.detail}"),
        ("C-STORE at the end < 1 s", store.ok, f"{store.seconds * 1000:.0f} ms {'' if store.ok else store.detail}"),
        ("every generator ran to the end", not GENERATOR_ERRORS, ", ".join(GENERATOR_ERRORS)),
    ]

    print(f"soak: {ran / 60:.1f} min, {args.parallel} storescu loops, fd limit {limit}, "
          f"max_associations {args.max_associations}, generators {'off' if args.no_generators else 'on'}")
    print(f"  associations (storescu)   {tally.associations}  " + ", ".join(f"{k} {v}" for k, v in
                                                                        sorted(tally.outcomes.items())))
    print(f"  objects stored            {tally.stored} acknowledged; index {rows} rows, {len(files)} files "
          f"(hostile C-STOREs included)")
    print("  refusals                  " + (", ".join(f"{k}: {v}" for k, v in tally.refusals.most_common()) or "none"))
    for k, v in sorted(tally.generators.items()):
        print(f"  {k:<54} {v}")
    print(f"  {'':<10}{'start':>10}{'peak':>10}{'end':>10}")
    print(f"  {'fds':<10}{s.fds:>10}{p.fds:>10}{e.fds:>10}")
    print(f"  {'threads':<10}{s.threads:>10}{p.threads:>10}{e.threads:>10}")
    print(f"  {'RSS MiB':<10}{s.rss / MiB:>10.1f}{max(p.rss, p.hwm) / MiB:>10.1f}{e.rss / MiB:>10.1f}")
    print("  open files start: " + ", ".join(f"{k} {v}" for k, v in sorted(start_files.items()))
          + "; end: " + ", ".join(f"{k} {v}" for k, v in sorted(end_files.items())))
    print(f"  SCP log: {len(log_text) // 1024} KiB, {log_text.count(chr(10))} lines")
    for name, ok, detail in checks:
        print(f"  [{'ok' if ok else 'FAIL'}] {name}" + (f": {detail}" if detail else ""))
    if args.keep:
        print(f"  kept: {work} (data {data}, log {log_path})")
    else:
        shutil.rmtree(work, ignore_errors=True)  # the temp folder; a --data-dir is the caller's
    return 0 if all(ok for _, ok, _ in checks) else 1


