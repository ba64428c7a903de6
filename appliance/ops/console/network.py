"""The console's Network page: DHCP or a static address through systemd-networkd,
written as a file and applied at once (:mod:`appliance.adapters.network`)."""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any

from appliance import config
from appliance.config import Config, NetworkMode
from appliance.errors import ApplianceError, ConfigError
from appliance.ops.console.screen import WIDTH, Screen


class NetworkPage(Screen):
    """The network setting and the interfaces' live state."""

    def network(self) -> None:
        from appliance.adapters import network

        directory = self.networkd_dir or network.DEFAULT_NETWORKD_DIR
        while True:
            cfg = self.settings.current()
            self.heading("Network (systemd-networkd)")
            try:
                st = network.state()
                lines = network.render_state(st, WIDTH)
            except ApplianceError as exc:
                st, lines = None, [f"cannot read the interfaces: {exc}"]
            for line in lines[:12]:
                self.say(line)
            if len(lines) > 12:
                self.say(f"... {len(lines) - 12} more lines: choose 4")
            self.say(f"Setting: {network.describe(cfg.network)}")
            self.say(f"         kept in {directory / network.NETWORK_FILE}")
            self.say("  1  Use DHCP")
            self.say("  2  Use a static address")
            self.say("  3  Apply the setting again (rewrite the file, apply now)")
            self.say("  4  Show every interface, address and route")
            self.say("  0  Back")
            choice = self.ask("Choice: ")
            if choice in ("0", "", "q", "b"):
                return
            if choice == "1":
                self._set_network(cfg, NetworkMode.DHCP, st)
            elif choice == "2":
                self._set_network(cfg, NetworkMode.STATIC, st)
            elif choice == "3":
                self._apply_network(cfg.network)
            elif choice == "4":
                extra = [f"route: {r}" for r in (st.routes if st else ())]
                self._page(lines + extra)
            else:
                self.say(f"'{choice}' is not on the menu.")

    def _set_network(self, cfg: Config, mode: NetworkMode, st: Any) -> None:
        from appliance.adapters import network

        n = cfg.network
        suggested = n.interface or (network.default_interface(st) if st is not None else "")
        self.say("Interface: the network port's name, as listed above (e.g. eth0)."
                 + (" Empty: every wired interface." if mode is NetworkMode.DHCP else ""))
        iface = self.ask(f"Interface (Enter for {suggested or 'every wired interface'}): ") or suggested
        changes: dict[str, str | None] = {"network.mode": mode.value, "network.interface": iface}
        if mode is NetworkMode.STATIC:
            self.say("Address: IPv4 or IPv6, optionally with /prefix, e.g. 192.168.1.50/24.")
            address = self.ask(f"Address (Enter keeps {n.address or 'none'}): ") or (
                f"{n.address}/{n.prefix}" if n.address else "")
            prefix = ""
            if "/" in address:
                address, prefix = address.split("/", 1)
            if not prefix:
                prefix = self.ask(f"Prefix length, e.g. 24 for 255.255.255.0 (Enter keeps {n.prefix}): ") or str(n.prefix)
            if re.fullmatch(r"\d+\.\d+\.\d+\.\d+", prefix):  # a netmask: 255.255.255.0
                try:
                    prefix = str(ipaddress.ip_network(f"0.0.0.0/{prefix}").prefixlen)
                except ValueError:
                    self.error(f"netmask {prefix} is not valid; use a prefix length such as 24, or 255.255.255.0")
                    return
            if not prefix.isdigit():
                self.error(f"prefix '{prefix}' is not a whole number; use 1 to 32 (IPv4) or 1 to 128 (IPv6)")
                return
            self.say("Gateway: the router on this subnet; '-' for none.")
            gateway = self.ask(f"Gateway (Enter keeps {n.gateway or 'none'}): ") or n.gateway
            self.say("DNS servers: addresses separated by commas; '-' for none.")
            dns = self.ask(f"DNS (Enter keeps {', '.join(n.dns) or 'none'}): ")
            dns_list = list(n.dns) if not dns else [] if dns == "-" else [d.strip() for d in dns.split(",") if d.strip()]
            changes.update({
                "network.address": address,
                "network.prefix": prefix,
                "network.gateway": "" if gateway == "-" else gateway,
                "network.dns": json.dumps(dns_list),
            })
        try:
            new = self.settings.check(changes)
        except ConfigError as exc:
            self.error(exc)
            return
        from appliance.adapters import network as _network

        if self.live_network:
            try:
                clash = _network.conflict(new.network)
            except ApplianceError:
                clash = None  # the interfaces cannot be read: nothing to clash with that we know of
            if clash:
                self.error(clash)
                return
        if not self.confirm(f"Use {_network.describe(new.network)}?"):
            self.say("Unchanged.")
            return
        if self.save(changes):
            self._apply_network(new.network)

    def _apply_network(self, n: config.NetworkConfig) -> None:
        from appliance.adapters import network

        directory = self.networkd_dir or network.DEFAULT_NETWORKD_DIR
        try:
            path = network.write_networkd(n, directory)
            self.say(f"Written {path}: applies at every boot.")
        except ApplianceError as exc:
            self.say(f"Not written: {exc}")
        if not self.live_network:
            self.say("Not applied now (--no-live-network): it applies at the next boot.")
            return
        try:
            self.say(f"Applied now: {network.apply_live(n)}")
        except ApplianceError as exc:
            self.say(f"Not applied now: {exc}")
        self.say("The serial console does not depend on the network: if the box is now unreachable, "
                 "correct the setting here.")
