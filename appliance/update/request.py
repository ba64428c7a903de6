"""The files in :data:`~appliance.update.RUN_DIR` through which the sandboxed appliance service
(console, media job) and the root-run installer talk: ``request.json`` (install this, started by
appliance-update.path), ``offer.json`` (a stick with a release was inserted and waits for a
yes on the console) and ``progress.json`` (what the installer is doing, and its last result).
Each is written atomically (temp file, fsync, rename).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from appliance.files import write_atomic
from appliance.update import RUN_DIR

log = logging.getLogger(__name__)

REQUEST = "request.json"
OFFER = "offer.json"
PROGRESS = "progress.json"


def _write(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data).encode("utf-8"))


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("update: ignoring %s: %s", path, exc)
        return None
    return data if isinstance(data, dict) else None


def write_request(source: str, by: str, *, force: bool = False, run_dir: Path = RUN_DIR) -> None:
    """Ask the installer (appliance-update.service) to install from ``source`` (a device such
    as /dev/sdb1, a folder, or an http(s) URL); ``by`` says who asked, for the log."""
    _write(run_dir / REQUEST, {"source": source, "by": by, "force": force, "at": time.time()})


def read_request(run_dir: Path = RUN_DIR) -> dict[str, Any] | None:
    """The pending request (``source``, ``by``, ``force``, ``at``), or None."""
    data = _read(run_dir / REQUEST)
    if data is None or not isinstance(data.get("source"), str) or not data["source"]:
        return None
    return data


def remove_request(run_dir: Path = RUN_DIR) -> None:
    """Remove the request (the installer does, at the end, whatever the result)."""
    (run_dir / REQUEST).unlink(missing_ok=True)


def write_offer(source: str, version: str, run_dir: Path = RUN_DIR) -> None:
    """Offer ``version`` from ``source`` (an inserted stick) for a yes on the console."""
    _write(run_dir / OFFER, {"source": source, "version": version, "at": time.time()})


def read_offer(run_dir: Path = RUN_DIR) -> tuple[str, str] | None:
    """The pending offer as (source, version), or None."""
    data = _read(run_dir / OFFER)
    if data is None or not isinstance(data.get("source"), str) or not isinstance(data.get("version"), str):
        return None
    return data["source"], data["version"]


def clear_offer(run_dir: Path = RUN_DIR) -> None:
    """Withdraw the offer (the stick was removed, or the update was asked for)."""
    (run_dir / OFFER).unlink(missing_ok=True)


@dataclass(frozen=True)
class Progress:
    """Where an install stands; ``finished`` with ``ok`` True/False is its result."""

    version: str
    #: "checking", "verifying", "preparing", "writing", "labelling", "committing", "done", "failed".
    phase: str
    percent: int
    finished: bool
    ok: bool | None
    #: In words, e.g. "writing version 0.1.0.1 to slot B: 40 %".
    message: str
    #: time.time() of this state.
    updated: float


def write_progress(progress: Progress, run_dir: Path = RUN_DIR) -> None:
    """Record ``progress`` in progress.json."""
    _write(run_dir / PROGRESS, asdict(progress))


def read_progress(run_dir: Path = RUN_DIR) -> Progress | None:
    """The last recorded progress, or None."""
    data = _read(run_dir / PROGRESS)
    if data is None:
        return None
    try:
        return Progress(str(data["version"]), str(data["phase"]), int(data["percent"]), bool(data["finished"]),
                        None if data["ok"] is None else bool(data["ok"]), str(data["message"]),
                        float(data["updated"]))
    except (KeyError, TypeError, ValueError):
        return None
