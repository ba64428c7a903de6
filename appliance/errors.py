"""The appliance's error hierarchy: callers branch on these, ``cli`` turns them into exit codes."""


class ApplianceError(Exception):
    """Base of every error the appliance reports to a person."""


class ConfigError(ApplianceError):
    """The configuration file or a configuration value is invalid."""


class StoreError(ApplianceError):
    """The store or its index cannot do what was asked."""


class StoreFullError(StoreError):
    """The store's disk is full or below its free-space watermark."""


class StoreDiskError(StoreError):
    """The store's disk failed: an I/O error, or it has become read-only."""


class MediaError(ApplianceError):
    """A CD or USB medium cannot be read or written."""


class NetworkError(ApplianceError):
    """A DICOM peer could not be reached or refused us."""
