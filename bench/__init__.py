"""The benchmarks' and the soak run's code; ``scripts/`` holds their thin launchers.

``scp/`` is ``scripts/bench-scp`` (our SCP against DCMTK's storescp), ``soak`` is
``scripts/soak``, ``hostile/`` the hostile peers the soak run and ``tests/test_soak.py``
use, ``sink`` a receiver that stores nothing, ``series`` and ``echo`` generated series and a
bare C-ECHO client, ``launch`` what every launcher does. Not part of the appliance package
(``pyproject.toml`` packages ``appliance*`` only).
"""
