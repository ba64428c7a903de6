"""What the console edits: the configuration, read and changed through the config service
of a running appliance or else in the config file (:class:`ConsoleSettings`), and the
settings as menu fields with their help line and their check of what was typed (:class:`Field`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance import config

from appliance.ops import health
from appliance.config import Config, ExportPolicy, RetentionPolicy
from appliance.ops.configservice import ConfigFile, request
from appliance.conformance import ACCEPTED_MODALITIES, MIN_PDU
from appliance.errors import ApplianceError, ConfigError


class ConsoleSettings:
    """The configuration as the console reads and changes it: through the config service of a
    running appliance at ``socket``, else in the file ``cfile``."""

    def __init__(self, cfile: ConfigFile, socket: Path) -> None:
        self.cfile = cfile
        self.socket = socket

    def _ask(self, op: str, **fields: Any) -> Any:
        """The service's answer, or raise FileNotFoundError/ConnectionRefusedError when none runs."""
        return request(self.socket, op, **fields)

    def running(self) -> bool:
        try:
            self._ask("get", key="scp.port")
            return True
        except (FileNotFoundError, ConnectionRefusedError):
            return False

    def current(self) -> Config:
        try:
            return config.from_dict(self._ask("show"))
        except (FileNotFoundError, ConnectionRefusedError):
            return self.cfile.load()

    def check(self, changes: dict[str, str | None]) -> Config:
        """The configuration ``changes`` would make; raise ConfigError naming every problem."""
        return self.cfile.plan_changes(changes)[1]

    def check_forward(self, rules: list[dict[str, Any]]) -> Config:
        """The configuration with ``rules`` as its whole ``[[forward]]`` list; raise ConfigError
        naming every problem (an unknown destination, a bad origin, an empty ``to``)."""
        return self.check({"forward": json.dumps(rules)})

    def set_forward(self, rules: list[dict[str, Any]]) -> str:
        """Replace the ``[[forward]]`` list by ``rules`` (tables as :func:`rule_table` makes
        them); return what happened in words. The running appliance restarts its Storage SCP
        on them, which queues by them what arrives from then on."""
        text = json.dumps(rules)
        try:
            self._ask("change", value={"forward": text})
        except (FileNotFoundError, ConnectionRefusedError):
            raw, _cfg = self.cfile.plan_changes({"forward": text})
            self.cfile.write(raw)
            return f"written to {self.cfile.path}; the rules apply when the appliance starts (it is not running)"
        return "applied: the Storage SCP queues what arrives by them from now on"

    def check_peers(self, peers: list[dict[str, Any]]) -> Config:
        """The configuration with ``peers`` as its whole ``[[peer]]`` list; raise ConfigError
        naming every problem (an AE title, an address or network, a fingerprint)."""
        return self.check({"peer": json.dumps(peers)})

    def set_peers(self, peers: list[dict[str, Any]]) -> str:
        """Replace the ``[[peer]]`` list by ``peers`` (tables as :func:`peer_table` makes them);
        return what happened in words. The running appliance restarts its Storage SCP on them."""
        text = json.dumps(peers)
        try:
            self._ask("change", value={"peer": text})
        except (FileNotFoundError, ConnectionRefusedError):
            raw, _cfg = self.cfile.plan_changes({"peer": text})
            self.cfile.write(raw)
            return f"written to {self.cfile.path}; the known peers apply when the appliance starts (it is not running)"
        return "applied: the Storage SCP checks associations against them from now on"

    def change(self, changes: dict[str, str | None]) -> str:
        """Apply ``changes`` (None removes a key); return what happened in words."""
        try:
            if len(changes) == 1 and None not in changes.values():
                (key, value), = changes.items()
                return str(self._ask("set", key=key, value=value))
            return str(self._ask("change", value=changes))
        except (FileNotFoundError, ConnectionRefusedError):
            raw, _cfg = self.cfile.plan_changes(changes)
            self.cfile.write(raw)
            return f"written to {self.cfile.path}; it applies when the appliance starts (it is not running)"

    def status(self, data_dir: Path) -> health.Health:
        try:
            d = self._ask("status")
            return health.Health.from_dict({k: v for k, v in d.items() if k != "children"})
        except (FileNotFoundError, ConnectionRefusedError):
            from appliance.store.store import Store

            store = Store(data_dir)
            try:
                return health.offline(store)
            finally:
                store.close(clean=False)


# -- fields -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One setting as the console shows and edits it."""

    key: str
    label: str
    help: str
    kind: str = "text"  # text, int, number (a decimal), bool, list, choice
    #: The range of an int field; with ``high`` 0 the configuration's own check says what is allowed.
    low: int = 0
    high: int = 0
    choices: tuple[str, ...] = ()

    def show(self, value: Any) -> str:
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, float):
            return f"{value:g}"
        if isinstance(value, (list, tuple)):
            return ", ".join(str(v) for v in value) or "(none)"
        return str(value) if value != "" else "(empty)"

    def parse(self, text: str) -> str:
        """Turn what was typed into the config service's text; raise ConfigError saying what is allowed."""
        if self.kind == "int":
            if not re.fullmatch(r"\d+", text):
                raise ConfigError(f"'{text}' is not a whole number" + (
                    f"; {self.label} allows {self.low} to {self.high}" if self.high else ""))
            if self.high and not self.low <= int(text) <= self.high:
                raise ConfigError(f"{self.label} {text} is out of range; allowed: {self.low} to {self.high}")
            return text
        if self.kind == "number":
            if not re.fullmatch(r"\d+(\.\d+)?", text):
                raise ConfigError(f"'{text}' is not a number; {self.label} takes e.g. 10 or 2.5")
            return text
        if self.kind == "bool":
            low = text.lower()
            if low in ("y", "yes", "on", "true", "1"):
                return "true"
            if low in ("n", "no", "off", "false", "0"):
                return "false"
            raise ConfigError(f"'{text}' is not yes or no; answer y or n")
        if self.kind == "choice":
            if text not in self.choices:
                raise ConfigError(f"'{text}' is not allowed; choose one of: {', '.join(self.choices)}")
            return text
        if self.kind == "list":
            if text.lower() in ("none", "-"):
                return "[]"
            items = [v.strip() for v in text.split(",") if v.strip()]
            return json.dumps(items)
        return text


SCP_FIELDS = (
    Field("scp.ae_title", "AE title", "The name senders call this box by: 1 to 16 characters, no backslash."),
    Field("scp.port", "Port", "TCP port senders connect to: 1 to 65535 (104 is DICOM's, 11112 is usual).",
          "int", 1, 65535),
    Field("scp.max_pdu", "Max PDU", f"Largest PDU received, in bytes: {MIN_PDU} or more (262144 is usual).",
          "int", MIN_PDU, 0x7FFFFFFF),
    Field("scp.max_associations", "Max associations", "Senders served at the same time: 1 to 64.",
          "int", 1, 64),
    Field("scp.check_called_ae", "Called-AE check", "yes: refuse senders that call another AE title than ours.",
          "bool"),
    Field("scp.allowed_calling_aes", "Calling-AE allow-list",
          "Only these AE titles may send, if any; comma-separated, 'none' empties.", "list"),
)
POLICY_FIELD = Field("usb.policy", "Default policy",
                     "With an empty queue a stick gets: " + ", ".join(p.value for p in ExportPolicy) + ".",
                     "choice", choices=tuple(p.value for p in ExportPolicy))
EJECT_FIELD = Field("media.eject_after_import", "Eject after import", "yes: open the tray once a CD is imported.",
                    "bool")
RETENTION_FIELDS = (
    Field("retention.enabled", "Retention", "yes: delete studies when the disk passes the high-water mark.",
          "bool"),
    Field("retention.high_water", "High-water mark",
          "Delete above this: % of the data partition (85%) or GB used (40GB)."),
    Field("retention.low_water", "Low-water mark",
          "Delete down to this, in the high-water mark's unit (75%, 30GB)."),
    Field("retention.max_age_days", "Max age (days)",
          "Also delete studies last received longer ago than this; 0: no limit.", "int"),
    Field("retention.policy", "Policy",
          "delivered: only studies exported or sent since; unconditional: any.",
          "choice", choices=tuple(p.value for p in RetentionPolicy)),
    Field("retention.quiet_minutes", "Quiet minutes",
          "A study is left alone this long after its last object (0 to 1440).", "number"),
)
DEST_FIELDS = (
    Field("ae_title", "AE title", "The peer's AE title: 1 to 16 characters, no backslash."),
    Field("host", "Host", "The peer's IP address or host name."),
    Field("port", "Port", "The peer's TCP port: 1 to 65535.", "int", 1, 65535),
)


#: A ``[[forward]]`` rule's fields; ``key`` is the rule table's own key.
FORWARD_FIELDS = (
    Field("calling_ae", "Calling AE titles", "From any of these senders; comma-separated, 'none': any.",
          "list"),
    Field("modality", "Modalities", "Any of these, e.g. CT, RTSTRUCT; 'none': any.", "list"),
    Field("sop_class", "SOP classes", "Any of these SOP Class UIDs; 'none': any.", "list"),
    Field("origin", "Origins", "network (the Storage Server), cd (a CD import); 'none': both.", "list"),
    Field("to", "Send to", "One or more configured destinations, comma-separated.", "list"),
    Field("stable_after", "Stable after (s)",
          "0: each object as it arrives; N: a series once nothing came for N s.", "number"),
    Field("max_pending", "Max waiting objects", "Backlog cap per destination, objects; 0: none.", "int"),
    Field("max_pending_gb", "Max waiting GB", "Backlog cap per destination, GB; 0: none.", "number"),
    Field("drop_oldest", "Drop oldest", "Above a cap: yes drops the oldest, no only reports it.", "bool"),
)


#: The TLS and known-peer settings of the Security page.
SECURITY_FIELDS = (
    Field("scp.tls_port", "TLS port", "DICOM TLS beside the plain port: 2762 by convention; 0: off.",
          "int", 0, 65535),
    Field("scp.require_known_peers", "Require known peers",
          "yes: only the known peers (p) may associate, from their addresses.", "bool"),
)
#: A ``[[peer]]``'s fields; ``key`` is the peer table's own key.
PEER_FIELDS = (
    Field("ae_title", "AE title", "the peer's calling AE title: 1 to 16 characters, no backslash."),
    Field("addresses", "Addresses", "its addresses or networks, e.g. 192.168.1.31, 10.0.4.0/24.", "list"),
    Field("certificate_subject", "Certificate subject", "over TLS, e.g. CN=ct-sim,O=Hospital, or the CN alone."),
    Field("certificate_sha256", "Certificate SHA-256", "over TLS, its fingerprint: AA:BB:... (64 hex digits)."),
)


def peer_table(peer: config.Peer) -> dict[str, Any]:
    """``peer`` as its ``[[peer]]`` table, without the keys that are empty."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(peer).items()
            if k == "ae_title" or v}


def rule_table(rule: config.ForwardRule) -> dict[str, Any]:
    """``rule`` as its ``[[forward]]`` table, without the keys that hold their default, so
    that the file says only what the rule asks for."""
    default = config.ForwardRule()
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(rule).items()
            if k == "to" or v != getattr(default, k)}


def rule_value(f: Field, text: str) -> Any:
    """What was typed for rule field ``f`` as the rule table's value; raise ConfigError
    saying what is allowed. Modalities are DICOM code strings: upper case, and only those
    the box stores (a rule for another would never match)."""
    value = json.loads(f.parse(text))
    if f.key == "modality":
        value = [m.upper() for m in value]
        other = [m for m in value if m not in ACCEPTED_MODALITIES]
        if other:
            raise ConfigError(f"the box stores no {', '.join(other)}: a rule for it would never match; "
                              f"modalities it stores: {', '.join(sorted(ACCEPTED_MODALITIES))}")
    return value


def value_of(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def toml_str(text: str) -> str:
    """``text`` as a TOML string, for keys the service does not know the type of yet."""
    return json.dumps(text)


def reason(exc: ApplianceError) -> str:
    """The service's or file's message without its 'KEY = VALUE not applied: invalid configuration:' preamble."""
    text = str(exc)
    return re.sub(r"^.*? not applied: (invalid configuration: )?", "", text, count=1, flags=re.S)
