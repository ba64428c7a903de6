"""Firmware for a plug-and-play DICOM storage appliance."""

__version__ = "0.1.0"
