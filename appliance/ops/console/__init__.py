"""``appliance console``: the configuration menu on the serial line (ttyS0, 115200 8N1).

A line-oriented numbered menu for a VT100 or a dumb terminal: 80x24, no colours, no cursor
addressing; every screen fits in 24 lines and every line in 80 columns. Each field shows its
current value and one line of help. Every entry is checked against the whole configuration
before anything is saved, and an error says what was wrong and what is allowed.

Changes go through the config service of ``appliance run`` when it runs, so they take effect
at once (a new port or AE title restarts the Storage SCP); otherwise they are written to the
config file and apply at the next start. The network setting is also written as a
systemd-networkd file and applied at once (:mod:`appliance.adapters.network`).

The console depends on nothing but its two streams and local files and sockets: a wrong
gateway or an address conflict costs the box its network, never this menu.

The package: :mod:`~appliance.ops.console.screen` (the terminal, field editing),
:mod:`~appliance.ops.console.menu` (:class:`Console`: the main menu and its loop) and one
module per group of pages (destinations, export: send to a destination, forwarding: the
rules and the queue, media: USB and CD, network, security: the TLS certificate, the TLS port,
known peers, a certificate import, storage: delete, protect, retention, system: log, power,
service shell). A new page is a method of a page class and an entry in
``Console.run``.
"""

from appliance.ops.console.menu import Console

__all__ = ["Console"]
