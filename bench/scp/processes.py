"""The processes of a bench-scp run: the DCMTK tools found on PATH, a receiver started in its
own session (ready once it answers C-ECHO, its memory and CPU read from ``/proc``, stopped with
SIGTERM) and the storescu senders, timed."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NoReturn

from appliance.conformance import CLIENT_AE_TITLE

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
#: The durable DCMTK's preload (see fsync_on_close.c), built by :func:`build_fsync_on_close`.
FSYNC_ON_CLOSE_C = Path(__file__).with_name("fsync_on_close.c")
STORESCP_ARGV = ("storescp", "-aet", "{aet}", "-pdu", "{pdu}", "-dhl", "-od", "{data_dir}", "{port}")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0


def build_fsync_on_close(cache_dir: Path) -> Path | str:
    """The shared object of :data:`FSYNC_ON_CLOSE_C`, built with the C compiler into
    ``cache_dir`` once per version of the source; or, if it cannot be built, why not."""
    source = FSYNC_ON_CLOSE_C.read_bytes()
    built = cache_dir / f"fsync_on_close-{hashlib.sha256(source).hexdigest()[:12]}.so"
    if built.exists():
        return built
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return "no C compiler (cc) to build it (Debian: apt install gcc)"
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = built.with_name(f".{built.name}.{os.getpid()}")
    r = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(partial), str(FSYNC_ON_CLOSE_C), "-ldl"],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        partial.unlink(missing_ok=True)
        return f"{cc} could not build {FSYNC_ON_CLOSE_C.name}: {(r.stderr or r.stdout).strip()[-300:]}"
    partial.replace(built)
    return built


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


def with_log(message: str, log: Path, lines: int = 8) -> str:
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


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM (in the main thread) until the block is done, then act on
    one that came meanwhile: an interrupt inside ``Popen`` would leave its child running,
    in a session of its own, with no one knowing its process ID. The child's own handling
    is untouched (exec resets caught signals to their default)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    before = {s: signal.signal(s, lambda signum, _frame: came.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        if came:
            signal.raise_signal(came[0])


#: Receivers started and not yet stopped, whatever ends the run (see :func:`kill_receivers`).
_LIVE: set[ReceiverProcess] = set()


def kill_receivers() -> None:
    """Kill every receiver still running (for the benchmark's last ``finally``)."""
    for receiver in list(_LIVE):
        receiver.kill()


class ReceiverProcess:
    """A receiver running in its own session, with its output in ``log``."""

    def __init__(self, argv: list[str], log: Path, cwd: Path | None, env: dict[str, str]) -> None:
        self.log = log
        with _signals_held(), open(log, "wb") as out:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
            _LIVE.add(self)

    def wait_until_ready(self, echoscu: str, port: int, aet: str) -> None:
        """Return once the receiver answers C-ECHO (DCMTK echoscu); raise if it never does."""
        deadline = time.monotonic() + START_TIMEOUT
        argv = [echoscu, "-aet", CLIENT_AE_TITLE, "-aec", aet, "-to", "2", "-ta", "2", "-td", "2", LOOPBACK, str(port)]
        while True:
            if self.proc.poll() is not None:
                raise RunError(
                    with_log(f"exited with status {self.proc.returncode} before answering C-ECHO", self.log)
                )
            try:
                if subprocess.run(argv, env=DCMTK_ENV, capture_output=True, timeout=10).returncode == 0:
                    return
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                raise RunError(with_log(f"did not answer C-ECHO within {START_TIMEOUT:.0f} s", self.log))
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
        _LIVE.discard(self)

    def _kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def machine_cpu() -> tuple[float, float]:
    """CPU seconds of the whole machine so far, (busy, all), from ``/proc/stat``: busy is
    every CPU's time outside idle and I/O wait, summed over the CPUs, whoever spent it
    (the receiver, the senders, kernel threads such as the loop device's and the journal's)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    hz = os.sysconf("SC_CLK_TCK")
    total = sum(ticks)
    return (total - ticks[3] - ticks[4]) / hz, total / hz


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's children that have ended and been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_exactly(procs: list[subprocess.Popen[bytes]], timeout: float) -> bool:
    """Wait for every process of ``procs`` to exit, returning as soon as the last one has;
    kill them all after ``timeout`` seconds and return True if it came to that.

    Popen.wait with a timeout polls, sleeping up to 50 ms between looks, which rounded a run
    of 0.3 s up by as much; this waits without one, and a timer kills at the deadline."""
    overdue = threading.Event()

    def kill_all() -> None:
        overdue.set()
        for q in procs:
            if q.poll() is None:
                q.kill()

    watchdog = threading.Timer(timeout, kill_all)
    watchdog.start()
    try:
        for p in procs:
            p.wait()
    finally:
        watchdog.cancel()
    return overdue.is_set()


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
    # --nagle: storescu as many modalities send, with Nagle's algorithm on (DCMTK turns it
    # off only when TCP_NODELAY is in its environment).
    env = {k: v for k, v in DCMTK_ENV.items() if k != "TCP_NODELAY"} if getattr(args, "nagle", False) else DCMTK_ENV
    procs: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as logs:
        try:
            start = time.perf_counter()
            for files, log_path in zip(parts, log_paths, strict=True):
                log = logs.enter_context(open(log_path, "wb"))
                command = argv + [str(f) for f in files]
                procs.append(
                    subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
                )
            overdue = wait_exactly(procs, timeout)
            elapsed = time.perf_counter() - start
            if overdue:
                raise RunError(f"storescu did not finish within {timeout:.0f} s")
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    for p, log_path in zip(procs, log_paths, strict=True):
        if p.returncode != 0:
            raise RunError(with_log(f"{log_path.stem} of {len(procs)} exited with status {p.returncode}", log_path))
    return elapsed
