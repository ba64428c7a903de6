"""Media jobs: a CD inserted is imported, a USB stick inserted is exported to; one job at a time.

:meth:`MediaJobs.submit` is what the media watcher calls: it only enqueues. One worker
thread runs the jobs in order, so two media never interleave. An insertion is recognised
once: a drive's duplicate ``change`` events for the same disc (tray open and close) are
dropped until the medium is removed or a different one appears. Each outcome is kept
(:func:`appliance.jobs.results.record_result`) for ``STATUS=`` and ``appliance status``.

A USB stick holding an update (an ``appliance-update`` folder with a ``SHA256SUMS``, issue 21)
is not exported to: its release is checked (the signature by a trusted key) and offered on
the console (:func:`appliance.update.request.write_offer`), or, with ``[update]
auto_from_usb``, asked for at once (:func:`~appliance.update.request.write_request`); the
root-run installer does the rest. The stick is looked at mounted read-only, then unmounted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

from appliance.jobs import results
from appliance.config import Config
from appliance.adapters.devices import Change, MediaEvent, MediumKind
from appliance.errors import ApplianceError, MediaError
from appliance.media.importer import keep_report, run_import
from appliance.reports import Progress
from appliance.store.ingest import Ingest
from appliance.store.retention import Retention
from appliance.store.store import Store
from appliance.update import KEYS_DIR, OS_RELEASE, RUN_DIR, UpdateError, running_version
from appliance.update.release import read_release, stick_release_dir
from appliance.update.request import clear_offer, read_offer, write_offer, write_request
from appliance.update.versions import compare

log = logging.getLogger(__name__)

#: The kind of job result (:class:`~appliance.jobs.results.JobResult`) of a stick holding an update.
UPDATE_STICK = "update stick"
#: What the USB export is called with; ``appliance.media.exporter.export`` when it is present.
Exporter = Callable[..., Any]


class _Cancelled(MediaError):
    """The appliance is stopping; the job ends between two objects."""


def usb_exporter() -> Exporter | None:
    """The USB writer of issue 5 (``appliance.media.exporter.export``), or None in a build without it."""
    try:
        from appliance.media import exporter
    except ImportError:
        return None
    return exporter.export


@contextlib.contextmanager
def peek(device: Path) -> Iterator[Path | None]:
    """The stick ``device`` as a folder to read: a folder is itself, a block device is mounted
    read-only (and unmounted after); None for anything else (a FAT image file) or a stick
    that cannot be mounted (the export then says why)."""
    try:
        mode = device.stat().st_mode
    except OSError:
        yield None
        return
    if stat.S_ISDIR(mode):
        yield device
        return
    if not stat.S_ISBLK(mode):
        yield None
        return
    mountpoint = Path(tempfile.mkdtemp(prefix="appliance-peek-"))
    done = subprocess.run(["mount", "-o", "ro,nosuid,nodev,noexec", str(device), str(mountpoint)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        log.debug("cannot mount %s read-only to look for an update: %s", device, done.stderr.strip())
        mountpoint.rmdir()
        yield None
        return
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=False)
        with contextlib.suppress(OSError):
            os.rmdir(mountpoint)


class MediaJobs:
    """Runs media jobs one at a time on ``store`` under the config ``settings()`` returns."""

    def __init__(
        self,
        store: Store,
        settings: Callable[[], Config],
        *,
        on_change: Callable[[], None] = lambda: None,
        export: Exporter | None = None,
        update_keys: Path = KEYS_DIR,
        update_run_dir: Path = RUN_DIR,
        os_release: Path = OS_RELEASE,
    ) -> None:
        self.store = store
        #: The trusted keys a stick's release must be signed by, and where offers and requests go.
        self.update_keys = update_keys
        self.update_run_dir = update_run_dir
        #: The running system's os-release: a stick's version not newer than it is not offered.
        self.os_release = os_release
        self.settings = settings
        self.on_change = on_change
        self.export = export if export is not None else usb_exporter()
        self.results: list[results.JobResult] = []
        self._queue: queue.Queue[MediaEvent | None] = queue.Queue()
        self._present: dict[str, str] = {}
        self._lock = threading.Lock()
        self._job = threading.Lock()  # held while a job runs: one at a time
        self._activity = ""
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the watcher's side --------------------------------------------------------------

    def submit(self, event: MediaEvent) -> bool:
        """Queue the job ``event`` calls for; return False for a duplicate or a removal."""
        with self._lock:
            if event.change is Change.REMOVED:
                self._present.pop(event.key, None)
                offer = read_offer(self.update_run_dir)
                if offer is not None and offer[0] == event.device:
                    clear_offer(self.update_run_dir)
                    log.info("update offer withdrawn: the USB stick in %s was removed", event.device)
                return False
            if self._present.get(event.key) == event.identity:
                log.debug("%s in %s already seen; ignoring the repeated event", event.kind, event.device)
                return False
            self._present[event.key] = event.identity
        self._queue.put(event)
        return True

    # -- the worker --------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="media-jobs", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def activity(self) -> str:
        return self._activity

    def idle(self) -> bool:
        """True when no job runs or waits."""
        return self._queue.unfinished_tasks == 0

    def stop(self, timeout: float = 20.0) -> None:
        """Take no new jobs; let the running one end between two objects; wait up to ``timeout`` s."""
        self._stopping.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("media job still running after %.0f s; stopping without waiting", timeout)

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            try:
                if event is None or self._stopping.is_set():
                    return
                with self._job:
                    result = self.run(event)
                self.results.append(result)
                results.record_result(self.store.data_dir, result)
            except Exception:  # noqa: BLE001 - a job's bug must not end the worker
                log.exception("media job for %s failed", event)
            finally:
                self._activity = ""
                self._queue.task_done()
                self.on_change()

    def run(self, event: MediaEvent) -> results.JobResult:
        """Run the job for ``event`` now, on this thread; return its outcome."""
        kind = "import" if event.kind is MediumKind.CD else "export"
        try:
            if event.kind is MediumKind.CD:
                ok, summary = self._import(event)
            elif (update := self._update_stick(event)) is not None:
                return update
            else:
                ok, summary = self._export(event)
        except ApplianceError as exc:
            ok, summary = False, str(exc)
        log.log(logging.INFO if ok else logging.WARNING, "%s %s: %s", kind, "done" if ok else "failed", summary)
        return results.JobResult(kind, ok, summary, event.device)

    def _update_stick(self, event: MediaEvent) -> results.JobResult | None:
        """If the stick holds an update, check it and offer it (or ask for it, with
        ``update.auto_from_usb``) and return the outcome; None for a stick to export to."""
        with peek(Path(event.device)) as root:
            folder = stick_release_dir(root) if root is not None else None
            if folder is None:
                return None
            label = event.label or event.device
            self._activity = f"checking the update on USB '{label}'"
            self.on_change()
            try:
                release = read_release(folder, keys_dir=self.update_keys)
            except UpdateError as exc:
                log.warning("update refused: %s", exc)
                return results.JobResult(UPDATE_STICK, False, f"update refused: {exc}", event.device)
        where = f"USB stick '{label}'"
        try:
            running: str | None = running_version(self.os_release)
        except UpdateError:
            running = None  # not the appliance image: nothing to compare with; the installer decides
        if running is not None and compare(release.version, running) <= 0:
            said = f"update not offered: version {release.version} on {where} is not newer than the running {running}"
        elif self.settings().update.auto_from_usb:
            write_request(event.device, by="usb auto", run_dir=self.update_run_dir)
            said = (f"update requested: version {release.version} from {where} (install automatically from USB "
                    "is on)")
        else:
            write_offer(event.device, release.version, run_dir=self.update_run_dir)
            said = f"update offered: version {release.version} on {where}; install it on the console (menu u)"
        log.info("%s", said)
        return results.JobResult(UPDATE_STICK, True, said, event.device)

    def _progress(self, what: str, cancellable: bool) -> Callable[[Progress], None]:
        """Show ``what`` and how far it is; a cancellable job ends between two objects at shutdown."""

        def show(p: Progress) -> None:
            if cancellable and self._stopping.is_set():
                raise _Cancelled(f"{what} interrupted by shutdown after {p.files_done} of {p.files_total} files")
            self._activity = f"{what} {p.files_done}/{p.files_total} files"
            self.on_change()

        return show

    def _import(self, event: MediaEvent) -> tuple[bool, str]:
        cfg = self.settings()
        what = f"importing CD '{event.label}'"
        self.store.set_forwarding(cfg.forward)
        self._activity = what
        self.on_change()
        report = run_import(
            Path(event.device),
            Ingest(self.store, cfg.store, make_room=Retention(self.store, cfg.retention,
                                                              cfg.store.min_free_mb * 2**20).make_room),
            eject_after=cfg.media.eject_after_import,
            progress=self._progress(what, cancellable=True),
        )
        try:
            keep_report(report, self.store.data_dir / "imports")
        except MediaError as exc:
            log.warning("%s", exc)
        return report.ok, report.summary()

    def _export(self, event: MediaEvent) -> tuple[bool, str]:
        if self.export is None:
            raise MediaError(
                f"USB stick in {event.device} not written: this build has no USB writer (appliance.media.exporter)"
            )
        cfg = self.settings()
        what = f"exporting to USB '{event.label}'"
        self._activity = what
        self.on_change()
        report = self.export(Path(event.device), self.store, cfg, progress=self._progress(what, cancellable=False))
        ok = bool(getattr(report, "ok", True))
        summary = report.summary() if callable(getattr(report, "summary", None)) else str(report)
        return ok, summary
