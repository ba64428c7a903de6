"""A send to a configured destination, run as a process of its own so that it outlives the
serial console that started it (``python -m appliance.jobs.sendjob``).

The console calls :func:`start`: it writes the job's status file, ``DATA_DIR/jobs/send-<time>.json``,
and starts this module detached (its own session; on a systemd box its own transient unit,
so the end of the console's getty service does not end the send), its output going to
``send-<time>.log`` beside it. The job plans and sends with :mod:`appliance.net.sender`
(:func:`~appliance.net.sender.plan_send`, :func:`~appliance.net.sender.send`: Tables 6-7,
Implicit VR LE only, 3D volumes only, one association at a time), rewrites the status file
(temp file, rename) as objects go, and at the end keeps the outcome as the last ``send``
result (:mod:`appliance.jobs.results`). Whoever wants to know how far it is reads the status
file (:func:`read`, :func:`current`); nothing talks to the process itself.
"""

from __future__ import annotations

import argparse
import enum
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any, Sequence

from appliance.jobs import results
from appliance.store.disk import process_running

log = logging.getLogger(__name__)

#: Where the jobs' status files and logs are, under the data folder.
JOBS_DIR = "jobs"
#: Finished jobs whose status file and log are kept (older ones are removed at the next start).
KEEP_JOBS = 20
#: Failed objects kept by name in the status file (the log has them all).
KEEP_FAILURES = 10
#: A job whose process has not written its status file this long after it was started did not start.
START_GRACE_S = 60.0
#: Where systemd keeps its runtime state: present when systemd is the init system.
SYSTEMD_RUNTIME = Path("/run/systemd/system")
#: What the job's command line names, so that a reused process ID is not taken for it.
MODULE = "appliance.jobs.sendjob"


class JobState(enum.StrEnum):
    """Where a send is."""

    STARTING = "starting"
    PLANNING = "planning"
    WAITING = "waiting"  # for another send (one association at a time)
    CONNECTING = "connecting"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"


FINISHED = frozenset({JobState.DONE, JobState.FAILED})


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class SendStatus:
    """What a status file says of one send."""

    #: The destination's name in the config file.
    to: str
    state: JobState
    started_at: str = field(default_factory=_now)
    #: The destination as "AE@host:port" (once the config was read).
    peer: str = ""
    #: The job's own process (None until it has written the file).
    pid: int | None = None
    done: int = 0
    total: int = 0
    failed: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    seconds: float = 0.0
    #: The requests the plan refuses, with why ("series 1.2.3: is not a 3D volume (...)").
    refused: tuple[str, ...] = ()
    #: The first objects the peer did not store, one line each (status and Error Comment).
    failures: tuple[str, ...] = ()
    #: None while it runs; then whether the peer stored every object of the plan.
    ok: bool | None = None
    #: The outcome in words, once finished.
    result: str = ""
    #: The sender's summary, once finished (may be two lines).
    summary: str = ""
    log: str = ""

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    @property
    def mb_per_s(self) -> float:
        return self.bytes_done / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def progress(self) -> str:
        """``12 of 40 objects sent, 3.1 of 10.4 MB, 2.0 MB/s`` (and how many failed, if any)."""
        text = (f"{self.done} of {self.total} object(s) sent, {self.bytes_done / 1e6:.1f} of "
                f"{self.bytes_total / 1e6:.1f} MB, {self.mb_per_s:.1f} MB/s")
        return text + (f", {self.failed} failed" if self.failed else "")

    def line(self) -> str:
        """The job in one line, as the Status page shows it."""
        where = f"{self.to}" + (f" ({self.peer})" if self.peer else "")
        if self.state is JobState.SENDING:
            return (f"sending {self.done} of {self.total} to {where}: {self.bytes_done / 1e6:.1f} of "
                    f"{self.bytes_total / 1e6:.1f} MB, {self.mb_per_s:.1f} MB/s"
                    + (f", {self.failed} failed" if self.failed else ""))
        if self.state is JobState.WAITING:
            return f"waiting to send {self.total} object(s) to {where}: another send is running"
        if self.state is JobState.CONNECTING:
            return f"connecting to {where} to send {self.total} object(s)"
        if self.state in (JobState.STARTING, JobState.PLANNING):
            return f"preparing a send to {where}"
        return f"{'OK' if self.ok else 'FAILED'} {self.started_at} {where}: {self.result}"


def write(path: Path, status: SendStatus, *, sync: bool = False) -> None:
    """Replace the status file at ``path`` by ``status`` (temp file, rename; fsync with ``sync``)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(asdict(status), f, indent=1)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def read(path: Path) -> SendStatus | None:
    """The status file at ``path``, or None if it is missing or unreadable."""
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        data["state"] = JobState(data["state"])
        for k in ("refused", "failures"):
            data[k] = tuple(data.get(k, ()))
        return SendStatus(**data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        log.warning("cannot read the send status %s: %s", path, exc)
        return None


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs and is a send job (not another process given its ID since)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    except OSError:
        return process_running(pid)
    return MODULE.encode() in cmdline and not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]


def settled(status: SendStatus) -> SendStatus:
    """``status`` as it stands: a job whose process is gone without a result is FAILED, in words."""
    if status.finished:
        return status
    if status.pid is None:
        try:
            age = (datetime.now(timezone.utc) - datetime.fromisoformat(status.started_at)).total_seconds()
        except ValueError:
            age = START_GRACE_S + 1
        if age <= START_GRACE_S:
            return status
        why = f"the send did not start within {START_GRACE_S:g} s"
    elif _alive(status.pid):
        return status
    else:
        why = f"the send stopped after {status.done} of {status.total} object(s) without a result"
    return replace(status, state=JobState.FAILED, ok=False,
                   result=f"{why} (killed, or the box restarted); see {status.log or 'its log'}")


def _started(path: Path) -> tuple[str, int]:
    """A status file's name as (time, n): the n-th job started within that second."""
    stamp, dash, n = path.stem.rpartition("Z-")
    return (stamp, int(n)) if dash and n.isdigit() else (path.stem.removesuffix("Z"), 1)


def job_files(data_dir: Path) -> list[Path]:
    """The send jobs' status files, latest first."""
    return sorted((data_dir / JOBS_DIR).glob("send-*.json"), key=_started, reverse=True)


def running(data_dir: Path) -> list[SendStatus]:
    """The sends not finished yet (one sends, the others wait for it), latest first."""
    out = []
    for p in job_files(data_dir)[:KEEP_JOBS]:
        s = read(p)
        if s is not None and not (s := settled(s)).finished:
            out.append(s)
    return out


def last_result(data_dir: Path) -> results.JobResult | None:
    """The last finished send's result (kept by :mod:`appliance.jobs.results`), or None."""
    return results.last_results(data_dir).get("send")


# -- starting a job (the console) ----------------------------------------------------------


def _prune(jobs: Path) -> None:
    for p in job_files(jobs.parent)[KEEP_JOBS:]:
        s = read(p)
        if s is None or settled(s).finished:
            p.unlink(missing_ok=True)
            p.with_suffix(".log").unlink(missing_ok=True)


def _new_stem(jobs: Path) -> str:
    stamp = datetime.now(timezone.utc).strftime("send-%Y%m%dT%H%M%SZ")
    stem, n = stamp, 1
    while True:
        try:
            fd = os.open(jobs / f"{stem}.log", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        except FileExistsError:
            n += 1
            stem = f"{stamp}-{n}"
            continue
        os.close(fd)
        return stem


def command(data_dir: Path, status: Path, to: str, *, config_path: Path | None,
            studies: Sequence[str] = (), series: Sequence[str] = ()) -> list[str]:
    """The job's command line."""
    cmd = [sys.executable, "-m", MODULE, "--data-dir", str(data_dir), "--status", str(status), "--to", to]
    if config_path is not None:
        cmd += ["--config", str(config_path)]
    for uid in studies:
        cmd += ["--study", uid]
    for uid in series:
        cmd += ["--series", uid]
    return cmd


def detached(cmd: list[str], log_path: Path, unit: str, *, systemd: bool | None = None) -> list[str]:
    """``cmd`` as started: under systemd (as root) in a transient unit of its own, so that
    stopping the console's service does not stop it; else as it is (a session of its own)."""
    if systemd is None:
        systemd = os.geteuid() == 0 and SYSTEMD_RUNTIME.is_dir() and shutil.which("systemd-run") is not None
    if not systemd:
        return cmd
    return ["systemd-run", "--quiet", "--collect", f"--unit=appliance-{unit}",
            f"--property=StandardOutput=append:{log_path}", f"--property=StandardError=append:{log_path}",
            "--", *cmd]


def start(data_dir: Path, to: str, *, config_path: Path | None, studies: Sequence[str] = (),
          series: Sequence[str] = ()) -> Path:
    """Start a send of ``studies`` and ``series`` to destination ``to``; return its status file.

    Writes the status file (STARTING) and the log's first line, then starts the job detached."""
    jobs = data_dir / JOBS_DIR
    jobs.mkdir(parents=True, exist_ok=True)
    _prune(jobs)
    stem = _new_stem(jobs)
    status_path, log_path = jobs / f"{stem}.json", jobs / f"{stem}.log"
    write(status_path, SendStatus(to=to, state=JobState.STARTING, log=str(log_path)))
    cmd = detached(command(data_dir, status_path, to, config_path=config_path, studies=studies, series=series),
                   log_path, stem)
    with open(log_path, "ab") as out:
        out.write(f"{_now()} started: {' '.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True)
    # Reap it when it ends, so a console that outlives it leaves no zombie behind.
    threading.Thread(target=proc.wait, name=f"reap-{stem}", daemon=True).start()
    log.info("send job %s started (pid %d) to %s", stem, proc.pid, to)
    return status_path


# -- the job itself ------------------------------------------------------------------------


class _Stopped(BaseException):
    """SIGTERM arrived (the box shuts down, or someone stopped the job)."""


def _stop(signum: int, frame: FrameType | None) -> None:
    raise _Stopped


def _outcome(to: str, report: Any) -> tuple[bool, str]:
    """Whether the peer stored every object of the plan, and the outcome in words (``report``
    is a :class:`~appliance.net.sender.SendReport`). What the plan refused was shown before the
    send was confirmed: it is named, but does not make the send FAILED (``appliance send``,
    for a script, exits 1 for it)."""
    from appliance.net.sender import SendOutcome

    n = len(report.items)
    stored = report.count(SendOutcome.SENT) + report.count(SendOutcome.WARNING)
    refused = (f"; {len(report.refused)} request(s) refused by the plan, not sent" if report.refused else "")
    if report.network_error:
        return False, f"{to} stored {stored} of {n} object(s); {report.network_error}{refused}"
    if stored == n:
        return True, f"{to} stored all {n} object(s){refused}"
    return False, f"{to} stored {stored} of {n} object(s), {n - stored} failed{refused}"


class _Job:
    """One send, keeping its status file up to date."""

    def __init__(self, path: Path, status: SendStatus) -> None:
        self.path = path
        self.status = status
        self.sizes: dict[str, int] = {}

    def update(self, **changes: Any) -> None:
        """Change the status and rewrite the file (after each object: a rename costs far less
        than a C-STORE, and a reader never sees a count older than the last object)."""
        self.status = replace(self.status, **changes)
        try:
            write(self.path, self.status, sync=self.status.finished)
        except OSError as exc:  # a full disk must not stop the send; the log and the result remain
            log.warning("cannot update the send status %s: %s", self.path, exc.strerror or exc)

    def finish(self, data_dir: Path, ok: bool, result: str, summary: str = "") -> None:
        """Write the outcome to the log, keep it as the last send's result, then in the status
        file (last: whoever sees it finished finds the rest): DONE with the sender's ``summary``
        when a report came, else FAILED."""
        print(f"{'OK' if ok else 'FAILED'}: {result}", flush=True)
        where = self.status.to + (f" ({self.status.peer})" if self.status.peer else "")
        results.record_result(data_dir, results.JobResult("send", ok, result, where))
        self.update(state=JobState.DONE if summary else JobState.FAILED, ok=ok,
                    result=result, summary=summary or result)

    def progress(self, p: Any) -> None:
        """The sender's progress callback (an :class:`appliance.reports.Progress`)."""
        from appliance.net.sender import SendOutcome

        item = p.item
        failures, failed, size = self.status.failures, self.status.failed, 0
        if item is not None:
            print(item, flush=True)
            size = self.sizes.get(item.sop_instance_uid, 0)
            if item.outcome in (SendOutcome.FAILED, SendOutcome.NOT_SENT):
                failed += 1
                if len(failures) < KEEP_FAILURES:
                    failures = (*failures, item.line())
        self.update(state=JobState.SENDING, done=p.files_done, total=p.files_total, seconds=p.seconds,
                    bytes_done=self.status.bytes_done + size, failed=failed, failures=failures)


def _lock_held(data_dir: Path) -> bool:
    """Whether another send holds the store's send lock now (this one will wait for it)."""
    import fcntl

    from appliance.net.sender import _LOCK_NAME  # the lock send() takes; one association at a time

    try:
        fd = os.open(data_dir / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o640)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def run(args: argparse.Namespace) -> int:
    """Plan and send as ``args`` say, keeping the status file; return 0 when all was stored."""
    from appliance import config
    from appliance.errors import ApplianceError
    from appliance.net.sender import ClientSettings, plan_send, send
    from appliance.store.store import Store

    data_dir, path = Path(args.data_dir), Path(args.status)
    job = _Job(path, replace(read(path) or SendStatus(to=args.to, state=JobState.STARTING),
                             to=args.to, pid=os.getpid()))
    job.update(state=JobState.PLANNING)
    signal.signal(signal.SIGTERM, _stop)
    store = None
    try:
        cfg = config.load(Path(args.config) if args.config else None)
        dest = cfg.destinations.get(args.to)
        if dest is None:
            known = ", ".join(sorted(cfg.destinations)) or "none are configured"
            raise ApplianceError(f"no destination '{args.to}' in the configuration (known: {known})")
        job.update(peer=f"{dest.ae_title}@{dest.host}:{dest.port}")
        store = Store(data_dir, slice_tolerance_mm=cfg.store.slice_tolerance_mm)
        plan = plan_send(store, studies=args.study, series=args.series)
        job.sizes = {o.sop_instance_uid: o.size for o in plan.objects}
        for r in plan.refused:
            print(f"refused   {r}", flush=True)
        job.update(total=len(plan.objects), bytes_total=sum(job.sizes.values()),
                   refused=tuple(str(r) for r in plan.refused),
                   state=JobState.WAITING if _lock_held(data_dir) else JobState.CONNECTING)
        report = send(store, plan, dest, ClientSettings(), progress=job.progress)
    except _Stopped:
        job.finish(data_dir, False, f"stopped (SIGTERM) after {job.status.done} of {job.status.total} object(s)")
        return 1
    except ApplianceError as exc:
        job.finish(data_dir, False, str(exc))
        return 1
    except Exception as exc:  # noqa: BLE001 - the status must say it failed, whatever failed
        log.exception("the send to %s failed", args.to)
        job.finish(data_dir, False, f"internal error: {exc!r}")
        return 1
    finally:
        if store is not None:
            store.close(clean=False)
    print(report.summary(), flush=True)  # each object's line was printed as it ended
    ok, words = _outcome(args.to, report)
    job.finish(data_dir, ok, words, report.summary())
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m appliance.jobs.sendjob``: one send, as :func:`start` runs it."""
    from appliance import logs

    p = argparse.ArgumentParser(prog=f"python -m {MODULE}",
                                description="send studies and series to a configured destination, "
                                            "keeping a status file (the serial console starts this)")
    p.add_argument("--config", metavar="FILE", help="the config file (default: the box's)")
    p.add_argument("--data-dir", required=True, metavar="DIR", help="the store")
    p.add_argument("--status", required=True, metavar="FILE", help="the status file to keep up to date")
    p.add_argument("--to", required=True, metavar="DESTINATION", help="a destination of the config file")
    p.add_argument("--study", action="append", default=[], metavar="UID")
    p.add_argument("--series", action="append", default=[], metavar="UID")
    args = p.parse_args(argv)
    if not (args.study or args.series):
        p.error("give at least one --study UID or --series UID")
    logs.setup(1)  # INFO: the log file is the job's record
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # its ERROR lines repeat ours
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
