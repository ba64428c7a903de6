"""Removable media: CD import and USB export (file-sets with a DICOMDIR)."""
