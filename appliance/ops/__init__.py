"""Running the box: the supervisor, the config service, health, the serial console."""
