"""The appliance's configuration: one TOML file whose tables and keys match these dataclasses.

A file holding only ``[scp]`` with ``port`` is a complete configuration: every other field
has its default. :func:`load` gathers every problem into one :class:`ConfigError`; an
invalid file is never replaced by defaults. :func:`save` writes atomically.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

import tomli_w

from appliance.conformance import (
    DEFAULT_MAX_ASSOCIATIONS,
    DEFAULT_SCP_AE_TITLE,
    DEFAULT_SCP_PORT,
    MIN_PDU,
)
from appliance.errors import ConfigError
from appliance.files import write_atomic

#: Where the box keeps its configuration.
DEFAULT_CONFIG_PATH = Path("/etc/appliance/appliance.toml")
#: Where the box keeps its store and index, unless --data-dir says otherwise.
DEFAULT_DATA_DIR = Path("/var/lib/appliance")
#: Environment variable: the pid of the ``appliance run`` that started an SCP (which
#: stops when that process is gone).
SUPERVISOR_PID = "APPLIANCE_SUPERVISOR_PID"

_DESTINATION_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]*$")  # default repertoire, no backslash
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")  # a Linux interface name (IFNAMSIZ - 1)


class DuplicatePolicy(enum.StrEnum):
    """What to do when a stored SOP Instance UID arrives again with different content.

    Identical content is always a success that changes nothing."""

    #: Keep the stored object, answer the sender with a failure status (default).
    REJECT = "reject"
    #: Store the new object; the previous file moves to ``superseded/`` and is logged.
    REPLACE = "replace"


class ExportPolicy(enum.StrEnum):
    """What a USB export writes when nothing is selected and the export queue is empty."""

    #: Studies received since the last export made under this policy or ``--all`` (default).
    SINCE_LAST_EXPORT = "since-last-export"
    #: Every stored study.
    ALL = "all"
    #: Nothing: only explicit selections and the export queue are written.
    QUEUE_ONLY = "queue-only"


@dataclass(frozen=True)
class ScpConfig:
    """The Storage Server (``[scp]``)."""

    ae_title: str = DEFAULT_SCP_AE_TITLE
    port: int = DEFAULT_SCP_PORT
    bind: str = "0.0.0.0"
    max_pdu: int = 262144
    max_associations: int = DEFAULT_MAX_ASSOCIATIONS
    #: Refuse associations whose called AE title is not ours (off by default).
    check_called_ae: bool = False
    #: If not empty, only these calling AE titles may associate.
    allowed_calling_aes: tuple[str, ...] = ()
    #: Seconds from a TCP connect until the whole A-ASSOCIATE-RQ must have arrived (a
    #: deadline, not a silence limit: a peer trickling bytes does not extend it).
    acse_timeout: float = 30.0
    #: Seconds of silence after which an association is aborted.
    network_timeout: float = 60.0
    #: Seconds a PDU may take to arrive whole once its first byte came.
    pdu_timeout: float = 120.0
    #: Seconds an association may hold a slot without completing a DIMSE message (a
    #: C-ECHO, or a C-STORE with its data set).
    idle_timeout: float = 900.0
    #: Largest DIMSE command set accepted (a real one is a few hundred bytes).
    max_command_bytes: int = 65536
    #: Largest A-ASSOCIATE-RQ accepted (a real one, even with 128 contexts, is < 40 KiB).
    max_associate_rq_bytes: int = 131072
    #: Connections that have not yet sent a whole A-ASSOCIATE-RQ; beyond this the oldest
    #: is closed, so a connect flood never locks a scanner out.
    max_pending_connections: int = 256
    #: DICOM TLS port beside ``port`` (2762 by convention; 0: off). Without ``[tls]``
    #: certificate and key, a self-signed pair is made at first start (see ``[tls]``).
    tls_port: int = 0
    #: Serve the network DICOM TLS only: the plain ``port`` listens on loopback alone (for the
    #: box's own checks and tools on the box). Needs ``tls_port`` and a wildcard ``bind``.
    tls_only: bool = False
    #: Accept associations only from the ``[[peer]]`` list: a known calling AE title, from
    #: one of its addresses, with its certificate if it names one.
    require_known_peers: bool = False


@dataclass(frozen=True)
class TlsConfig:
    """DICOM TLS (``[tls]``; BCP 195: TLS 1.2 or later, its cipher suites), for the Storage
    SCP's ``scp.tls_port`` and the client AE's destinations with ``tls``."""

    #: PEM files: our certificate (chain) and its private key. Empty: a self-signed pair
    #: made at first start in DATA_DIR/tls/.
    certificate: str = ""
    private_key: str = ""
    #: PEM bundle of the CAs whose certificates we trust: a peer's client certificate, a
    #: destination's server certificate.
    ca_certificates: str = ""
    #: Refuse a TLS connection whose client presents no certificate the CAs signed.
    require_client_certificate: bool = False


@dataclass(frozen=True)
class Peer:
    """A known DICOM peer (``[[peer]]``): a calling AE title bound to addresses and, over
    TLS, to a certificate."""

    ae_title: str = ""
    #: Addresses or networks (``192.168.1.20``, ``10.0.4.0/24``); empty: any address.
    addresses: tuple[str, ...] = ()
    #: The certificate's subject (``CN=CT_SIM,O=Hospital``) or its common name alone; empty: any.
    certificate_subject: str = ""
    #: The certificate's SHA-256 fingerprint (hex, colons allowed); empty: any.
    certificate_sha256: str = ""

    @property
    def needs_certificate(self) -> bool:
        return bool(self.certificate_subject or self.certificate_sha256)


@dataclass(frozen=True)
class QrConfig:
    """Query/Retrieve on the Storage Server's port (``[qr]``; beyond the conformance
    statement): C-FIND, C-MOVE to ``[destinations]`` and C-GET, Patient and Study Root."""

    #: Accept the Query/Retrieve presentation contexts (on by default).
    enabled: bool = True


@dataclass(frozen=True)
class UpdateConfig:
    """Updating the box's system (``[update]``, issue 21)."""

    #: Install a release from an inserted USB stick without asking on the console first.
    auto_from_usb: bool = False
    #: An http:// or https:// base URL holding a release (SHA256SUMS and its artefacts); empty: none.
    url: str = ""
    #: Boots a newly installed version gets to become healthy before the box goes back (1 to 10).
    boot_tries: int = 3


@dataclass(frozen=True)
class StoreConfig:
    """The store and ingest rules (``[store]``)."""

    #: Below this much free space, C-STORE answers Out of Resources.
    min_free_mb: int = 500
    duplicate_policy: DuplicatePolicy = DuplicatePolicy.REJECT
    #: Refuse character sets outside section 7 (True), or accept and flag them (False).
    charset_strict: bool = True
    #: Tolerance in mm of the 3D reconstruction rule (appendix A, note 2).
    slice_tolerance_mm: float = 0.1


@dataclass(frozen=True)
class Destination:
    """A named DICOM peer the client AE sends to (``[destinations.NAME]``)."""

    ae_title: str = ""
    host: str = ""
    port: int = DEFAULT_SCP_PORT
    #: "plain", "tls" (verify the server against ``tls.ca_certificates``), or "mutual"
    #: (that, and present our certificate).
    tls: str = "plain"


#: The ``scp.bind`` values that listen on every address.
WILDCARD_BINDS = ("0.0.0.0", "::", "")


def plain_bind(scp: ScpConfig) -> str:
    """Where the plain port listens: ``scp.bind``, or loopback alone with ``scp.tls_only``."""
    if not scp.tls_only:
        return scp.bind
    return "::1" if ":" in scp.bind else "127.0.0.1"


#: The values of ``Destination.tls``.
DESTINATION_TLS = ("plain", "tls", "mutual")


@dataclass(frozen=True)
class MediaConfig:
    """What the appliance does when a CD or USB stick is inserted (``[media]``)."""

    #: Open the tray once a CD has been imported.
    eject_after_import: bool = True


@dataclass(frozen=True)
class UsbConfig:
    """The USB writer (``[usb]``)."""

    #: What an export writes when nothing is selected and the queue is empty.
    policy: ExportPolicy = ExportPolicy.SINCE_LAST_EXPORT


class RetentionPolicy(enum.StrEnum):
    """Which studies retention may delete."""

    #: Only studies that reached somewhere else: every object exported to USB or sent
    #: to a remote SCP since it was last received (default).
    DELIVERED = "delivered"
    #: Any study that is not protected, delivered or not.
    UNCONDITIONAL = "unconditional"


@dataclass(frozen=True)
class RetentionConfig:
    """Deleting old studies to keep the data partition from filling up (``[retention]``)."""

    #: Off by default: nothing is deleted unless a person says so.
    enabled: bool = False
    #: Start deleting when the data partition is fuller than this: a percentage ("90%") or
    #: the space used in GB ("40GB").
    high_water: str = "85%"
    #: Delete down to this ("75%", "30GB").
    low_water: str = "75%"
    #: Also delete studies whose last object arrived more than this many days ago (0: never).
    max_age_days: int = 0
    policy: RetentionPolicy = RetentionPolicy.DELIVERED
    #: A study is left alone for this many minutes after its last object (it may still be arriving).
    quiet_minutes: float = 10.0


def parse_mark(value: str, what: str) -> tuple[float, str]:
    """Parse a high- or low-water mark: ``(percent, "%")`` or ``(bytes, "B")``; raise ValueError."""
    text = value.strip().upper().replace(" ", "")
    try:
        if text.endswith("%"):
            pct = float(text[:-1])
            if not 1 <= pct <= 99:
                raise ValueError
            return pct, "%"
        if text.endswith("GB"):
            gb = float(text[:-2])
            if gb <= 0:
                raise ValueError
            return gb * 1e9, "B"
    except ValueError:
        pass
    raise ValueError(f"{what} '{value}' is not a mark; use a percentage of the data partition from 1% to 99% "
                     "(e.g. 85%) or the space used in GB (e.g. 40GB)")


@dataclass(frozen=True)
class ForwardRule:
    """Send what arrives to destinations, automatically (``[[forward]]``). Empty lists match anything."""

    #: Any of these calling AE titles (objects from a CD have none: they match only an empty list).
    calling_ae: tuple[str, ...] = ()
    #: Any of these modalities (the series' Modality, e.g. CT, RTSTRUCT).
    modality: tuple[str, ...] = ()
    #: Any of these SOP Class UIDs.
    sop_class: tuple[str, ...] = ()
    #: Any of these origins: "network" (the Storage SCP) or "cd" (a CD import).
    origin: tuple[str, ...] = ()
    #: The destination names ([destinations.NAME]) to send to.
    to: tuple[str, ...] = ()
    #: 0: send each object as it arrives; N: send a series once it received nothing for N
    #: seconds, so the destination gets it in one association.
    stable_after: float = 0.0
    #: The most objects waiting for one destination (0: no limit); above it, the box says so,
    #: and drops the oldest only if ``drop_oldest`` is true.
    max_pending: int = 0
    #: The most GB waiting for one destination (0: no limit), likewise.
    max_pending_gb: float = 0.0
    drop_oldest: bool = False

    def matches(self, calling_ae: str | None, modality: str | None, sop_class: str, origin: str) -> bool:
        """True if an object with these properties is to be forwarded by this rule."""
        return ((not self.calling_ae or (calling_ae or "") in self.calling_ae)
                and (not self.modality or (modality or "") in self.modality)
                and (not self.sop_class or sop_class in self.sop_class)
                and (not self.origin or origin.split(":", 1)[0] in self.origin))


#: The origins a forwarding rule can name.
FORWARD_ORIGINS = ("network", "cd")


class NetworkMode(enum.StrEnum):
    """How the appliance's network interface gets its address."""

    #: From a DHCP server (default).
    DHCP = "dhcp"
    #: ``network.address``/``network.prefix``, ``network.gateway`` and ``network.dns``.
    STATIC = "static"


@dataclass(frozen=True)
class NetworkConfig:
    """The appliance's network interface (``[network]``), written as a systemd-networkd file."""

    #: The interface, e.g. ``eth0``; empty: every Ethernet interface (DHCP only).
    interface: str = ""
    mode: NetworkMode = NetworkMode.DHCP
    #: Static mode: an IPv4 or IPv6 address, without the prefix length.
    address: str = ""
    prefix: int = 24
    #: Static mode: the default gateway, inside ``address/prefix``; empty: no default route.
    gateway: str = ""
    #: Static mode: DNS server addresses.
    dns: tuple[str, ...] = ()


@dataclass(frozen=True)
class Config:
    """The whole configuration file."""

    scp: ScpConfig = field(default_factory=ScpConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    media: MediaConfig = field(default_factory=MediaConfig)
    usb: UsbConfig = field(default_factory=UsbConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    qr: QrConfig = field(default_factory=QrConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    #: Known peers (``[[peer]]``), in file order.
    peer: tuple[Peer, ...] = ()
    #: Forwarding rules (``[[forward]]``), in file order.
    forward: tuple[ForwardRule, ...] = ()
    #: Named peers for ``appliance send --to NAME``, by name.
    destinations: Mapping[str, Destination] = field(default_factory=dict)


def validate_ae_title(value: str, what: str = "ae_title") -> list[str]:
    """Return the problems of ``value`` as an AE title (empty if it is valid)."""
    problems = []
    if not value.strip():
        problems.append(f"{what} is empty; an AE title needs 1 to 16 characters")
    elif len(value) > 16:
        problems.append(f"{what} '{value}' is {len(value)} characters; the limit is 16")
    if not _AE_TITLE_RE.match(value):
        problems.append(f"{what} '{value}' has characters outside plain ASCII or a backslash")
    return problems


def validate_network(n: NetworkConfig, where: str = "network") -> list[str]:
    """Return the problems of ``n`` (empty if it is valid); static settings are checked
    even in DHCP mode, so what is kept for later is sound too."""
    problems: list[str] = []
    if n.interface and not _IFNAME_RE.match(n.interface):
        problems.append(f"{where}.interface '{n.interface}' is not an interface name; use e.g. eth0 or enp1s0 "
                        "(1 to 15 letters, digits, '-', '_', '.')")
    if n.mode is NetworkMode.STATIC and not n.interface:
        problems.append(f"{where}.interface is empty; a static address needs the interface it goes on, e.g. eth0")
    addr = None
    if n.address:
        try:
            addr = ipaddress.ip_address(n.address)
        except ValueError:
            problems.append(f"{where}.address '{n.address}' is not an IP address; use e.g. 192.168.1.50 "
                            "(the prefix length goes in network.prefix)")
    elif n.mode is NetworkMode.STATIC:
        problems.append(f"{where}.address is empty; a static setting needs an address, e.g. 192.168.1.50")
    bits = 32 if addr is None or addr.version == 4 else 128
    if not 1 <= n.prefix <= bits:
        problems.append(f"{where}.prefix {n.prefix} is out of range; use 1 to {bits} (24 means 255.255.255.0)")
    net = None
    if addr is not None:
        if addr.is_loopback or addr.is_multicast or addr.is_unspecified or addr.is_link_local:
            problems.append(f"{where}.address {addr} is a loopback, multicast, link-local or unspecified address; "
                            "use the address the network administrator assigned")
        elif 1 <= n.prefix <= bits:
            net = ipaddress.ip_network(f"{addr}/{n.prefix}", strict=False)
            if net.num_addresses > 2 and addr in (net.network_address, net.broadcast_address):
                problems.append(f"{where}.address {addr} is the {'network' if addr == net.network_address else 'broadcast'}"
                                f" address of {net}; use an address between them")
    if n.gateway:
        try:
            gw = ipaddress.ip_address(n.gateway)
        except ValueError:
            problems.append(f"{where}.gateway '{n.gateway}' is not an IP address; use e.g. 192.168.1.1, or leave it "
                            "empty for no default route")
        else:
            if addr is not None and gw.version != addr.version:
                problems.append(f"{where}.gateway {gw} is IPv{gw.version} but the address is IPv{addr.version}")
            elif gw == addr:
                problems.append(f"{where}.gateway {gw} is the appliance's own address; use the router's address")
            elif net is not None and (gw not in net or (net.num_addresses > 2 and gw in (
                    net.network_address, net.broadcast_address))):
                problems.append(f"{where}.gateway {gw} is not a host of {net}; the gateway must be on the "
                                "appliance's own subnet (check the address and prefix)")
    for server in n.dns:
        try:
            ipaddress.ip_address(server)
        except ValueError:
            problems.append(f"{where}.dns entry '{server}' is not an IP address; use e.g. 192.168.1.1")
    return problems


def validate_retention(r: RetentionConfig, where: str = "retention") -> list[str]:
    """Return the problems of ``r`` (empty if it is valid)."""
    problems = []
    marks = []
    for name in ("high_water", "low_water"):
        try:
            marks.append(parse_mark(getattr(r, name), f"{where}.{name}"))
        except ValueError as exc:
            problems.append(str(exc))
    if len(marks) == 2 and marks[0][1] == marks[1][1] and marks[1][0] >= marks[0][0]:
        problems.append(f"{where}.low_water {r.low_water} is not below {where}.high_water {r.high_water}; "
                        "retention deletes from the high-water mark down to the low-water mark")
    if len(marks) == 2 and marks[0][1] != marks[1][1]:
        problems.append(f"{where}.high_water {r.high_water} and {where}.low_water {r.low_water} must both be "
                        "percentages or both be GB")
    if not 0 <= r.max_age_days <= 36500:
        problems.append(f"{where}.max_age_days {r.max_age_days} is out of range; use 0 (no age limit) to 36500")
    if not 0 <= r.quiet_minutes <= 1440:
        problems.append(f"{where}.quiet_minutes {r.quiet_minutes} is out of range; use 0 to 1440")
    return problems


def validate_update(u: UpdateConfig, where: str = "update") -> list[str]:
    """Return the problems of ``u`` (empty if it is valid)."""
    problems = []
    if u.url and (not u.url.lower().startswith(("http://", "https://")) or len(u.url.split("://", 1)[1]) == 0
                  or any(c.isspace() for c in u.url)):
        problems.append(f"{where}.url '{u.url}' is not an http:// or https:// URL; give the address of the folder "
                        "holding the release (SHA256SUMS), e.g. https://updates.hospital.example/appliance, or "
                        "leave it empty")
    if not 1 <= u.boot_tries <= 10:
        problems.append(f"{where}.boot_tries {u.boot_tries} is out of range; use 1 to 10 (boots a new version "
                        "gets to become healthy)")
    return problems


#: The ranges of the ``[scp]`` limits: (field, lowest, highest).
_SCP_LIMITS: tuple[tuple[str, float, float], ...] = (
    ("acse_timeout", 1, 3600),
    ("network_timeout", 1, 3600),
    ("pdu_timeout", 1, 3600),
    ("idle_timeout", 10, 86400),
    ("max_command_bytes", 1024, 1 << 20),
    ("max_associate_rq_bytes", 16384, 1 << 20),
    ("max_pending_connections", 8, 4096),
)


def _check(cfg: Config) -> list[str]:
    problems: list[str] = []
    s = cfg.scp
    problems += validate_ae_title(s.ae_title, "scp.ae_title")
    if not 1 <= s.port <= 65535:
        problems.append(f"scp.port {s.port} is out of range; use 1 to 65535 (104 or 11112 are usual)")
    if not MIN_PDU <= s.max_pdu <= 0x7FFFFFFF:
        problems.append(f"scp.max_pdu {s.max_pdu} is out of range; use {MIN_PDU} bytes or more")
    if not 1 <= s.max_associations <= 64:
        problems.append(f"scp.max_associations {s.max_associations} is out of range; use 1 to 64")
    for ae in s.allowed_calling_aes:
        problems += validate_ae_title(ae, "scp.allowed_calling_aes entry")
    if not 0 <= s.tls_port <= 65535 or (s.tls_port and s.tls_port == s.port):
        problems.append(f"scp.tls_port {s.tls_port} is out of range or the plain port; use 0 (off) or another "
                        "port, 2762 by convention")
    if s.tls_only and not s.tls_port:
        problems.append("scp.tls_only is true but scp.tls_port is 0; give the TLS port, e.g. 2762")
    if s.tls_only and s.bind not in WILDCARD_BINDS:
        problems.append(f"scp.tls_only needs scp.bind 0.0.0.0 or :: (the plain port then listens on loopback "
                        f"only), not {s.bind}")
    if s.require_known_peers and not cfg.peer:
        problems.append("scp.require_known_peers is true but no [[peer]] is configured; every association "
                        "would be refused")
    problems += validate_peers(cfg.peer)
    if bool(cfg.tls.certificate) != bool(cfg.tls.private_key):
        problems.append("tls.certificate and tls.private_key go together; give both, or neither for a "
                        "self-signed pair")
    for name, low, high in _SCP_LIMITS:
        value = getattr(s, name)
        if not low <= value <= high:
            unit = "seconds" if name.endswith("timeout") else "bytes" if name.endswith("bytes") else ""
            problems.append(f"scp.{name} {value} is out of range; use {low} to {high} {unit}".rstrip())
    st = cfg.store
    if st.min_free_mb < 0:
        problems.append(f"store.min_free_mb {st.min_free_mb} is negative")
    if not 0 < st.slice_tolerance_mm <= 10:
        problems.append(f"store.slice_tolerance_mm {st.slice_tolerance_mm} is out of range; use 0.001 to 10")
    problems += validate_retention(cfg.retention)
    problems += validate_update(cfg.update)
    for name, d in cfg.destinations.items():
        where = f"destinations.{name}"
        if not _DESTINATION_NAME_RE.match(name):
            problems.append(f"[{where}]: a destination name uses letters, digits, '-' and '_' only")
        problems += validate_ae_title(d.ae_title, f"{where}.ae_title")
        if not d.host.strip():
            problems.append(f"{where}.host is missing; give the peer's host name or IP address")
        if not 1 <= d.port <= 65535:
            problems.append(f"{where}.port {d.port} is out of range; use 1 to 65535")
        if d.tls not in DESTINATION_TLS:
            problems.append(f"{where}.tls '{d.tls}' is not one of {', '.join(DESTINATION_TLS)}")
        elif d.tls != "plain" and not cfg.tls.ca_certificates:
            problems.append(f"{where}.tls '{d.tls}' needs tls.ca_certificates to verify the destination's "
                            "certificate")
    problems += validate_network(cfg.network)
    problems += validate_forward(cfg.forward, cfg.destinations)
    return problems


def validate_peers(peers: tuple[Peer, ...]) -> list[str]:
    """Return the problems of the ``[[peer]]`` list (empty if it is valid)."""
    problems = []
    for n, p in enumerate(peers, 1):
        where = f"peer {n}"
        problems += validate_ae_title(p.ae_title, f"{where}: ae_title")
        for a in p.addresses:
            try:
                ipaddress.ip_network(a, strict=False)
            except ValueError:
                problems.append(f"{where}: address '{a}' is not an IP address or network; use e.g. 192.168.1.20 "
                                "or 10.0.4.0/24")
        digits = p.certificate_sha256.replace(":", "")
        if digits and not re.fullmatch(r"[0-9A-Fa-f]{64}", digits):
            problems.append(f"{where}: certificate_sha256 is not a SHA-256 fingerprint (64 hex digits, colons "
                            "allowed; openssl x509 -fingerprint -sha256 prints it)")
    return problems


def validate_forward(rules: tuple[ForwardRule, ...], destinations: Mapping[str, Destination]) -> list[str]:
    """Return the problems of the forwarding rules (empty if they are valid)."""
    problems = []
    for n, r in enumerate(rules, 1):
        where = f"forward rule {n}"
        if not r.to:
            problems.append(f"{where}: 'to' is empty; name one or more destinations, e.g. to = [\"PACS\"]")
        for name in r.to:
            if name not in destinations:
                known = ", ".join(sorted(destinations)) or "none is configured"
                problems.append(f"{where}: destination '{name}' is not configured ([destinations.{name}]); "
                                f"known: {known}")
        for ae in r.calling_ae:
            problems += validate_ae_title(ae, f"{where}: calling_ae entry")
        for o in r.origin:
            if o not in FORWARD_ORIGINS:
                problems.append(f"{where}: origin '{o}' is not one of {', '.join(FORWARD_ORIGINS)}")
        if not 0 <= r.stable_after <= 86400:
            problems.append(f"{where}: stable_after {r.stable_after} is out of range; use 0 (each object as it "
                            "arrives) to 86400 seconds")
        if r.max_pending < 0 or r.max_pending_gb < 0:
            problems.append(f"{where}: max_pending and max_pending_gb cannot be negative (0: no limit)")
    return problems


def _coerce(cls: type, table: Any, prefix: str, problems: list[str]) -> Any:
    """Build dataclass ``cls`` from a TOML table, collecting type problems."""
    if not isinstance(table, dict):
        problems.append(f"[{prefix}] must be a table")
        return cls()
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        f = known.get(key)
        if f is None:
            problems.append(f"{prefix}.{key} is not a known setting (known: {', '.join(known)})")
            continue
        default = getattr(cls(), key)
        try:
            kwargs[key] = _convert(default, value)
        except (TypeError, ValueError) as exc:
            problems.append(f"{prefix}.{key}: {exc}")
    return cls(**kwargs)


def _convert(default: Any, value: Any) -> Any:
    if isinstance(default, enum.Enum):
        allowed = [m.value for m in type(default)]
        if value not in allowed:
            raise ValueError(f"'{value}' is not one of {', '.join(allowed)}")
        return type(default)(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise TypeError(f"'{value}' must be true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"'{value}' must be a whole number")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"'{value}' must be a number")
        return float(value)
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise TypeError("must be a list of strings")
        return tuple(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise TypeError(f"'{value}' must be a string")
        return value
    raise TypeError("unsupported setting type")


def _destinations(table: Any, problems: list[str]) -> dict[str, Destination]:
    """Build the ``[destinations.NAME]`` tables, collecting type problems."""
    if not isinstance(table, dict):
        problems.append("[destinations] must hold one table per destination, e.g. [destinations.pacs]")
        return {}
    return {name: _coerce(Destination, t, f"destinations.{name}", problems) for name, t in table.items()}


def from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from parsed TOML; raise one ConfigError for all problems."""
    problems: list[str] = []
    sections = {f.name: f for f in fields(Config)}
    kwargs: dict[str, Any] = {}
    for name, table in data.items():
        if name not in sections:
            problems.append(f"[{name}] is not a known section (known: {', '.join(sections)})")
            continue
        if name == "destinations":
            kwargs[name] = _destinations(table, problems)
            continue
        if name in ("forward", "peer"):
            if not isinstance(table, list):
                problems.append(f"[{name}] must be written [[{name}]]: one table per entry")
                continue
            cls = ForwardRule if name == "forward" else Peer
            kwargs[name] = tuple(_coerce(cls, t, f"{name} {'rule ' if name == 'forward' else ''}{n}", problems)
                                 for n, t in enumerate(table, 1))
            continue
        kwargs[name] = _coerce(type(getattr(Config(), name)), table, name, problems)
    cfg = Config(**kwargs)
    problems += _check(cfg)
    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(problems))
    return cfg


def read_toml(path: Path) -> dict[str, Any]:
    """Parse the TOML file at ``path``; raise one ConfigError a person can act on."""
    try:
        # utf-8-sig: a file saved by an editor that writes a byte-order mark reads as written.
        return tomllib.loads(path.read_bytes().decode("utf-8-sig"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02X} at offset {exc.start}); "
            "save it as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None


def load(path: Path | None) -> Config:
    """Read the config file at ``path``; a missing default file means all defaults."""
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return Config()
        path = DEFAULT_CONFIG_PATH
    data = read_toml(path)
    try:
        return from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def to_dict(cfg: Config) -> dict[str, Any]:
    """Return ``cfg`` as plain TOML-serialisable data."""

    def plain(v: Any) -> Any:
        if isinstance(v, enum.Enum):
            return v.value
        if isinstance(v, tuple):
            return list(v)
        return v

    out: dict[str, Any] = {
        name: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, name)).items()}
        for name in (f.name for f in fields(Config))
        if name not in ("destinations", "forward", "peer")
    }
    if cfg.forward:
        out["forward"] = [{k: plain(v) for k, v in dataclasses.asdict(r).items()} for r in cfg.forward]
    if cfg.peer:
        out["peer"] = [{k: plain(v) for k, v in dataclasses.asdict(p).items()} for p in cfg.peer]
    out["destinations"] = {name: dataclasses.asdict(d) for name, d in cfg.destinations.items()}
    return out


def save(cfg: Config, path: Path) -> None:
    """Write ``cfg`` to ``path`` atomically (temp file, fsync, rename)."""
    save_table(to_dict(cfg), path)


def save_table(data: Mapping[str, Any], path: Path) -> None:
    """Write the TOML tables ``data`` to ``path`` atomically (temp file, fsync, rename).

    ``appliance config set`` uses it to change one key and keep the rest of a file as written."""
    write_atomic(path, tomli_w.dumps(data).encode("utf-8"), 0o600)


def with_overrides(cfg: Config, **scp: Any) -> Config:
    """Return ``cfg`` with the given ``[scp]`` settings replaced (None means keep)."""
    changes = {k: v for k, v in scp.items() if v is not None}
    new = replace(cfg, scp=replace(cfg.scp, **changes))
    problems = _check(new)
    if problems:
        raise ConfigError("invalid setting: " + "; ".join(problems))
    return new
