"""What every ``scripts/`` launcher of a benchmark does: find a Python with the appliance's
dependencies (this one, or the project's ``.venv``), then run the benchmark's ``main``."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_PYTHON = REPO / ".venv" / "bin" / "python"


def run(module: str, script: str, needs: tuple[str, ...] = ("numpy", "pydicom")) -> None:
    """Run ``module.main()`` and exit with its code; re-run ``script`` under ``.venv`` if this
    Python lacks one of ``needs``."""
    try:
        for name in needs:
            importlib.import_module(name)
    except ImportError:
        name = Path(script).name
        if not VENV_PYTHON.exists() or Path(sys.prefix).resolve() == VENV_PYTHON.parent.parent.resolve():
            print(f"{name}: needs {', '.join(needs)}: run scripts/setup-venv, or use a Python that has them",
                  file=sys.stderr)
            raise SystemExit(2) from None
        os.execv(VENV_PYTHON, [str(VENV_PYTHON), script, *sys.argv[1:]])
    raise SystemExit(importlib.import_module(module).main())
