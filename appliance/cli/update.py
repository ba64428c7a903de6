"""``appliance update``: the system version, checking and installing a release, the boot check.

``apply --request`` is what appliance-update.service (root) runs when the console or the
media job wrote /run/appliance-update/request.json: a device source (a USB stick's partition)
is mounted read-only in a private folder for the install and unmounted after it, and the
request is removed whatever the result, so the path unit does not start the service again.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

from appliance.cli.common import data_dir, load_config
from appliance.config import Config
from appliance.errors import ConfigError
from appliance.update import (
    EFIVARS,
    ESP,
    KEYS_DIR,
    OS_RELEASE,
    RUN_DIR,
    STICK_FOLDER,
    UpdateError,
    running_version,
)

log = logging.getLogger(__name__)


def _paths(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    return Path(args.esp), Path(args.os_release), Path(args.run_dir)


def cmd_status(args: argparse.Namespace) -> int:
    """Print the running version, the other slot's and the last update's result."""
    from appliance.update.boot import version_info
    from appliance.update.request import read_offer, read_progress

    esp, os_release, run_dir = _paths(args)
    for line in version_info(esp, os_release).lines():
        print(line)
    progress = read_progress(run_dir)
    if progress is not None:
        print(f"Installer: {progress.message}" if progress.finished else f"Installing: {progress.message}")
    offer = read_offer(run_dir)
    if offer is not None:
        print(f"Offered: version {offer[1]} from {offer[0]} (waiting for a yes on the console)")
    return 0


def _source(args: argparse.Namespace) -> str:
    if args.source:
        return str(args.source)
    url = load_config(args).update.url
    if not url:
        raise UpdateError("say where the release is: --source FOLDER or URL, or set update.url in the config file")
    return url


def cmd_check(args: argparse.Namespace) -> int:
    """Read and verify the release at the source; say whether it is newer than the running version."""
    from appliance.update.release import read_release
    from appliance.update.versions import compare

    release = read_release(_source(args), Path(args.keys))
    running = running_version(Path(args.os_release))
    order = compare(release.version, running)
    print(f"version {release.version} is available at {release.source} (signature good); running {running}: "
          + ("newer, it can be installed" if order > 0 else "the same version" if order == 0 else "older"))
    return 0


def _install(args: argparse.Namespace, source: str, force: bool) -> str:
    from appliance.update.install import install
    from appliance.update.slots import running_disk

    cfg = load_config(args)
    disk = Path(args.disk) if args.disk else running_disk()
    return install(source, disk=disk, esp=Path(args.esp), keys_dir=Path(args.keys), tries=cfg.update.boot_tries,
                   running=running_version(Path(args.os_release)), force=force, run_dir=Path(args.run_dir))


def _mounted_release(device: str, stack: list[Path]) -> str:
    """Mount ``device`` read-only in a private folder (remembered in ``stack``); return its release folder."""
    from appliance.update.release import stick_release_dir

    where = Path(tempfile.mkdtemp(prefix="appliance-update-"))
    stack.append(where)
    done = subprocess.run(["mount", "-o", "ro,nosuid,nodev,noexec", device, str(where)], capture_output=True,
                          text=True, timeout=120, check=False)
    if done.returncode != 0:
        stack.pop()
        where.rmdir()
        raise UpdateError(f"cannot mount {device}: {done.stderr.strip() or f'mount exit code {done.returncode}'}")
    folder = stick_release_dir(where)
    if folder is None:
        raise UpdateError(f"{device} holds no {STICK_FOLDER} folder with a release (SHA256SUMS)")
    return str(folder)


def _say(message: str) -> None:
    """Print a result the updater also logs, unless the log already shows it (the units log at
    INFO to the journal, where a second copy of the line would only repeat it)."""
    if not logging.getLogger("appliance.update").isEnabledFor(logging.INFO):
        print(message)


def cmd_apply(args: argparse.Namespace) -> int:
    """Install a release into the inactive slot; with --request, the one request.json asks for."""
    from appliance.update.request import clear_offer, read_request, remove_request

    run_dir = Path(args.run_dir)
    if not args.request:
        source = _source(args)
        if not args.yes:
            if not sys.stdin.isatty():
                raise UpdateError("installing needs a confirmation: add --yes (no terminal to ask on)")
            answer = input(f"Install the release at {source} into the other system slot?\nType yes to install: ")
            if answer.strip().lower() != "yes":
                print("nothing installed")
                return 1
        _say(_install(args, source, args.force))
        return 0
    request = read_request(run_dir)
    if request is None:
        remove_request(run_dir)
        print(f"no update request in {run_dir}; nothing to do")
        return 0
    mounted: list[Path] = []
    try:
        clear_offer(run_dir)
        source = str(request["source"])
        if source.startswith("/dev/"):
            source = _mounted_release(source, mounted)
        _say(_install(args, source, bool(request.get("force", False)) or args.force))
    finally:
        for where in mounted:
            subprocess.run(["umount", str(where)], capture_output=True, timeout=120, check=False)
            try:
                where.rmdir()
            except OSError:
                pass
        remove_request(run_dir)
    return 0


def cmd_boot_check(args: argparse.Namespace) -> int:
    """Wait for the appliance to become healthy; bless the boot, or restart a counted boot that is not."""
    from appliance.config import plain_bind
    from appliance.ops.health import loopback
    from appliance.update.boot import boot_check

    try:
        cfg = load_config(args)
    except ConfigError as exc:
        # The appliance cannot start with it either: the service's state decides, and a counted
        # boot is still restarted.
        log.warning("update: %s; checking the default port", exc)
        cfg = Config()
    result = boot_check(host=loopback(plain_bind(cfg.scp)), port=cfg.scp.port, ae_title=cfg.scp.ae_title,
                        data_dir=data_dir(args), esp=Path(args.esp), efivars=Path(args.efivars),
                        os_release=Path(args.os_release), timeout=args.timeout)
    _say(result.message)
    return 0 if result.healthy else 1


def add_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    s = subparsers.add_parser("update", help="system version, checking and installing updates")
    sub = s.add_subparsers(dest="update_command", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser) -> None:
        # Paths of the box; tests point them elsewhere.
        p.add_argument("--esp", default=str(ESP), help=argparse.SUPPRESS)
        p.add_argument("--os-release", default=str(OS_RELEASE), help=argparse.SUPPRESS)
        p.add_argument("--run-dir", default=str(RUN_DIR), help=argparse.SUPPRESS)

    p = sub.add_parser("status", help="the running version, the other slot's, the last update's result")
    common(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("check", help="read and verify a release; say whether it is newer")
    p.add_argument("--source", metavar="DIR|URL", help="a release folder or http(s) URL (default: update.url)")
    p.add_argument("--keys", default=str(KEYS_DIR), help=argparse.SUPPRESS)
    common(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("apply", help="install a release into the other system slot")
    p.add_argument("--source", metavar="DIR|URL", help="a release folder or http(s) URL (default: update.url)")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--force", action="store_true", help="also an older version, or one that failed before")
    p.add_argument("--request", action="store_true",
                   help="install what /run/appliance-update/request.json asks for (appliance-update.service)")
    p.add_argument("--disk", metavar="PATH", help=argparse.SUPPRESS)
    p.add_argument("--keys", default=str(KEYS_DIR), help=argparse.SUPPRESS)
    common(p)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("boot-check", help="after boot: bless a healthy new version, restart an unhealthy one")
    p.add_argument("--timeout", type=float, default=180.0, metavar="S", help="how long to wait (default 180)")
    p.add_argument("--efivars", default=str(EFIVARS), help=argparse.SUPPRESS)
    common(p)
    p.set_defaults(func=cmd_boot_check)
