"""Where the forwarder's time goes (``python -m bench.forward_profile``): the forwarder alone,
in this process, sending a stored series from its queue to DCMTK ``storescp``.

A box (our Storage SCP and store, no forwarder running) takes the benchmark's cached CT
series (``scripts/bench-forward`` generates it) from ``storescu``, so that every object waits
in the queue; then a :class:`~appliance.jobs.forwarder.Forwarder` sends one batch of it to a
fresh ``storescp`` (as ``scripts/bench-forward`` runs it), timed, and with ``--profile N``
under cProfile (the N costliest functions by own time and by cumulative time). ``--direct``
also times ``storescu`` sending the same files to a fresh ``storescp``, alternated with the
forwarder, for a ratio on a busy machine. A benchmark aid: it asserts nothing.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from appliance import config
from appliance.config import ScpConfig, StoreConfig
from appliance.conformance import DEFAULT_SCP_AE_TITLE
from appliance.jobs.forwarder import BATCH_BYTES, BATCH_OBJECTS, Forwarder
from appliance.net.scp import StorageServer
from appliance.store.ingest import Ingest
from appliance.store.store import Store
from bench import series as seriesgen
from bench.forward import DEST_AE, SEED, Destination
from bench.scp.processes import DCMTK_ENV, LOOPBACK, Dcmtk, RunError


def _storescu(dcmtk: Dcmtk, files: tuple[Path, ...], port: int, called: str, calling: str, pdu: int) -> float:
    argv = [dcmtk.storescu, "-aet", calling, "-aec", called, "-xi", "-R", "-pdu", str(pdu), LOOPBACK, str(port),
            *map(str, files)]
    t0 = time.perf_counter()
    r = subprocess.run(argv, check=False, stdin=subprocess.DEVNULL, capture_output=True, env=DCMTK_ENV, timeout=600)
    if r.returncode != 0:
        raise RunError(f"storescu exited with status {r.returncode}: {r.stdout[-500:]!r}{r.stderr[-500:]!r}")
    return time.perf_counter() - t0


def _box(store: Store, dest: Destination) -> tuple[config.Config, StorageServer, int]:
    """``store`` opened as a box forwarding everything to ``dest``, with a Storage SCP on a
    free loopback port: the configuration, the started server and its port."""
    cfg = config.from_dict({"destinations": {"D": {"ae_title": DEST_AE, "host": LOOPBACK, "port": dest.port}},
                            "forward": [{"to": ["D"]}]})
    store.set_forwarding(cfg.forward)
    store.open_for_service()
    server = StorageServer(ScpConfig(bind=LOOPBACK, port=0), Ingest(store, StoreConfig(min_free_mb=0)))
    return cfg, server, server.start().port


def forward_once(dcmtk: Dcmtk, files: tuple[Path, ...], work: Path, pdu: int, profile: int) -> float:
    """Seconds from the first to the last arrival of the series forwarded from the queue."""
    dest = Destination(dcmtk, work / "dest", pdu)
    store = Store(work / "data")
    server = None
    try:
        cfg, server, port = _box(store, dest)
        _storescu(dcmtk, files, port, DEFAULT_SCP_AE_TITLE, "PROF", pdu)
        server.stop(grace=2)
        server = None
        os.sync()
        fwd = Forwarder(store, lambda: cfg)
        batch = store.index.forward_batch("D", time.time(), BATCH_OBJECTS, BATCH_BYTES)
        assert len(batch) == len(files), (len(batch), len(files))
        prof = cProfile.Profile() if profile else None
        if prof:
            prof.enable()
        cpu = time.thread_time()
        result = fwd.send_batch("D", batch)
        cpu = time.thread_time() - cpu
        if prof:
            prof.disable()
        print(f"forwarder CPU: {cpu / len(files) * 1e3:.3f} ms per object (its thread)")
        assert result.sent == len(files) and not result.error, result
        times = dest.arrivals.wait(len(files), 60)
        if prof:
            for key in ("tottime", "cumulative"):
                out = io.StringIO()
                pstats.Stats(prof, stream=out).sort_stats(key).print_stats(profile)
                print(out.getvalue())
        return (times[-1] - times[0]) * len(files) / (len(files) - 1)
    finally:
        if server is not None:
            server.stop(grace=2)
        store.close()
        dest.stop()


class _Profiled(Forwarder):
    """A Forwarder whose loop and sending threads each run under cProfile."""

    profiles: list[cProfile.Profile]

    def _loop(self) -> None:
        prof = cProfile.Profile()
        self.profiles.append(prof)
        prof.runcall(super()._loop)

    def _drain(self, name: str) -> None:
        prof = cProfile.Profile()
        self.profiles.append(prof)
        prof.runcall(super()._drain, name)


def live_once(dcmtk: Dcmtk, files: tuple[Path, ...], work: Path, pdu: int, profile: int) -> float:
    """The forwarder running (wake-up, linger) while storescu sends the series to the box's
    SCP in this process: seconds from launching storescu to the last arrival; the
    forwarder's threads profiled (CPU per object by function) with ``profile``."""
    dest = Destination(dcmtk, work / "dest", pdu)
    store = Store(work / "data")
    server = fwd = None
    try:
        cfg, server, port = _box(store, dest)
        fwd = _Profiled(store, lambda: cfg)
        fwd.profiles = []
        fwd.start()
        t0 = time.perf_counter()
        _storescu(dcmtk, files, port, DEFAULT_SCP_AE_TITLE, "PROF", pdu)
        times = dest.arrivals.wait(len(files), 120)
        fwd.stop()
        if profile:
            stats = pstats.Stats(fwd.profiles[0], stream=(out := io.StringIO()))
            for prof in fwd.profiles[1:]:
                stats.add(prof)
            stats.sort_stats("tottime").print_stats(profile)
            print(out.getvalue())
        return times[-1] - t0
    finally:
        if fwd is not None:
            fwd.stop()
        if server is not None:
            server.stop(grace=2)
        store.close()
        dest.stop()


def direct_once(dcmtk: Dcmtk, files: tuple[Path, ...], work: Path, pdu: int) -> float:
    dest = Destination(dcmtk, work / "direct", pdu)
    try:
        _storescu(dcmtk, files, dest.port, DEST_AE, "PROF", pdu)
        times = dest.arrivals.wait(len(files), 60)
        return (times[-1] - times[0]) * len(files) / (len(files) - 1)
    finally:
        dest.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.forward_profile", description=__doc__.split("\n")[0])
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--pdu", type=int, default=65536)
    p.add_argument("--profile", metavar="N", type=int, default=0, help="show the N costliest functions")
    p.add_argument("--direct", action="store_true", help="also time storescu -> storescp, alternated")
    p.add_argument("--live", action="store_true",
                   help="the forwarder running while the series arrives (its threads profiled), instead")
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "appliance-bench-forward")
    args = p.parse_args(argv)
    dcmtk = Dcmtk.find()
    spec = seriesgen.SeriesSpec("CT", args.slices, args.size, SEED)
    series = seriesgen.cached(args.cache_dir, spec) or seriesgen.generate(args.cache_dir, spec)
    files = series.files
    fw: list[float] = []
    di: list[float] = []
    if args.live:
        for _ in range(args.rounds):
            work = Path(tempfile.mkdtemp(prefix="forward-profile-"))
            try:
                seconds = live_once(dcmtk, files, work, args.pdu, args.profile)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            print(f"live: {len(files) / seconds:.0f} img/s end to end (load {os.getloadavg()[0]:.2f})", flush=True)
        return 0
    for n in range(args.rounds):
        work = Path(tempfile.mkdtemp(prefix="forward-profile-"))
        try:
            cases = ["forward", "direct"] if args.direct else ["forward"]
            for case in cases if n % 2 == 0 else cases[::-1]:
                os.sync()
                if case == "forward":
                    fw.append(forward_once(dcmtk, files, work, args.pdu, args.profile))
                else:
                    di.append(direct_once(dcmtk, files, work, args.pdu))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        line = f"round {n + 1}: forwarder {len(files) / fw[-1]:.0f} img/s"
        if di:
            line += f", direct {len(files) / di[-1]:.0f} img/s, ratio {di[-1] / fw[-1]:.2f}"
        print(line, f"(load {os.getloadavg()[0]:.2f})", flush=True)
    if di:
        ratios = [d / f for d, f in zip(di, fw, strict=True)]
        print(f"median: forwarder {len(files) / statistics.median(fw):.0f} img/s, direct "
              f"{len(files) / statistics.median(di):.0f} img/s, ratio {statistics.median(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
