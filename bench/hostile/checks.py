"""What the hostile runs judge by: a process's descriptors, threads and memory from
``/proc``, and DCMTK ``echoscu``/``storescu`` round trips, timed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# -- the process and the round trips ---------------------------------------------------------------


@dataclass(frozen=True)
class ProcStats:
    """Open descriptors, threads, resident memory and its high-water mark (bytes)."""

    fds: int
    threads: int
    rss: int
    hwm: int


def proc_stats(pid: int) -> ProcStats:
    """Read ``/proc/PID``; raises ProcessLookupError-like OSError if the process is gone."""
    fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()

    def kib(key: str) -> int:
        return int(fields.get(key, "0 kB").split()[0]) * 1024

    return ProcStats(fds, int(fields["Threads"]), kib("VmRSS"), kib("VmHWM"))


def open_files(pid: int) -> Counter[str]:
    """What a process's descriptors point at, by kind: ``socket``, ``index`` (the SQLite
    index, its -wal and -shm), ``pipe``, ``anon`` (epoll and the like), ``file``."""
    kinds: Counter[str] = Counter()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if link.startswith("socket:"):
            kinds["socket"] += 1
        elif link.startswith("pipe:"):
            kinds["pipe"] += 1
        elif link.startswith("anon_inode:"):
            kinds["anon"] += 1
        elif Path(link).name.startswith("index.sqlite"):
            kinds["index"] += 1
        else:
            kinds["file"] += 1
    return kinds


@dataclass(frozen=True)
class RoundTrip:
    """A DCMTK round trip: ``ok`` when it succeeded within the limit; ``detail`` says why not."""

    ok: bool
    seconds: float
    detail: str


def _dcmtk(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise RuntimeError(f"DCMTK's {tool} is not installed (Debian package dcmtk)")
    return path


_DCMTK_ENV = {"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"}


def echo_ok(host: str, port: int, aet: str, timeout: float = 1.0) -> RoundTrip:
    """One C-ECHO by ``echoscu``: ok if answered with success within ``timeout`` s (the
    process's own start included)."""
    t = str(max(1, int(timeout * 3)))
    cmd = [_dcmtk("echoscu"), "-aet", "SOAK_ECHO", "-aec", aet, "-to", t, "-ta", t, "-td", t, host, str(port)]
    return _timed(cmd, timeout, lambda out: None)


_STORE_RSP = re.compile(r"Received Store Response \(([^)]*)\)")


def store_status(output: str) -> list[str]:
    """The statuses of the C-STORE responses in ``storescu -v`` output ("Success", ...)."""
    return _STORE_RSP.findall(output)


def store_ok(host: str, port: int, aet: str, path: Path, timeout: float = 1.0) -> RoundTrip:
    """One C-STORE of ``path`` by ``storescu`` (only its own SOP class proposed): ok if
    answered with success (or a warning) within ``timeout`` s."""
    t = str(max(1, int(timeout * 3)))
    cmd = [_dcmtk("storescu"), "-v", "-R", "-aet", "SOAK_STORE", "-aec", aet, "-to", t, "-ta", t, "-td", t,
           host, str(port), str(path)]

    def check(out: str) -> str | None:
        statuses = store_status(out)
        if not statuses:
            return "no C-STORE response"
        if not all(s == "Success" or s.startswith("Warning") for s in statuses):
            return f"C-STORE answered {', '.join(statuses)}"
        return None

    return _timed(cmd, timeout, check)


def _timed(cmd: list[str], limit: float, check: Callable[[str], str | None]) -> RoundTrip:
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace",
                              timeout=max(limit * 3, 5.0), env=_DCMTK_ENV)
    except subprocess.TimeoutExpired:
        return RoundTrip(False, time.monotonic() - start, f"{Path(cmd[0]).name} did not finish")
    seconds = time.monotonic() - start
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        last = output.strip().splitlines()[-1:] or [""]
        return RoundTrip(False, seconds, f"{Path(cmd[0]).name} exited {proc.returncode}: {last[0]}")
    problem = check(output)
    if problem:
        return RoundTrip(False, seconds, problem)
    if seconds > limit:
        return RoundTrip(False, seconds, f"answered after {seconds:.2f} s (limit {limit:.1f} s)")
    return RoundTrip(True, seconds, "ok")


def fresh_copy(source: Path, folder: Path, number: int, seed: int = 0) -> Path:
    """Write ``source`` to ``folder`` with a new SOP Instance UID (deterministic in
    ``seed`` and ``number``), as a scanner sends a new image; return the new file."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(source)
    uid = generate_uid(entropy_srcs=[f"soak-{seed}-{source.name}-{number}"])
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{source.stem}-{number}.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out
