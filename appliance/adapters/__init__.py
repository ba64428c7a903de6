"""The edges: udev (pyudev), systemd (sdnotify), the network stack (pyroute2)."""
