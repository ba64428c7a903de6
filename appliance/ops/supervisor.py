"""``appliance run``: the supervisor that runs the box.

Children:

* the Storage SCP, a child process (``python -m appliance scp --listen-fd N``) serving a
  listening socket the supervisor binds: bind errors surface here, before a setting is
  committed, and a restarted SCP finds connections waiting in the socket's backlog;
* the config service (:mod:`appliance.ops.configservice`) and the media watcher
  (:mod:`appliance.adapters.devices`) with its job worker (:mod:`appliance.jobs.media`), threads.

A child that dies is logged and restarted with backoff (1 s doubling to 30 s); the others
keep running. ``READY=1`` goes to systemd once the SCP accepts associations, ``STATUS=``
after each self-check and media event, ``WATCHDOG=1`` only while the self-check passes.
SIGTERM stops in order (media, config service, SCP with its in-flight associations) and
exits 0; SIGHUP reloads the config file (an invalid file is reported and not applied).

A change of the SCP's settings starts a new SCP on a new socket (``SO_REUSEPORT`` when the
port stays the same), waits for its ``READY=1``, commits the file, then sends SIGTERM to the
old SCP, whose associations in flight finish under the old settings.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance import audit, config
from appliance.adapters.devices import MediaWatcher
from appliance.adapters.systemd import Notifier, NotifyListener, watchdog_interval
from appliance.errors import ApplianceError, ConfigError
from appliance.ops import health
from appliance.ops.configservice import (
    SOCKET_NAME,
    ConfigFile,
    ConfigService,
)

if TYPE_CHECKING:  # imported once the SCP is spawned (see Supervisor._open_store)
    from appliance.jobs.forwarder import Forwarder
    from appliance.jobs.media import MediaJobs
    from appliance.store.store import Store

log = logging.getLogger(__name__)

#: Seconds an SCP may take from spawn to READY=1.
START_TIMEOUT = 30.0
#: Seconds a stopping SCP gets for associations in flight (its own grace is 10 s).
STOP_TIMEOUT = 15.0
#: Seconds between self-checks when systemd's watchdog does not ask for more often.
CHECK_INTERVAL = 10.0
_BACKOFF_MIN, _BACKOFF_MAX, _STABLE_AFTER = 1.0, 30.0, 60.0


class _Backoff:
    """Restart delays for one child: 1 s doubling to 30 s, back to 1 s after a minute of running."""

    def __init__(self) -> None:
        self.delay = _BACKOFF_MIN
        self.started = time.monotonic()
        self.due: float | None = None

    def started_now(self) -> None:
        self.started = time.monotonic()
        self.due = None

    def failed(self) -> float:
        if time.monotonic() - self.started > _STABLE_AFTER:
            self.delay = _BACKOFF_MIN
        delay = self.delay
        self.delay = min(self.delay * 2, _BACKOFF_MAX)
        self.due = time.monotonic() + delay
        return delay

    def is_due(self) -> bool:
        return self.due is not None and time.monotonic() >= self.due


@dataclasses.dataclass(eq=False)
class ScpChild:
    """One generation of the SCP child process and the listening socket it serves."""

    generation: int
    cfg: config.Config
    sock: socket.socket
    snapshot: Path
    #: The DICOM TLS listening socket (``scp.tls_port``), if any, handed over the same way.
    tls_sock: socket.socket | None = None
    proc: subprocess.Popen[bytes] | None = None
    ready: threading.Event = dataclasses.field(default_factory=threading.Event)
    stopping: threading.Event = dataclasses.field(default_factory=threading.Event)
    retired: bool = False
    #: The SCP's last report (``X_*`` fields, see :func:`appliance.net.scp.report`) and when it came.
    report: dict[str, str] = dataclasses.field(default_factory=dict)
    report_at: float = 0.0
    started_at: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None


def listen(scp: config.ScpConfig, port: int | None = None) -> socket.socket:
    """A listening TCP socket on ``scp.bind``:``scp.port`` (or ``port``: the TLS port)
    (SO_REUSEPORT, so a successor can join the same port); raise ConfigError saying why it
    cannot be had."""
    if port is not None:
        scp = dataclasses.replace(scp, port=port)
    else:  # the plain port: loopback only with scp.tls_only
        scp = dataclasses.replace(scp, bind=config.plain_bind(scp))
    family = socket.AF_INET6 if ":" in scp.bind else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((scp.bind, scp.port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EACCES:
            raise ConfigError(f"port {scp.port} needs root or CAP_NET_BIND_SERVICE; use a port above 1023") from None
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {scp.port} is already in use by another program") from None
        raise ConfigError(f"cannot listen on {scp.bind}:{scp.port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


class Supervisor:
    """Runs and watches the appliance's children until SIGTERM (see the module docstring)."""

    def __init__(
        self, cfile: ConfigFile, data_dir: Path, runtime: Path, *, media: bool = True, verbosity: int = 0
    ) -> None:
        self.cfile = cfile
        self.data_dir = data_dir
        self.runtime = runtime
        self.media_enabled = media
        self.verbosity = verbosity
        self.cfg = cfile.load()
        self.notifier = Notifier()
        self.store: Store | None = None
        self._scp_problem = ""
        self._cfg_lock = threading.RLock()  # one config change (set, reload) at a time
        self._scp: ScpChild | None = None
        self._retired: list[ScpChild] = []
        self._by_pid: dict[int, ScpChild] = {}  # read by the notify thread without the lock
        self._generation = 0
        self._scp_backoff = _Backoff()
        self._watcher_backoff = _Backoff()
        self._service_backoff = _Backoff()
        self._notes: dict[str, str] = {}
        self._cert_checked_at = 0.0
        self._cert_notes: list[str] = []
        self._stopping = threading.Event()
        self._refresh = threading.Event()
        self._last: health.Health | None = None
        self._ready_sent = False
        self.jobs: MediaJobs | None = None
        self.forwarder: Forwarder | None = None
        self.watcher: MediaWatcher | None = None
        self.service: ConfigService | None = None
        self.listener: NotifyListener | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def run(self) -> int:
        """Start everything, supervise until SIGTERM/SIGINT, stop in order; return 0."""
        self.runtime.mkdir(parents=True, exist_ok=True, mode=0o750)
        wake_r, wake_w = socket.socketpair()
        wake_w.setblocking(False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: None)
        signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        try:
            self.listener = NotifyListener(self.runtime / "scp-notify.sock")
            threading.Thread(target=self._receive_notifications, name="notify", daemon=True).start()
            self._start_scp(self.cfg)
            jobs = self._open_store()
            assert self.forwarder is not None
            self.forwarder.start()
            self._start_service()
            if self.media_enabled:
                jobs.start()
                self._start_watcher()
            threading.Thread(target=self._check_loop, name="self-check", daemon=True).start()
            while True:
                readable, _, _ = select.select([wake_r], [], [], 0.2)
                signals = wake_r.recv(64) if readable else b""
                if signal.SIGTERM in signals or signal.SIGINT in signals:
                    break
                if signal.SIGHUP in signals:
                    threading.Thread(target=self.reload, name="reload", daemon=True).start()
                self._supervise()
        finally:
            signal.set_wakeup_fd(-1)
            self.stop()
            wake_r.close()
            wake_w.close()
        return 0

    def stop(self) -> None:
        """Stop in order: media (between two objects), config service, the SCP (grace for
        associations in flight). The store is marked clean only when every writer ended cleanly."""
        self._stopping.set()
        self.notifier.stopping("stopping")
        log.info("stopping")
        clean = True
        if self.watcher is not None:
            self.watcher.stop()
        if self.media_enabled and self.jobs is not None:
            self.jobs.stop()
            clean = not self.jobs.alive()
        if self.service is not None:
            self.service.stop()
        if self.forwarder is not None:
            self.forwarder.stop()
        with self._cfg_lock:
            children = [c for c in [self._scp, *self._retired] if c is not None]
            for child in children:
                self._terminate(child)
            for child in children:
                clean = self._reap(child) and clean
            if self._scp is not None:
                self._scp.snapshot.unlink(missing_ok=True)
        if self.listener is not None:
            self.listener.close()
        if self.store is not None:
            self.store.close(clean=False)
        if not clean:
            (self.data_dir / ".clean-shutdown").unlink(missing_ok=True)
        log.info("stopped")

    def _supervise(self) -> None:
        """One round of watching: restart what died (with backoff), reap retired SCPs."""
        with self._cfg_lock:
            child = self._scp
            if child is not None and child.proc is not None and child.proc.poll() is not None:
                if self._scp_backoff.due is None:
                    delay = self._scp_backoff.failed()
                    self._notes["scp"] = f"SCP exited ({_exit(child.proc.returncode)}); restarting"
                    log.error("Storage SCP (pid %d) exited (%s); restarting it in %.0f s",
                              child.proc.pid, _exit(child.proc.returncode), delay)
                    self._refresh.set()
                elif self._scp_backoff.is_due():
                    self._spawn(child)
            for old in list(self._retired):
                if old.proc is None or old.proc.poll() is not None:
                    self._retired.remove(old)
                    old.snapshot.unlink(missing_ok=True)
        if self.media_enabled and self.watcher is not None and not self.watcher.alive() and not self._stopping.is_set():
            self._restart("media watcher", self._watcher_backoff, self._start_watcher)
        if self.service is not None and not self.service.alive() and not self._stopping.is_set():
            self._restart("config service", self._service_backoff, self._start_service)

    def _restart(self, name: str, backoff: _Backoff, start: Any) -> None:
        if backoff.due is None:
            delay = backoff.failed()
            log.error("%s stopped; restarting it in %.0f s", name, delay)
            self._notes[name] = f"{name} restarting"
        elif backoff.is_due():
            try:
                start()
                backoff.started_now()
                self._notes.pop(name, None)
            except (OSError, ApplianceError) as exc:
                log.error("%s cannot start: %s", name, exc)
                backoff.failed()
                self._notes[name] = f"{name} down: {exc}"
            self._refresh.set()

    def _open_store(self) -> MediaJobs:
        """Open the store and make the media job worker; return it.

        Their modules load pydicom and numpy, seconds on the box's slow start: they are
        imported after the SCP is spawned, so the two processes load them side by side."""
        from appliance.jobs.media import MediaJobs
        from appliance.store.store import Store

        from appliance.jobs.forwarder import Forwarder

        self.store = Store(self.data_dir, slice_tolerance_mm=self.cfg.store.slice_tolerance_mm)
        self.store.set_forwarding(self.cfg.forward)  # for CD imports; the SCP sets its own
        self.jobs = MediaJobs(self.store, lambda: self.cfg, on_change=self._refresh.set)
        self.forwarder = Forwarder(self.store, lambda: self.cfg)
        return self.jobs

    # -- the SCP child --------------------------------------------------------------------

    def _start_scp(self, cfg: config.Config) -> ScpChild:
        self._generation += 1
        snapshot = self.runtime / f"scp-{self._generation}.toml"
        config.save(cfg, snapshot)
        sock = listen(cfg.scp)
        try:
            tls_sock = listen(cfg.scp, cfg.scp.tls_port) if cfg.scp.tls_port else None
        except ConfigError:
            sock.close()
            raise
        child = ScpChild(self._generation, cfg, sock, snapshot, tls_sock)
        self._spawn(child)
        if self._scp is None:
            self._scp = child
        return child

    def _spawn(self, child: ScpChild) -> None:
        assert self.listener is not None
        child.ready.clear()
        fd = child.sock.fileno()
        cmd = [sys.executable, "-m", "appliance", "--config", str(child.snapshot), "--data-dir", str(self.data_dir)]
        cmd += ["-v"] if self.verbosity == 1 else ["-d"] if self.verbosity >= 2 else []
        cmd += ["scp", "--listen-fd", str(fd)]
        fds: tuple[int, ...] = (fd,)
        if child.tls_sock is not None:
            cmd += ["--tls-listen-fd", str(child.tls_sock.fileno())]
            fds += (child.tls_sock.fileno(),)
        env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS")}
        env["NOTIFY_SOCKET"] = str(self.listener.path)
        env[config.SUPERVISOR_PID] = str(os.getpid())
        child.started_at = time.monotonic()
        child.report, child.report_at = {}, 0.0
        child.proc = subprocess.Popen(cmd, pass_fds=fds, env=env, stdin=subprocess.DEVNULL)
        self._by_pid = {pid: c for pid, c in self._by_pid.items() if c.proc and c.proc.poll() is None}
        self._by_pid[child.proc.pid] = child
        self._scp_backoff.started_now()
        log.info("started Storage SCP %s:%d as pid %d", child.cfg.scp.ae_title, child.port, child.proc.pid)

    def _receive_notifications(self) -> None:
        assert self.listener is not None
        while not self._stopping.is_set():
            note = self.listener.receive(0.5)
            if note is None:
                continue
            child = self._by_pid.get(note.pid) if note.pid is not None else None
            if child is None:
                continue
            if note.fields.get("READY") == "1":
                child.ready.set()
                self._notes.pop("scp", None)
                self._refresh.set()
            if note.fields.get("STOPPING") == "1":
                child.stopping.set()
            if "X_ACCEPTING" in note.fields:
                child.report = note.fields
                child.report_at = time.monotonic()
                if note.fields["X_ACCEPTING"] != "1" or note.fields.get("X_SELF_STORE", "ok") != "ok":
                    self._refresh.set()

    def _terminate(self, child: ScpChild) -> None:
        if child.proc is not None and child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)

    def _reap(self, child: ScpChild) -> bool:
        """Wait for a terminated SCP; kill it after STOP_TIMEOUT. True if it exited 0."""
        child.sock.close()
        if child.tls_sock is not None:
            child.tls_sock.close()
        if child.proc is None:
            return True
        try:
            return child.proc.wait(STOP_TIMEOUT) == 0
        except subprocess.TimeoutExpired:
            log.error("Storage SCP pid %d did not stop in %.0f s; killing it", child.proc.pid, STOP_TIMEOUT)
            child.proc.kill()
            child.proc.wait()
            return False

    def _switch_scp(self, new: config.Config, commit: Any) -> None:
        """Start an SCP on ``new``, commit, then retire the old one (its associations finish)."""
        old = self._scp
        child = self._start_scp(new)
        if not child.ready.wait(START_TIMEOUT) or child.proc is None or child.proc.poll() is not None:
            self._terminate(child)
            self._reap(child)
            child.snapshot.unlink(missing_ok=True)
            raise ConfigError(f"the Storage SCP did not start with the new settings (see the journal); "
                              f"the old settings stay in effect")
        try:
            commit()
        except ApplianceError:
            self._terminate(child)
            self._reap(child)
            child.snapshot.unlink(missing_ok=True)
            raise
        self._scp = child
        self.cfg = new
        if old is not None:
            old.retired = True
            self._retired.append(old)
            self._terminate(old)
            old.stopping.wait(2.0)  # its listener is closed: new associations reach the new SCP
            old.sock.close()
            if old.tls_sock is not None:
                old.tls_sock.close()
        problem = health.echo(health.loopback(new.scp.bind), child.port, new.scp.ae_title)
        if problem:
            log.warning("after the change: %s", problem)
        self._refresh.set()

    # -- config -----------------------------------------------------------------------------

    def current(self) -> config.Config:
        return self.cfg

    def plan(self, key: str, value: str) -> config.Config:
        _raw, cfg = self.cfile.plan(key, value)
        return cfg

    def set_key(self, key: str, value: str) -> str:
        """Set ``key`` in the file and apply it; the SCP is replaced when its settings change."""
        with self._cfg_lock:
            raw, new = self.cfile.plan(key, value)
            self._apply(new, lambda: self.cfile.write(raw))
        self._audit_change(f"{key} = {value}")
        shown = health.loopback(new.scp.bind)
        return f"{key} = {value} applied; Storage SCP {new.scp.ae_title} at {shown}:{new.scp.port}"

    def change(self, changes: dict[str, str | None]) -> str:
        """Set (or, for None, remove) several keys at once, validated together, and apply them."""
        with self._cfg_lock:
            raw, new = self.cfile.plan_changes(changes)
            self._apply(new, lambda: self.cfile.write(raw))
        self._audit_change("; ".join(f"{k} = {v}" if v is not None else f"{k} removed" for k, v in changes.items()))
        return f"{', '.join(changes)} applied"

    def _audit_change(self, what: str) -> None:
        """A configuration change in the audit trail (values of keys named like secrets are not written)."""
        audit.config_changed(self.data_dir, what, audit.Participant("application", user="config service"))

    def validate_file(self) -> config.Config:
        return self.cfile.load()

    def reload(self) -> None:
        """Re-read the file (SIGHUP) and apply it; an invalid file is reported, not applied."""
        self.notifier.reloading()
        with self._cfg_lock:
            try:
                new = self.cfile.load()
                self._apply(new, lambda: None)
                self._notes.pop("reload", None)
                log.info("configuration reloaded from %s", self.cfile.path)
                self._audit_change(f"reloaded from {self.cfile.path}")
            except ApplianceError as exc:
                log.error("configuration not reloaded: %s", exc)
                self._notes["reload"] = "config reload failed (see the journal)"
            except Exception as exc:  # noqa: BLE001 - a reload must never end the supervisor's reloads
                log.error("configuration not reloaded: unexpected %s: %s", type(exc).__name__, exc,
                          exc_info=log.isEnabledFor(logging.DEBUG))
                self._notes["reload"] = "config reload failed (see the journal)"
        self.notifier.send("READY=1")
        self._refresh.set()

    def _apply(self, new: config.Config, commit: Any) -> None:
        # The SCP process reads these when it starts: it runs retention, queues by the forwarding
        # rules, moves to the destinations (C-MOVE), serves Q/R if enabled, and TLS to known peers.
        if (new.scp, new.store, new.retention, new.forward, new.tls, new.peer, new.qr, new.destinations) != (
                self.cfg.scp, self.cfg.store, self.cfg.retention, self.cfg.forward, self.cfg.tls, self.cfg.peer,
                self.cfg.qr, self.cfg.destinations):
            self._switch_scp(new, commit)
        else:
            commit()
            self.cfg = new
        if self.store is not None:
            self.store.set_forwarding(self.cfg.forward)
        self._cert_checked_at = 0.0  # a new certificate may have come with the change

    # -- threads: config service, media watcher, self-check -------------------------------------

    def _start_service(self) -> None:
        self.service = ConfigService(self.runtime / SOCKET_NAME, self)
        self.service.start()

    def _start_watcher(self) -> None:
        assert self.jobs is not None
        self.watcher = MediaWatcher(self.jobs.submit)
        try:
            self.watcher.start()
        except OSError as exc:
            self._notes["media watcher"] = f"media watcher down: {exc.strerror or exc}"
            log.error("media watcher cannot start: %s", exc)

    def status(self) -> dict[str, Any]:
        """A fresh self-check, plus the children's pids."""
        h = self._check()
        d = h.to_dict()
        d["children"] = {"scp": self._scp.pid if self._scp else None}
        return d

    def _check(self) -> health.Health:
        child = self._scp
        port = child.port if child is not None and child.ready.is_set() else None
        assert self.store is not None and self.jobs is not None
        h = health.check(
            self.store,
            ae_title=self.cfg.scp.ae_title,
            host=health.loopback(self.cfg.scp.bind),
            port=port,
            activity=self.jobs.activity,
            notes=tuple(self._notes.values()) + tuple(self._certificate_notes()) + tuple(self._tls_port_notes(child)),
        )
        return self._with_scp_report(h)

    def _tls_port_notes(self, child: ScpChild | None) -> list[str]:
        """What is wrong with the TLS port, if the SCP serves one (a handshake on loopback)."""
        if child is None or child.tls_sock is None or not child.ready.is_set():
            return []
        port = int(child.tls_sock.getsockname()[1])
        problem = health.tls_probe(health.loopback(self.cfg.scp.bind), port)
        if problem:
            log.warning("self-check: %s", problem)
        return [problem] if problem else []

    def _certificate_notes(self) -> list[str]:
        """The box's TLS certificate ending within 30 days (or ended), in words; checked at most hourly."""
        now = time.monotonic()
        if now - self._cert_checked_at >= 3600 or self._cert_checked_at == 0.0:
            from appliance import tls

            self._cert_checked_at = now
            self._cert_notes = tls.expiry_problems(self.cfg.tls, self.data_dir)
            for note in self._cert_notes:
                log.warning("%s", note)
        return self._cert_notes

    def _with_scp_report(self, h: health.Health) -> health.Health:
        """``h`` with what the SCP last reported of itself: a C-ECHO answered does not prove
        that it accepts connections (its accept loop may have stopped) or can store."""
        child = self._scp
        if child is None or not child.ready.is_set() or child.proc is None or child.proc.poll() is not None:
            return h
        problem, detail = health.scp_report_view(child.report, time.monotonic() - child.report_at
                                                 if child.report_at else None,
                                                 time.monotonic() - child.started_at)
        if problem != self._scp_problem:
            if problem:
                log.error("Storage SCP: %s", problem)
            else:
                log.warning("Storage SCP: healthy again (was: %s)", self._scp_problem)
            self._scp_problem = problem
        return dataclasses.replace(h, scp_problem=problem, scp_detail=detail)

    def _check_loop(self) -> None:
        interval = min(watchdog_interval() or CHECK_INTERVAL, CHECK_INTERVAL)
        last_full = 0.0
        while not self._stopping.is_set():
            try:
                last_full = self._check_once(interval, last_full)
            except Exception:  # noqa: BLE001 - a failing check must not end the checks
                log.exception("self-check failed")
                self._last = None
            self._refresh.wait(interval if self._last is not None and self._last.scp_answered else 0.2)
            self._refresh.clear()

    def _check_once(self, interval: float, last_full: float) -> float:
        """Check (fully when due), feed the watchdog if healthy, send STATUS=; return when last full."""
        if time.monotonic() - last_full >= interval or self._last is None or not self._last.scp_answered:
            self._last = self._check()
            last_full = time.monotonic()
            if self._last.ok:
                self.notifier.watchdog()
        else:
            assert self.jobs is not None
            results = health.last_results(self.data_dir)
            self._last = self._with_scp_report(dataclasses.replace(
                self._last, activity=self.jobs.activity, notes=tuple(self._notes.values()),
                last_import=results.get("import"), last_export=results.get("export")))
        line = self._last.status_line()
        if self._last.scp_answered and not self._ready_sent:
            self._ready_sent = True
            self.notifier.ready(line)
            log.info("ready: %s", line)
        else:
            self.notifier.status(line)
        return last_full


def _exit(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"
