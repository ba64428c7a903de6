"""``scripts/bench-scp``: its options, the series and receivers they choose, and ``main``,
which runs every round and prints the report (the module docstring of :mod:`bench.scp` says
what is measured and how to read it)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from appliance.conformance import DEFAULT_SCP_AE_TITLE
from bench import series as seriesgen
from bench.launch import REPO
from bench.scp.fs import DEFAULT_SIZE_GB, FsUnavailable, WorkFs
from bench.scp.processes import (
    DCMTK_ENV,
    FLOOR_COMMITS,
    LOOPBACK,
    OURS_ARGV,
    OURS_COUNT,
    SINK_ARGV,
    SINK_COUNT_FILE,
    STORESCP_ARGV,
    Dcmtk,
    build_fsync_on_close,
    kill_receivers,
    usage_error,
)
from bench.scp.report import (
    print_durable_dcmtk,
    print_floor,
    print_machine,
    print_report,
    ratios,
    report_problems,
    summarise,
)
from bench.scp.runs import DURABLE_DCMTK, Case, Receiver, Run, commit_floor, parallel_commit_floor, run_once


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
        "--work-dir", metavar="DIR", type=Path, help="where the ext4 image, or with --fs root the receivers' folder, goes (default: $TMPDIR)"
    )
    p.add_argument(
        "--fs",
        choices=("ext4", "root"),
        help="where receivers write: ext4, a journaled ext4 image made as the box's data partition is, "
        "loop-mounted for the run (needs root); root, the file system of --work-dir "
        "(default: ext4 when root and the mount works, else root)",
    )
    p.add_argument(
        "--fs-size",
        metavar="GB",
        type=int,
        default=DEFAULT_SIZE_GB,
        help=f"size of the sparse ext4 image (default {DEFAULT_SIZE_GB})",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep each run's output directory and logs (with --fs ext4: the unmounted image)",
    )
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
    p.add_argument(
        "--nagle",
        action="store_true",
        help="storescu sends with Nagle's algorithm on (no TCP_NODELAY in its environment), as many modalities "
        "do; by default it is off",
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON to FILE")
    args = p.parse_args(argv)
    if args.ct_slices < 0 or args.mr_slices < 0 or args.ct_slices + args.mr_slices == 0:
        p.error("--ct-slices and --mr-slices must not be negative, and not both 0")
    if args.rounds < 1 or args.parallel < 1 or args.echo_count < 0:
        p.error("--rounds and --parallel must be at least 1, --echo-count at least 0")
    if not 4096 <= args.pdu <= 131072:
        p.error("--pdu must be 4096..131072 (DCMTK's range)")
    if args.fs_size < 1:
        p.error("--fs-size must be at least 1")
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


def make_receivers(args: argparse.Namespace, dcmtk: Dcmtk) -> tuple[list[Receiver], str]:
    """Ours (``appliance scp``, or ``--ours-cmd``) and DCMTK storescp (``--fork`` when parallel);
    with --floor also the sink and the durable DCMTK (the same storescp with every file fsynced
    before it is closed), and a line saying how the durable DCMTK ran, or why it did not."""
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
    if not args.floor:
        return receivers, ""
    preload = build_fsync_on_close(_outside_repo(args.cache_dir, "cache directory"))
    if isinstance(preload, str):
        print(f"no durable DCMTK in this run: {preload}", file=sys.stderr, flush=True)
        return receivers, f"{DURABLE_DCMTK}: not run ({preload})"
    receivers.append(Receiver(DURABLE_DCMTK, storescp, forking, "*", clean_exit=False,
                              env={**DCMTK_ENV, "LD_PRELOAD": str(preload)}))
    return receivers, f"{DURABLE_DCMTK}: the same, with LD_PRELOAD={preload} (every file fsynced before it is closed)"


def _show(argv: tuple[str, ...]) -> str:
    """A command line template, quoted only where a shell would need it (placeholders stay bare)."""
    return " ".join(shlex.quote(a) if " " in a or ";" in a else a for a in argv)


def make_work_fs(args: argparse.Namespace, series: list[seriesgen.Series]) -> WorkFs:
    """The ext4 image (``--fs ext4``, or by default when it can be mounted) or a folder on
    the root file system (``--fs root``, or by default when the image cannot be had)."""
    work_parent = _outside_repo(args.work_dir, "work directory") if args.work_dir else None
    if work_parent:
        work_parent.mkdir(parents=True, exist_ok=True)
    if args.fs != "root":
        # one run at a time holds a series (each run's folder goes when it ends), the
        # floor's commits hold nothing; twice the largest series leaves room for the
        # journal and metadata. With --keep every run's folder stays.
        largest = max(s.nbytes for s in series)
        runs = args.rounds * 3 * 2 * len(series) if args.keep else 1
        needed = -(-2 * largest * runs // 10**9)
        if args.fs_size < needed:
            usage_error(f"--fs-size {args.fs_size} GB is too small for these series; give at least {needed}")
        try:
            return WorkFs.ext4(work_parent, args.fs_size)
        except FsUnavailable as exc:
            if args.fs == "ext4":
                usage_error(f"--fs ext4: {exc}")
            print(f"no ext4 image ({exc}); measuring on the root file system", file=sys.stderr, flush=True)
    return WorkFs.root(work_parent)


def _floors(s: seriesgen.Series, round_no: int, parallel: int, work: Path, floors: dict[str, list[float]],
            parallel_floors: dict[str, list[float]], commit_cpu: dict[str, list[float]]) -> None:
    """One round of --floor for the objects of ``s``: FLOOR_COMMITS durable commits one at a
    time (into ``floors``, their CPU into ``commit_cpu``) and, for ``parallel`` > 1, that many
    threads committing at once (into ``parallel_floors``); each figure is printed as it is
    measured."""
    size = s.nbytes // len(s.files)
    times = commit_floor(Path(tempfile.mkdtemp(prefix="floor-", dir=work)), size, FLOOR_COMMITS,
                         commit_cpu.setdefault(s.spec.modality, []))
    floors.setdefault(s.spec.modality, []).extend(times)
    lines = [f"durable commit: {statistics.median(times) * 1e3:.2f} ms median of {len(times)}"]
    if parallel > 1:
        folder = Path(tempfile.mkdtemp(prefix="floor-", dir=work))
        per = parallel_commit_floor(folder, size, FLOOR_COMMITS // 5, parallel)
        shutil.rmtree(folder, ignore_errors=True)
        parallel_floors.setdefault(s.spec.modality, []).append(per)
        lines.append(f"durable commits by {parallel} threads at once: {per * 1e3:.2f} ms per commit")
    for line in lines:
        print(f"        round {round_no} {s.spec.modality} {line}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dcmtk = Dcmtk.find()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the finally blocks run
    series = load_series(args)
    cases = [Case(s, n) for s in series for n in dict.fromkeys((1, args.parallel))]
    receivers, durable = make_receivers(args, dcmtk)

    runs: list[Run] = []
    floors: dict[str, list[float]] = {}
    parallel_floors: dict[str, list[float]] = {}
    commit_cpu: dict[str, list[float]] = {}
    total = args.rounds * len(cases) * len(receivers)
    width = max(len(r.name) for r in receivers)
    work_fs = make_work_fs(args, series)
    try:  # from here on the image is unmounted and removed however the run ends
        work = work_fs.path
        print(f"receivers write to: {work_fs.description}", file=sys.stderr, flush=True)
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
                        f"[{len(runs):>3}/{total}] round {round_no} {case.name:6} {receiver.name:{width}}  {outcome}",
                        file=sys.stderr,
                        flush=True,
                    )
            if args.floor:
                for s in series:
                    _floors(s, round_no, args.parallel, work, floors, parallel_floors, commit_cpu)
    except KeyboardInterrupt:
        print("bench-scp: interrupted", file=sys.stderr)
        return 130
    finally:
        kill_receivers()  # one being started when the run was interrupted
        work_fs.close(keep=args.keep)

    rows = summarise(runs, cases, receivers)
    case_ratios = ratios(rows)
    ours, storescp = receivers[:2]
    header = [
        f"Storage SCP throughput: DCMTK storescu -> {LOOPBACK}, Implicit VR LE, max PDU {args.pdu}, "
        f"{args.rounds} round(s), {os.cpu_count()} CPU(s), "
        + ("Nagle on at the sender (--nagle)" if args.nagle else "TCP_NODELAY at the sender"),
        "series: " + "; ".join(s.describe() for s in series),
        "ours:   " + _show(ours.single),
        "dcmtk:  " + _show(storescp.single) + f"  (with --fork for x{args.parallel})",
        *([durable] if durable else []),
        "written to: " + work_fs.description,
    ]
    print_report(rows, case_ratios, header)
    if args.floor:
        print_floor(rows, floors, series, parallel_floors)
        print_durable_dcmtk(rows)
    print_machine(rows, os.cpu_count() or 1, commit_cpu)
    report_problems(runs)
    sys.stdout.flush()

    failed = sum(1 for r in runs if r.error)
    if args.json:
        result = {
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "cpus": os.cpu_count(),
            "fs": {"kind": work_fs.kind, "description": work_fs.description},
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
            "commands": {r.name: {"single": list(r.single), "parallel": list(r.parallel)}
                         | ({"LD_PRELOAD": r.env["LD_PRELOAD"]} if "LD_PRELOAD" in r.env else {}) for r in receivers},
            "summary": rows,
            "ratios": case_ratios,
            "runs": [
                asdict(r) | ({"images_per_s": r.images_per_s, "mb_per_s": r.mb_per_s} if r.ok else {}) for r in runs
            ],
            "failed": failed,
            "durable_commit_ms": {k: [t * 1e3 for t in v] for k, v in floors.items()},
            "parallel_durable_commit_ms": {k: [t * 1e3 for t in v] for k, v in parallel_floors.items()},
            "durable_commit_cpu_ms": {k: [t * 1e3 for t in v] for k, v in commit_cpu.items()},
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"results written to {args.json}", file=sys.stderr)
    return 1 if failed else 0
