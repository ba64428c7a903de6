"""The last result of each kind of job (a CD import, a USB export, a send to a destination
started on the console), kept in ``DATA_DIR/last-media.json`` so that ``STATUS=``,
``appliance status`` and the console show it across restarts."""

from __future__ import annotations

import fcntl
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)

_RESULTS_FILE = "last-media.json"
#: Held while the file is read and rewritten: a send job and the supervisor's media jobs are
#: different processes, and neither may drop the other's result.
_LOCK_FILE = ".last-media.lock"


@dataclass(frozen=True)
class JobResult:
    """The outcome of one job (a CD import, a USB export or a send)."""

    kind: str  # "import", "export" or "send"
    ok: bool
    summary: str
    device: str
    finished_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def short(self) -> str:
        return f"last {self.kind} {'OK' if self.ok else 'FAILED'}"


def record_result(data_dir: Path, result: JobResult) -> None:
    """Keep ``result`` as the last one of its kind (temp file, fsync, rename)."""
    path = data_dir / _RESULTS_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        lock = os.open(data_dir / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            results = {k: asdict(v) for k, v in last_results(data_dir).items()}
            results[result.kind] = asdict(result)
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(results, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            os.close(lock)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        log.error("cannot keep the %s result in %s: %s", result.kind, path, exc.strerror)


def last_results(data_dir: Path) -> dict[str, JobResult]:
    """The last import, export and send results, by kind (empty when there were none)."""
    try:
        data = json.loads((data_dir / _RESULTS_FILE).read_text(encoding="utf-8"))
        return {k: JobResult(**v) for k, v in data.items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError) as exc:
        log.warning("cannot read the last media results in %s: %s", data_dir, exc)
        return {}
