"""Media jobs: a CD inserted is imported, a USB stick inserted is exported to; one job at a time.

:meth:`MediaJobs.submit` is what the media watcher calls: it only enqueues. One worker
thread runs the jobs in order, so two media never interleave. An insertion is recognised
once: a drive's duplicate ``change`` events for the same disc (tray open and close) are
dropped until the medium is removed or a different one appears. Each outcome is kept
(:func:`appliance.jobs.results.record_result`) for ``STATUS=`` and ``appliance status``.
"""

from __future__ import annotations

import logging
import queue
import threading
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

log = logging.getLogger(__name__)

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


class MediaJobs:
    """Runs media jobs one at a time on ``store`` under the config ``settings()`` returns."""

    def __init__(
        self,
        store: Store,
        settings: Callable[[], Config],
        *,
        on_change: Callable[[], None] = lambda: None,
        export: Exporter | None = None,
    ) -> None:
        self.store = store
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
            else:
                ok, summary = self._export(event)
        except ApplianceError as exc:
            ok, summary = False, str(exc)
        log.log(logging.INFO if ok else logging.WARNING, "%s %s: %s", kind, "done" if ok else "failed", summary)
        return results.JobResult(kind, ok, summary, event.device)

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
