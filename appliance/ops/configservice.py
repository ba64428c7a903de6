"""The local config service and the ``appliance config`` and ``appliance status`` commands.

While ``appliance run`` runs, it answers on a Unix stream socket (``RUNTIME_DIR/config.sock``,
mode 0660, group ``appliance``) one JSON object per line::

    {"op": "get", "key": "scp.port"}             -> {"ok": true, "result": 104}
    {"op": "set", "key": "scp.port", "value": "11112"}
    {"op": "validate", "key": ..., "value": ...} (a dry run; without key: the file on disk)
    {"op": "show"} / {"op": "status"}
    any failure                                  -> {"ok": false, "error": "...", "kind": "ConfigError"}

A ``set`` is validated against the whole file, applied (the supervisor restarts the SCP on
the new settings when they concern it) and only then written. Without a running service the
commands read and edit the file themselves. Either way the file is written atomically, and
only the key that was set changes: a file holding only ``[scp] port`` stays that short.

A list of tables (``[[forward]]``, ``[[peer]]``: :data:`LIST_KEYS`) has no key per value: it
is set whole, its value a JSON (or TOML) array of tables, ``{"op": "set", "key": "forward",
"value": "[{\"to\": [\"PACS\"]}]"}``; an empty array removes every table of it. Keys that
only go together (``tls.certificate`` and ``tls.private_key``) are set in one ``change``.
"""

from __future__ import annotations

import argparse
import grp
import json
import logging
import os
import socket
import socketserver
import struct
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

from appliance import config
from appliance.errors import ApplianceError, ConfigError

log = logging.getLogger(__name__)

#: Where the service's socket lives on the box (systemd's RuntimeDirectory=appliance).
DEFAULT_RUNTIME_DIR = Path("/run/appliance")
SOCKET_NAME = "config.sock"
#: Members of this group may use the socket (and so change the config) without being root.
SOCKET_GROUP = "appliance"
_MAX_LINE = 1 << 20
_CLIENT_TIMEOUT = 90.0  # a set may restart the SCP, whose in-flight associations get 10 s
#: Top-level keys whose value is a list of tables (``[[forward]]``, ``[[peer]]``): set whole,
#: never one key of one table.
LIST_KEYS = ("forward", "peer")
#: An example of each list's value, for the message that says what is expected.
_LIST_EXAMPLES = {"forward": '[{to = ["PACS"]}]', "peer": '[{ae_title = "CT_SIM", addresses = ["192.168.1.31"]}]'}


def runtime_dir(explicit: str | None = None) -> Path:
    """``--runtime-dir``, else ``$APPLIANCE_RUNTIME_DIR``, ``$RUNTIME_DIRECTORY`` (systemd), /run/appliance."""
    for value in (explicit, os.environ.get("APPLIANCE_RUNTIME_DIR"), os.environ.get("RUNTIME_DIRECTORY")):
        if value:
            return Path(value.split(":")[0])
    return DEFAULT_RUNTIME_DIR


# -- keys and values -------------------------------------------------------------------------


def get_key(cfg: config.Config, key: str) -> Any:
    """The value of dotted ``key`` (``scp.port``, ``destinations.pacs.host``, ``scp``) in ``cfg``."""
    node: Any = config.to_dict(cfg)
    if key in LIST_KEYS:  # to_dict leaves an empty list of tables out, as the file does
        return node.get(key, [])
    for i, part in enumerate(key.split(".")):
        if not isinstance(node, dict) or part not in node:
            where = ".".join(key.split(".")[:i]) or "the file"
            known = ", ".join(node) if isinstance(node, dict) and node else "none"
            raise ConfigError(f"'{key}' is not a setting; known keys under {where}: {known}")
        node = node[part]
    return node


def parse_value(key: str, text: str, current: Any) -> Any:
    """Turn ``text`` from the command line into the type of ``current`` (the key's present value)."""
    try:
        if isinstance(current, bool):
            low = text.strip().lower()
            if low in ("true", "yes", "on", "1"):
                return True
            if low in ("false", "no", "off", "0"):
                return False
            raise ValueError(f"'{text}' is not true or false")
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, list):
            if text.strip().startswith("["):
                return tomllib.loads(f"v = {text}")["v"]
            return [v.strip() for v in text.split(",") if v.strip()]
        if isinstance(current, str):
            return text
        try:  # a new key (e.g. a new destination's): a TOML value, else a string
            return tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            return text
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        kind = type(current).__name__ if current is not None else "value"
        raise ConfigError(f"{key}: cannot use '{text}' as a {kind} ({exc})") from None


def parse_tables(key: str, text: str) -> list[dict[str, Any]]:
    """Turn ``text``, a JSON or TOML array of tables, into the list for ``[[key]]``; raise
    ConfigError saying what is expected."""
    value: Any
    try:
        value = json.loads(text)
    except ValueError:
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ConfigError(f"{key} takes the whole list of [[{key}]] tables, an array of tables such as "
                          f"{_LIST_EXAMPLES.get(key, '[{...}]')} ([] removes them all); '{text[:60]}' is not one")
    return value


class ConfigFile:
    """The TOML file at ``path`` (None: the box's default), read and changed one key at a time."""

    def __init__(self, path: Path | None) -> None:
        self.explicit = path is not None
        self.path = path or config.DEFAULT_CONFIG_PATH

    def load(self) -> config.Config:
        return config.load(self.path if self.explicit else None)

    def raw(self) -> dict[str, Any]:
        if not self.path.exists() and not self.explicit:
            return {}
        return config.read_toml(self.path)

    def plan(self, key: str, text: str) -> tuple[dict[str, Any], config.Config]:
        """The file's tables with ``key`` set to ``text``, and the config they make; nothing is written.

        Raises ConfigError naming every problem of the resulting file."""
        return self.plan_changes({key: text})

    def plan_changes(self, changes: Mapping[str, str | None]) -> tuple[dict[str, Any], config.Config]:
        """Like :meth:`plan` for several keys at once (None removes a key or table, e.g. a
        destination): the file is validated once, with all of them applied."""
        raw = self.raw()
        try:
            loaded: config.Config | None = self.load()
        except ConfigError:
            loaded = None
        for key, text in changes.items():
            if key in LIST_KEYS:
                tables = [] if text is None else parse_tables(key, text)
                if tables:
                    raw[key] = tables
                else:
                    raw.pop(key, None)
                continue
            parts = key.split(".")
            if len(parts) < 2 or not all(parts):
                raise ConfigError(f"'{key}' is not a setting; address one as TABLE.KEY, e.g. scp.port, "
                                  f"or a list of tables whole ({', '.join(LIST_KEYS)})")
            try:
                current = get_key(loaded, key) if loaded is not None else None
            except ConfigError:
                current = None
            if isinstance(current, dict) and text is not None:
                raise ConfigError(f"'{key}' is a table; set one of its keys, e.g. {key}.{next(iter(current), 'KEY')}")
            node = raw
            for part in parts[:-1]:
                child = node.setdefault(part, {})
                if not isinstance(child, dict):
                    raise ConfigError(f"'{key}': {part} is not a table in {self.path}")
                node = child
            if text is None:
                node.pop(parts[-1], None)
            else:
                node[parts[-1]] = parse_value(key, text, current)
        try:
            cfg = config.from_dict(raw)
        except ConfigError as exc:
            what = ", ".join(_what(k, t) for k, t in changes.items())
            raise ConfigError(f"{what} not applied: {exc}") from None
        return raw, cfg

    def write(self, raw: dict[str, Any]) -> None:
        try:
            config.save_table(raw, self.path)
        except OSError as exc:
            raise ConfigError(f"cannot write config file {self.path}: {exc.strerror}") from None


def _what(key: str, text: str | None) -> str:
    """A change in the words of an error: ``scp.port = '0'``, ``removing destinations.pacs``,
    ``[[forward]] (2 tables)``."""
    if key in LIST_KEYS:
        n = len(parse_tables(key, text)) if text is not None else 0
        return f"[[{key}]] ({n} table{'' if n == 1 else 's'})"
    return f"{key} = {text!r}" if text is not None else f"removing {key}"


# -- the service -------------------------------------------------------------------------------


class Backend(Protocol):
    """What the service asks of the running appliance (the supervisor)."""

    def current(self) -> config.Config: ...

    def set_key(self, key: str, value: str) -> str: ...

    def change(self, changes: dict[str, str | None]) -> str: ...

    def plan(self, key: str, value: str) -> config.Config: ...

    def validate_file(self) -> config.Config: ...

    def status(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Request:
    op: str
    key: str | None
    value: str | None
    uid: int | None


class ConfigService:
    """Answers requests on a Unix socket at ``path`` in background threads, until :meth:`stop`."""

    def __init__(self, path: Path, backend: Backend) -> None:
        self.path = path
        self.backend = backend
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        service = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                uid = _peer_uid(self.request)
                for line in self.rfile:
                    if len(line) > _MAX_LINE:
                        break
                    answer = service.answer(line, uid)
                    self.wfile.write(json.dumps(answer).encode() + b"\n")
                    self.wfile.flush()

        class Server(socketserver.ThreadingUnixStreamServer):
            daemon_threads = True

        self._server = Server(str(path), Handler)
        _restrict(path)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, name="config-service", daemon=True)
        self._thread.start()
        log.info("config service listening on %s", self.path)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
        self._server.server_close()
        self.path.unlink(missing_ok=True)

    def answer(self, line: bytes, uid: int | None) -> dict[str, Any]:
        """Answer one request line; errors become ``{"ok": false, ...}``, never an exception."""
        try:
            msg = json.loads(line)
            if not isinstance(msg, dict):
                raise ValueError("not an object")
            req = Request(str(msg.get("op", "")), msg.get("key"), msg.get("value"), uid)
        except ValueError as exc:
            return {"ok": False, "error": f"request is not a JSON object on one line: {exc}", "kind": "ApplianceError"}
        try:
            return {"ok": True, "result": self._dispatch(req)}
        except ApplianceError as exc:
            return {"ok": False, "error": str(exc), "kind": type(exc).__name__}
        except Exception as exc:  # noqa: BLE001 - a bad request must not take the service down
            log.exception("config service: %s failed", req.op)
            return {"ok": False, "error": f"internal error: {exc!r}; see the journal", "kind": "ApplianceError"}

    def _dispatch(self, req: Request) -> Any:
        b = self.backend
        if req.op == "show":
            return config.to_dict(b.current())
        if req.op == "get":
            return get_key(b.current(), str(req.key))
        if req.op == "set":
            if req.key is None or req.value is None:
                raise ConfigError("set needs a key and a value")
            log.info("config set %s = %r (requested by uid %s)", req.key, req.value, req.uid)
            return b.set_key(str(req.key), str(req.value))
        if req.op == "change":  # several keys at once, validated together; a null value removes the key
            if not isinstance(req.value, dict) or not req.value:
                raise ConfigError("change needs a value: an object of KEY: VALUE (null removes KEY)")
            log.info("config change %s (requested by uid %s)", req.value, req.uid)
            return b.change({str(k): None if v is None else str(v) for k, v in req.value.items()})
        if req.op == "validate":
            if req.key is None:
                b.validate_file()
                return "the config file is valid"
            b.plan(str(req.key), str(req.value))
            return f"{req.key} = {req.value} is valid"
        if req.op == "status":
            return b.status()
        raise ApplianceError(f"unknown request '{req.op}'; use show, get, set, validate or status")


def _peer_uid(sock: socket.socket) -> int | None:
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return int(struct.unpack("3i", creds)[1])
    except OSError:
        return None


def _restrict(path: Path) -> None:
    """Make the socket 0660, owned by root and group ``appliance`` where that group exists."""
    os.chmod(path, 0o660)
    if os.geteuid() == 0:
        try:
            os.chown(path, 0, grp.getgrnam(SOCKET_GROUP).gr_gid)
        except KeyError:
            log.warning("group '%s' does not exist; only root may use %s", SOCKET_GROUP, path)


# -- client ------------------------------------------------------------------------------------


def request(path: Path, op: str, **fields: Any) -> Any:
    """Send one request to the service at ``path``; return its result.

    Raises FileNotFoundError/ConnectionRefusedError when no service runs there (the caller
    then works on the file), ConfigError or ApplianceError with the service's message."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(_CLIENT_TIMEOUT)
        try:
            s.connect(str(path))
        except PermissionError:
            raise ApplianceError(
                f"permission denied on {path}; run as root or as a member of group '{SOCKET_GROUP}'"
            ) from None
        s.sendall(json.dumps({"op": op, **fields}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise ApplianceError(f"the config service at {path} closed the connection without answering")
            buf += chunk
    answer = json.loads(buf)
    if answer.get("ok"):
        return answer.get("result")
    error = answer.get("error", "unknown error")
    raise ConfigError(error) if answer.get("kind") == "ConfigError" else ApplianceError(error)


def _via_service(args: argparse.Namespace, op: str, offline: Callable[[], Any], **fields: Any) -> Any:
    """Ask the running service, or run ``offline`` when none is running."""
    path = runtime_dir(args.runtime_dir) / SOCKET_NAME
    try:
        return request(path, op, **fields)
    except (FileNotFoundError, ConnectionRefusedError):
        return offline()
