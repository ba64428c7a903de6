"""The appliance's self-check and the state ``appliance status`` and ``STATUS=`` show.

:func:`check` asks the Storage SCP for a loopback C-ECHO, writes and removes a small file
in the store, and gathers counts, disk use and the last import, export and send results (kept
in ``DATA_DIR/last-media.json`` by the media jobs and the send job, so they survive a restart:
see :mod:`appliance.jobs.results`, whose names this module hands on to the console), and the
sends started on the console that still run (their status files, :mod:`appliance.jobs.sendjob`),
and the system version: the running one, the other slot's and whether a rollback happened
(:func:`version_lines`, from :mod:`appliance.update.boot`).
"""

from __future__ import annotations

import logging
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.jobs.results import JobResult, last_results, record_result
from appliance.store.disk import self_store

if TYPE_CHECKING:
    from appliance.store.store import Store

# pynetdicom and the store (pydicom, numpy) are imported where used: the serial console and
# the supervisor import this module, and at the box's start every second counts.

__all__ = ["Health", "JobResult", "check", "last_results", "loopback", "offline", "record_result",
           "scp_report_view", "store_problem", "version_lines"]

log = logging.getLogger(__name__)

#: Our calling AE title for the loopback C-ECHO.
HEALTH_AE_TITLE = "APPLIANCE_CHECK"


@dataclass(frozen=True)
class Health:
    """The self-check's outcome and the numbers a person wants to see."""

    #: "AE:port" the SCP serves, or "" when it is not running.
    listening: str
    scp_answered: bool
    #: "" when the store takes a write, else what is wrong (full, read-only, I/O error).
    store_problem: str
    counts: dict[str, int]
    disk_used_percent: float
    last_import: JobResult | None = None
    last_export: JobResult | None = None
    #: What a media job is doing now ("" when idle).
    activity: str = ""
    #: Other problems worth a person's attention (a failed config reload, a child restarting).
    notes: tuple[str, ...] = ()
    #: What the SCP's own report says is wrong ("" when nothing): not accepting connections,
    #: cannot store, or no report at all. Fails the check, so the watchdog stops.
    scp_problem: str = ""
    #: The SCP's own numbers: associations, open files, threads, memory, the last store.
    scp_detail: str = ""
    #: What retention last did ("" if it never ran), and what it cannot do ("" when nothing).
    retention: str = ""
    retention_problem: str = ""
    #: One line per forwarding destination, and what is wrong with forwarding ("" when nothing).
    forwarding: tuple[str, ...] = ()
    forwarding_problems: tuple[str, ...] = ()
    #: The sends started on the console that have not finished, one line each
    #: ("sending 12 of 40 to PACS ..."), and the last finished send's result.
    sending: tuple[str, ...] = ()
    last_send: JobResult | None = None
    #: The system version in lines (running, the other slot, a rollback), and in one for ``STATUS=``.
    version: tuple[str, ...] = ()
    version_status: str = ""
    #: The last USB stick that held an update: offered, asked for, or refused and why.
    last_update_stick: JobResult | None = None

    @property
    def ok(self) -> bool:
        """True when the watchdog may be fed: the SCP answers and the store takes writes.

        A full disk is reported but does not fail the check: a restart cannot free space."""
        return (self.scp_answered and not self.scp_problem
                and (not self.store_problem or self.store_problem.startswith("store full")))

    def status_line(self) -> str:
        """One line for ``STATUS=``: ``listening ELEKTA_STORAGE:104 · 1,234 studies · disk 41% used``."""
        parts = []
        if not self.scp_answered:
            parts.append(f"SCP {self.listening or 'not running'} does not answer C-ECHO")
        else:
            parts.append(f"listening {self.listening}")
        if self.scp_problem:
            parts.append(self.scp_problem)
        if self.store_problem:
            parts.append(self.store_problem)
        if self.retention_problem:
            parts.append("RETENTION: " + self.retention_problem.split(". ")[0])
        parts.extend(f"FORWARDING: {p}" for p in self.forwarding_problems)
        waiting = [line.split(";")[0] for line in self.forwarding if " 0 waiting" not in line.split(";")[0]]
        if waiting:
            parts.append("forward " + ", ".join(waiting))
        parts.append(f"{self.counts.get('studies', 0):,} studies")
        parts.append(f"disk {self.disk_used_percent:.0f}% used")
        if self.activity:
            parts.append(self.activity)
        parts.extend(self.sending)
        for r in (self.last_import, self.last_export, self.last_send, self.last_update_stick):
            if r is not None:
                parts.append(r.short)
        if self.version_status:
            parts.append(self.version_status)
        parts.extend(self.notes)
        return " · ".join(parts)

    def render(self) -> str:
        """The multi-line report of ``appliance status``."""
        c = self.counts
        lines = [
            f"health:   {'OK' if self.ok else 'DEGRADED'}",
            f"scp:      {('listening ' + self.listening) if self.listening else 'not running'}"
            + (" (no answer to a loopback C-ECHO)" if self.listening and not self.scp_answered else ""),
        ]
        if self.scp_problem:
            lines.append(f"scp:      PROBLEM: {self.scp_problem}")
        if self.scp_detail:
            lines.append(f"scp:      {self.scp_detail}")
        lines += [
            f"store:    {self.store_problem or 'writable'}; disk {self.disk_used_percent:.0f}% used",
            (f"stored:   {c.get('patients', 0):,} patients, {c.get('studies', 0):,} studies, "
             f"{c.get('series', 0):,} series, {c.get('instances', 0):,} instances"),
        ]
        if self.retention:
            lines.append(f"retention: {self.retention}")
        if self.retention_problem:
            lines.append(f"retention: PROBLEM: {self.retention_problem}")
        lines.extend(f"forward:  {line}" for line in self.forwarding)
        lines.extend(f"forward:  PROBLEM: {p}" for p in self.forwarding_problems)
        if self.activity:
            lines.append(f"now:      {self.activity}")
        lines.extend(f"now:      {line}" for line in self.sending)
        for label, r in (("import", self.last_import), ("export", self.last_export), ("send", self.last_send),
                         ("update stick", self.last_update_stick)):
            if r is None and label == "update stick":
                continue
            text = "none yet" if r is None else f"{'OK' if r.ok else 'FAILED'} {r.finished_at} {r.device}: {r.summary}"
            lines.append(f"last {label}: {text}")
        lines.extend(f"version:  {line}" for line in self.version)
        lines.extend(f"note:     {n}" for n in self.notes)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Health:
        d = dict(d)
        d.pop("ok", None)
        for k in ("last_import", "last_export", "last_send", "last_update_stick"):
            d[k] = JobResult(**d[k]) if d.get(k) else None
        d["notes"] = tuple(d.get("notes", ()))
        d["forwarding"] = tuple(d.get("forwarding", ()))
        d["forwarding_problems"] = tuple(d.get("forwarding_problems", ()))
        d["sending"] = tuple(d.get("sending", ()))
        d["version"] = tuple(d.get("version", ()))
        return cls(**d)


def echo(host: str, port: int, ae_title: str, timeout: float = 5.0) -> str | None:
    """C-ECHO ``ae_title`` at ``host``:``port`` as :data:`HEALTH_AE_TITLE`, with the client
    AE's own echo (:func:`appliance.net.sender.echo`); return None on success, else what
    went wrong."""
    from appliance.config import Destination
    from appliance.errors import ApplianceError
    from appliance.net.sender import ClientSettings
    from appliance.net.sender import echo as c_echo

    try:
        c_echo(Destination(ae_title, host, port), ClientSettings(HEALTH_AE_TITLE, timeout=timeout))
    except ApplianceError as exc:
        return str(exc)
    return None


#: Seconds without a report after which the SCP is taken for hung (it reports every 5 s).
SCP_REPORT_STALE = 20.0


def scp_report_view(report: dict[str, str], age: float | None, uptime: float) -> tuple[str, str]:
    """Read the SCP's report (:func:`appliance.net.scp.report`, ``age`` seconds old, None if
    none came in ``uptime`` seconds): return (what is wrong or "", its numbers in one line)."""
    if age is None:
        if uptime > SCP_REPORT_STALE:
            return f"the Storage SCP has sent no report in {uptime:.0f} s (hung, or an older version)", ""
        return "", ""
    problem = ""
    if age > SCP_REPORT_STALE:
        problem = f"the Storage SCP has not reported for {age:.0f} s (hung?)"
    elif report.get("X_ACCEPTING") != "1":
        problem = ("the Storage SCP is not accepting connections: "
                   f"{report.get('X_PROBLEM') or 'reason unknown'}; scanners cannot connect")
    elif report.get("X_SELF_STORE", "ok") not in ("ok", "") and \
            not report["X_SELF_STORE"].startswith("store full"):
        problem = f"the Storage SCP cannot store: {report['X_SELF_STORE']}"
    rss_mb = int(report.get("X_RSS_KB", "0") or 0) // 1024
    detail = (f"{report.get('X_ASSOCIATIONS', '?')} association(s), {report.get('X_PENDING', '?')} waiting to "
              f"associate, {report.get('X_FDS', '?')} open files, {report.get('X_THREADS', '?')} threads, "
              f"{rss_mb} MB; {report.get('X_SERVED', '?')} associations served")
    if report.get("X_SHED", "0") not in ("0", ""):
        detail += f", {report['X_SHED']} idle connection(s) closed unserved"
    last = report.get("X_LAST_STORE", "")
    if last:
        ago = report.get("X_LAST_STORE_AGE", "")
        detail += f"; last store {'OK' if last == 'ok' else 'refused ' + last}" + (f" {ago} s ago" if ago else "")
    return problem, detail


def tls_probe(host: str, port: int, timeout: float = 5.0) -> str:
    """Complete a TLS handshake with the Storage SCP's TLS port (its certificate is not checked:
    this asks whether the port serves TLS at all); return "" or what went wrong, in words.
    A C-ECHO on the plain port does not show that the TLS port works."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, ctx.wrap_socket(raw):
            return ""
    except (OSError, ssl.SSLError) as exc:
        return (f"the TLS port {port} does not complete a TLS handshake ({getattr(exc, 'strerror', None) or exc}); "
                "TLS peers cannot store")


#: Said instead of the slots on a machine that does not run the appliance image.
NO_SLOTS = "no update slots (not running from the appliance image)"


def version_lines(esp: Path | None = None, os_release: Path | None = None,
                  run_dir: Path | None = None) -> tuple[tuple[str, ...], str]:
    """The system version as lines for ``appliance status`` and as one line for ``STATUS=``:
    the running version, the other slot's and its state, a rollback
    (:func:`appliance.update.boot.version_info`), and an update being installed or the last
    one's result (:func:`appliance.update.request.read_progress`, until the next boot). A
    machine without the ESP or without ``IMAGE_VERSION`` in its os-release (a development
    machine) gets the package's version and :data:`NO_SLOTS`; what cannot be read is said,
    never raised."""
    from appliance import __version__
    from appliance.update import ESP, OS_RELEASE, RUN_DIR, UpdateError
    from appliance.update.boot import version_info
    from appliance.update.request import read_progress

    esp = ESP if esp is None else esp
    os_release = OS_RELEASE if os_release is None else os_release
    try:
        image = "IMAGE_VERSION=" in os_release.read_text(encoding="utf-8", errors="replace")
    except OSError:
        image = False
    if not image or not esp.is_dir():
        lines, status = [f"System version {__version__} (the package); {NO_SLOTS}"], f"version {__version__}"
    else:
        try:
            info = version_info(esp=esp, os_release=os_release)
            lines, status = info.lines(), info.status_line()
        except (UpdateError, OSError) as exc:
            lines, status = [f"cannot be read: {exc}"], "version unknown"
    p = read_progress(RUN_DIR if run_dir is None else run_dir)
    if p is not None and not p.finished:
        lines.append(f"Updating: {p.message}")
        status += f"; updating to {p.version}: {p.percent} %"
    elif p is not None:
        lines.append(f"Last update: {'done' if p.ok else 'FAILED'}: {p.message}")
        if not p.ok:
            status += f"; update to {p.version} FAILED"
    return tuple(lines), status


def loopback(bind: str) -> str:
    """The address to reach a server bound to ``bind`` from this machine."""
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(bind, bind)


def store_problem(data_dir: Path) -> str:
    """Store a small file as an object is stored (see :func:`appliance.store.disk.self_store`);
    return "" or what is wrong."""
    return self_store(data_dir, "health-check")


def check(
    store: Store,
    *,
    ae_title: str,
    host: str,
    port: int | None,
    activity: str = "",
    notes: tuple[str, ...] = (),
) -> Health:
    """Run the self-check against the SCP at ``host``:``port`` (None: not running) and ``store``."""
    problem = echo(host, port, ae_title) if port else "not running"
    if problem and port:
        log.warning("self-check: %s", problem)
    return _gather(store, f"{ae_title}:{port}" if port else "", problem is None, activity, notes)


def offline(store: Store) -> Health:
    """What can be known without a running supervisor: counts, disk use, last results."""
    return _gather(store, "", False, "", ("the supervisor ('appliance run') is not running",))


def _gather(store: Store, listening: str, answered: bool, activity: str, notes: tuple[str, ...]) -> Health:
    from appliance.store.disk import disk_usage_percent
    from appliance.store.retention import last_report

    results = last_results(store.data_dir)
    retention = last_report(store.data_dir)
    said = ""
    if retention is not None:
        said = (f"{retention.summary()} (last run {retention.at.replace('T', ' ')[:16]} UTC)"
                if retention.enabled else "off")
    from appliance.jobs import forwarder, sendjob

    version, version_status = version_lines()
    return Health(
        version=version,
        version_status=version_status,
        last_update_stick=results.get("update stick"),
        sending=tuple(job.line() for job in sendjob.running(store.data_dir)),
        last_send=results.get("send"),
        forwarding=tuple(forwarder.forward_lines(store)),
        forwarding_problems=tuple(forwarder.problems(store)),
        retention=said,
        retention_problem="" if retention is None else retention.problem,
        listening=listening,
        scp_answered=answered,
        store_problem=store_problem(store.data_dir),
        counts=store.counts(),
        disk_used_percent=disk_usage_percent(store.data_dir),
        last_import=results.get("import"),
        last_export=results.get("export"),
        activity=activity,
        notes=notes,
    )
