"""The network adapter: the live state of the interfaces (pyroute2) and the persistent setting.

The image's network stack is **systemd-networkd**. The setting (``[network]`` of the config
file) is written as one generated file, ``NETWORKD_DIR/10-appliance.adapters.network``, which networkd
applies at every boot: DHCP, or a static address, prefix, gateway and DNS servers.
A static setting is also applied at once with pyroute2 (address, link up, default route),
and networkd is asked to reload when it runs (so DHCP and DNS follow without a reboot).

Nothing here waits on the network: netlink is local, and every command has a timeout, so a
bad gateway or an address conflict costs the box its network, never the serial console.

Only this module imports pyroute2; callers get frozen dataclasses.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from appliance.config import NetworkConfig, NetworkMode
from appliance.errors import ApplianceError

log = logging.getLogger(__name__)

#: Where systemd-networkd reads its configuration on the box.
DEFAULT_NETWORKD_DIR = Path("/etc/systemd/network")
NETWORK_FILE = "10-appliance.adapters.network"
#: What a ``.network`` file matches when no interface is named: every wired interface.
_ANY_ETHERNET = "en* eth*"
_IFF_UP = 0x1
_IFF_LOOPBACK = 0x8
_IFA_F_PERMANENT = 0x80
_RT_SCOPE_UNIVERSE = 0
_RTPROT_STATIC = 4
_AF = {2: 4, 10: 6}


class NetworkConfigError(ApplianceError):
    """The network setting cannot be written or applied; the message says what to do."""


Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def run_command(cmd: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` with a timeout, capturing its output (the default :data:`Runner`)."""
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=30, check=False)


# -- the live state ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Address:
    """One address on an interface."""

    address: str
    prefix: int
    version: int
    #: "global", "link", "host".
    scope: str
    #: True when set by hand or by us (permanent); False when it has a lifetime (DHCP, SLAAC).
    permanent: bool

    def __str__(self) -> str:
        return f"{self.address}/{self.prefix}"


@dataclass(frozen=True)
class Interface:
    """One network interface as the kernel sees it now."""

    index: int
    name: str
    mac: str
    #: The kernel's operational state: "up", "down", "dormant", "unknown" (loopback), ...
    state: str
    #: True when administratively up (``ip link set up``).
    admin_up: bool
    #: True when a cable (or peer) is connected.
    carrier: bool
    loopback: bool
    addresses: tuple[Address, ...]


@dataclass(frozen=True)
class Route:
    """One route of the main table."""

    destination: str  # "default" or "192.168.1.0/24"
    gateway: str  # "" when directly connected
    interface: str
    version: int
    #: "static", "dhcp", "kernel", "boot", "ra" or the protocol number.
    protocol: str

    def __str__(self) -> str:
        via = f" via {self.gateway}" if self.gateway else ""
        return f"{self.destination}{via} dev {self.interface} ({self.protocol})"


_SCOPES = {0: "global", 200: "site", 253: "link", 254: "host"}
_PROTOCOLS = {2: "kernel", 3: "boot", 4: "static", 9: "ra", 16: "dhcp"}


@dataclass(frozen=True)
class NetworkState:
    interfaces: tuple[Interface, ...]
    routes: tuple[Route, ...]

    def interface(self, name: str) -> Interface | None:
        return next((i for i in self.interfaces if i.name == name), None)


class _Netlink:
    """An IPRoute socket, in the current network namespace or in ``netns``."""

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        try:
            self.ipr = IPRoute(netns=netns) if netns else IPRoute()
        except (OSError, NetlinkError) as exc:
            where = f" in network namespace {netns}" if netns else ""
            raise NetworkConfigError(f"cannot read the network state{where}: {exc}") from None

    def __enter__(self) -> Any:
        return self.ipr

    def __exit__(self, *_exc: object) -> None:
        self.ipr.close()


def state(netns: str | None = None) -> NetworkState:
    """Every interface (link state, MAC, addresses) and the main routing table, read now."""
    with _Netlink(netns) as ipr:
        links = list(ipr.get_links())
        addrs = list(ipr.get_addr())
        routes = list(ipr.get_routes(table=254))
    names = {link["index"]: link.get("ifname") or f"if{link['index']}" for link in links}
    by_index: dict[int, list[Address]] = {}
    for a in addrs:
        value = a.get("address") or a.get("local")
        if not value:
            continue
        flags = a.get("IFA_FLAGS") or a["flags"]
        by_index.setdefault(a["index"], []).append(Address(
            address=str(value), prefix=int(a["prefixlen"]), version=_AF.get(a["family"], 0),
            scope=_SCOPES.get(a["scope"], str(a["scope"])), permanent=bool(flags & _IFA_F_PERMANENT)))
    interfaces = tuple(
        Interface(
            index=link["index"],
            name=names[link["index"]],
            mac=str(link.get("address") or ""),
            state=str(link.get("operstate") or "unknown").lower(),
            admin_up=bool(link["flags"] & _IFF_UP),
            carrier=bool(link.get("carrier")),
            loopback=bool(link["flags"] & _IFF_LOOPBACK),
            addresses=tuple(by_index.get(link["index"], ())),
        )
        for link in sorted(links, key=lambda link: link["index"])
    )
    out = []
    for r in routes:
        if r["family"] not in _AF or r.get("type", 1) != 1:  # unicast routes only
            continue
        dst = r.get("dst")
        out.append(Route(
            destination=f"{dst}/{r['dst_len']}" if dst else "default",
            gateway=str(r.get("gateway") or ""),
            interface=names.get(r.get("oif") or 0, ""),
            version=_AF[r["family"]],
            protocol=_PROTOCOLS.get(r["proto"], str(r["proto"])),
        ))
    return NetworkState(interfaces, tuple(out))


def render_state(st: NetworkState, width: int = 80) -> list[str]:
    """Lines for an 80-column terminal: each interface, its addresses, then the routes."""
    lines = []
    for i in st.interfaces:
        link = "up" if i.carrier and i.admin_up else ("no cable" if i.admin_up else "down")
        lines.append(f"{i.name:<10} {link:<9} MAC {i.mac or '-'}")
        for a in i.addresses:
            kind = "" if a.permanent or a.scope != "global" else " (DHCP/auto)"
            lines.append(f"{'':<10} IPv{a.version} {a}{kind}")
    defaults = [r for r in st.routes if r.destination == "default"]
    lines += [f"default route: via {r.gateway} dev {r.interface}" for r in defaults] or ["default route: none"]
    return [line[:width] for line in lines]


def default_interface(st: NetworkState) -> str:
    """The interface the box most likely means: the one with the default route, else the
    first wired one with a cable, else the first that is not loopback ("" if none)."""
    for r in st.routes:
        if r.destination == "default" and r.interface:
            return r.interface
    wired = [i for i in st.interfaces if not i.loopback]
    for i in wired:
        if i.carrier:
            return i.name
    return wired[0].name if wired else ""


# -- the persistent setting ---------------------------------------------------------------------


def render_networkd(n: NetworkConfig) -> str:
    """The systemd-networkd ``.network`` file for setting ``n``."""
    lines = [
        "# Generated by the appliance from [network] in its config file; changes here are overwritten.",
        "# Change it on the serial console (Network) or with 'appliance config set network.KEY VALUE'.",
        "[Match]",
        f"Name={n.interface or _ANY_ETHERNET}",
        "",
        "[Network]",
    ]
    if n.mode is NetworkMode.DHCP:
        lines.append("DHCP=yes")
    else:
        lines.append(f"Address={n.address}/{n.prefix}")
        if n.gateway:
            lines.append(f"Gateway={n.gateway}")
        lines.extend(f"DNS={d}" for d in n.dns)
    lines += ["", "[Link]", "# The appliance runs without a network too: boot does not wait for this link.",
              "RequiredForOnline=no", ""]
    return "\n".join(lines)


def write_networkd(n: NetworkConfig, directory: Path = DEFAULT_NETWORKD_DIR) -> Path:
    """Write the ``.network`` file for ``n`` into ``directory`` atomically; return its path."""
    path = directory / NETWORK_FILE
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".appliance-", suffix=".network", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(render_networkd(n))
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        raise NetworkConfigError(f"cannot write {path}: {exc.strerror}; the network setting is not saved "
                                 "for the next boot") from None
    log.info("network setting written to %s (%s)", path, describe(n))
    return path


def describe(n: NetworkConfig) -> str:
    """The setting in a few words: ``static 192.168.1.50/24 via 192.168.1.1, DNS 192.168.1.1``."""
    where = n.interface or "every wired interface"
    if n.mode is NetworkMode.DHCP:
        return f"DHCP on {where}"
    text = f"static {n.address}/{n.prefix} on {where}"
    text += f", gateway {n.gateway}" if n.gateway else ", no gateway"
    return text + (f", DNS {' '.join(n.dns)}" if n.dns else "")


# -- applying now ---------------------------------------------------------------------------------


def apply_live(n: NetworkConfig, *, netns: str | None = None, runner: Runner | None = None) -> str:
    """Apply ``n`` now; return what happened in words. Raise NetworkConfigError when it cannot.

    Static: the address goes on the interface (other permanent global addresses of that IP
    version are removed), the link is set up and the default route replaced (or removed
    when there is no gateway). DHCP: the static addresses and routes we would have set are
    removed. Then, if systemd-networkd runs (``runner``: the ``networkctl`` commands), it is
    asked to reload and reconfigure the interface, which starts DHCP and sets DNS."""
    if not n.interface:
        return _reload_networkd(n, runner, "DHCP on every wired interface: nothing to do by hand")
    try:
        with _Netlink(netns) as ipr:
            found = ipr.link_lookup(ifname=n.interface)
            if not found:
                names = ", ".join(i.name for i in state(netns).interfaces if not i.loopback) or "none"
                raise NetworkConfigError(f"there is no interface '{n.interface}' (interfaces: {names}); the "
                                         "setting is saved and applies when it appears")
            index = found[0]
            if n.mode is NetworkMode.STATIC:
                done = _apply_static(ipr, index, n, netns)
            else:
                done = _remove_static(ipr, index)
    except NetlinkError as exc:
        if exc.code == errno.EPERM:
            raise NetworkConfigError("not permitted to change the network now (needs root or CAP_NET_ADMIN); "
                                     "the setting is saved and applies at the next boot") from None
        raise NetworkConfigError(f"the kernel refused the network change: {os.strerror(exc.code)}; the setting "
                                 "is saved and applies at the next boot") from None
    log.info("network applied on %s: %s", n.interface, done)
    return _reload_networkd(n, runner, done)


def conflict(n: NetworkConfig, *, netns: str | None = None) -> str | None:
    """Say why static setting ``n`` clashes with another interface of this box, or None."""
    if n.mode is not NetworkMode.STATIC or not n.address:
        return None
    want = ipaddress.ip_interface(f"{n.address}/{n.prefix}")
    for other in state(netns).interfaces:
        if other.name == n.interface:
            continue
        for a in other.addresses:
            if a.address == str(want.ip):
                return f"address {want.ip} is already used by interface {other.name} of this box; choose another"
            if a.scope == "global" and a.version == want.version and ipaddress.ip_interface(str(a)).network.overlaps(
                    want.network):
                return (f"subnet {want.network} overlaps {a} of interface {other.name}; two interfaces on one "
                        "subnet confuse routing: choose another address or prefix")
    return None


def _apply_static(ipr: Any, index: int, n: NetworkConfig, netns: str | None) -> str:
    want = ipaddress.ip_interface(f"{n.address}/{n.prefix}")
    family = 2 if want.version == 4 else 10
    clash = conflict(n, netns=netns)
    if clash:
        raise NetworkConfigError(clash)
    present = False
    for a in ipr.get_addr(index=index, family=family):
        value = a.get("address") or a.get("local")
        flags = a.get("IFA_FLAGS") or a["flags"]
        if str(value) == str(want.ip) and a["prefixlen"] == want.network.prefixlen:
            present = True
        elif a["scope"] == _RT_SCOPE_UNIVERSE and flags & _IFA_F_PERMANENT:
            ipr.addr("del", index=index, address=str(value), prefixlen=a["prefixlen"])
    if not present:
        ipr.addr("add", index=index, address=str(want.ip), prefixlen=want.network.prefixlen)
    ipr.link("set", index=index, state="up")
    if n.gateway:
        ipr.route("replace", dst="default" if want.version == 4 else "::/0", gateway=n.gateway, oif=index,
                  family=family, proto=_RTPROT_STATIC)
        route = f"default route via {n.gateway}"
    else:
        for r in ipr.get_routes(family=family, table=254, oif=index):
            if not r.get("dst") and r["dst_len"] == 0:
                ipr.route("del", dst="default" if want.version == 4 else "::/0", oif=index, family=family,
                          gateway=r.get("gateway"))
        route = "no default route"
    return f"{want} set on {n.interface}, {route}"


def _remove_static(ipr: Any, index: int) -> str:
    removed = []
    for r in ipr.get_routes(table=254, oif=index):
        if not r.get("dst") and r["dst_len"] == 0 and r["proto"] == _RTPROT_STATIC:
            ipr.route("del", dst="default" if r["family"] == 2 else "::/0", oif=index, family=r["family"],
                      gateway=r.get("gateway"))
    for a in ipr.get_addr(index=index):
        flags = a.get("IFA_FLAGS") or a["flags"]
        if a["scope"] == _RT_SCOPE_UNIVERSE and flags & _IFA_F_PERMANENT:
            value = a.get("address") or a.get("local")
            ipr.addr("del", index=index, address=str(value), prefixlen=a["prefixlen"])
            removed.append(f"{value}/{a['prefixlen']}")
    return f"static address {', '.join(removed)} removed" if removed else "no static address to remove"


def networkd_running() -> bool:
    """True when systemd is PID 1 and systemd-networkd runs (its state file exists)."""
    return (Path("/run/systemd/system").is_dir() and Path("/run/systemd/netif/state").exists()
            and shutil.which("networkctl") is not None)


def _reload_networkd(n: NetworkConfig, runner: Runner | None, done: str) -> str:
    if runner is None:
        if not networkd_running():
            return done + ("" if n.mode is NetworkMode.STATIC else
                           "; DHCP starts when systemd-networkd runs (at the next boot)")
        runner = run_command
    cmds = [["networkctl", "reload"]]
    if n.interface:
        cmds.append(["networkctl", "reconfigure", n.interface])
    for cmd in cmds:
        try:
            r = runner(cmd)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{done}; '{' '.join(cmd)}' failed ({exc}); the setting applies at the next boot"
        if r.returncode != 0:
            why = (r.stderr or r.stdout).strip().splitlines()
            return f"{done}; '{' '.join(cmd)}' failed ({why[-1] if why else r.returncode}); it applies at the next boot"
    return f"{done}; systemd-networkd reloaded"


def addresses_of(st: NetworkState, name: str) -> Iterator[str]:
    """The addresses (``a/prefix``) of interface ``name`` in ``st``."""
    i = st.interface(name)
    for a in i.addresses if i else ():
        yield str(a)
