"""The service (root) password kept on the data partition, so that it survives an update.

The password lives in ``/etc/shadow`` on the system slot, and an update boots another slot
whose ``/etc/shadow`` has none: without this, the service shell would be closed after every
update and the console's first-start question would come back. :func:`sync` keeps root's hash
in ``DATA_DIR/service-password`` (0600) and brings the two together:

- only the record has one (a new slot after an update): the record is applied to
  ``/etc/shadow`` (``usermod -p``);
- only ``/etc/shadow`` has one (set before this existed, or the data partition was formatted
  by a factory reset): it is recorded;
- both, and they differ: the newer one wins (``passwd`` in the service shell changes
  ``/etc/shadow`` after the record was made; a new slot's ``/etc/shadow`` is as old as its build).

appliance-service-password.service runs it at every start (before the console) and stop,
and the console after it set the password. A factory reset formats the data partition but
leaves the running slot's ``/etc/shadow``: the service password survives it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from appliance.errors import ApplianceError
from appliance.files import write_atomic
from appliance.ops.factoryreset import SHADOW, Runner, root_hash, run_command

log = logging.getLogger(__name__)

#: Root's password hash, one line, in the data folder.
RECORD = "service-password"


class ServicePasswordError(ApplianceError):
    """The service password could not be recorded or restored (said in words)."""


def _record(data_dir: Path) -> tuple[str, float]:
    path = data_dir / RECORD
    try:
        return path.read_text(encoding="utf-8").strip(), path.stat().st_mtime
    except FileNotFoundError:
        return "", 0.0
    except OSError as exc:
        raise ServicePasswordError(f"cannot read the kept service password {path}: {exc.strerror}") from None


def save(data_dir: Path, hashed: str) -> None:
    """Keep ``hashed`` in ``data_dir`` (0600, written whole and flushed, then renamed)."""
    path = data_dir / RECORD
    try:
        write_atomic(path, (hashed + "\n").encode(), 0o600)
    except OSError as exc:
        raise ServicePasswordError(f"cannot keep the service password in {path}: {exc.strerror}") from None


def sync(data_dir: Path, shadow: Path = SHADOW, runner: Runner = run_command) -> str:
    """Bring root's password in ``shadow`` and the one kept in ``data_dir`` together; say what was done."""
    current = root_hash(shadow)
    kept, kept_at = _record(data_dir)
    if current == kept:
        return "the service password is set" if current else "no service password is set"
    newer_shadow = bool(current) and (not kept or shadow.stat().st_mtime > kept_at)
    if newer_shadow:
        save(data_dir, current)
        log.info("service password: kept on the data partition (it survives updates)")
        return "the service password is kept on the data partition"
    try:
        r = runner(["usermod", "-p", kept, "root"])
    except OSError as exc:
        raise ServicePasswordError(f"cannot restore the service password: usermod: {exc.strerror}") from None
    if r.returncode != 0:
        why = (r.stderr or r.stdout or "").strip().splitlines()
        raise ServicePasswordError("cannot restore the service password: usermod answered "
                                   f"{why[-1] if why else f'exit code {r.returncode}'}")
    log.info("service password: restored from the data partition (this system slot had %s)",
             "another one" if current else "none")
    return "the service password was restored from the data partition"


__all__ = ["RECORD", "ServicePasswordError", "save", "sync"]
