"""The last result of each kind of media job (a CD import, a USB export), kept in
``DATA_DIR/last-media.json`` so that ``STATUS=``, ``appliance status`` and the console show
it across restarts."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)

_RESULTS_FILE = "last-media.json"


@dataclass(frozen=True)
class JobResult:
    """The outcome of one media job (a CD import or a USB export)."""

    kind: str  # "import" or "export"
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
    results = {k: asdict(v) for k, v in last_results(data_dir).items()}
    results[result.kind] = asdict(result)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        log.error("cannot keep the %s result in %s: %s", result.kind, path, exc.strerror)


def last_results(data_dir: Path) -> dict[str, JobResult]:
    """The last import and export results, by kind (empty when there were none)."""
    try:
        data = json.loads((data_dir / _RESULTS_FILE).read_text(encoding="utf-8"))
        return {k: JobResult(**v) for k, v in data.items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError) as exc:
        log.warning("cannot read the last media results in %s: %s", data_dir, exc)
        return {}
