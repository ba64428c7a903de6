"""Helpers of ``scripts/bench-scp``: the generated series and a bare C-ECHO client.

Not part of the appliance package (``pyproject.toml`` packages ``appliance*`` only).
"""
