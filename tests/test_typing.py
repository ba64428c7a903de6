"""STYLE.md: mypy --strict on appliance/ (configured in pyproject.toml)."""

import shutil
import subprocess
import sys

import pytest

from helpers import ROOT


def test_mypy_strict_is_clean():
    if shutil.which("mypy") is None and subprocess.run([sys.executable, "-m", "mypy", "--version"],
                                                        capture_output=True).returncode != 0:
        pytest.fail("mypy is not installed; scripts/test installs the test extra, which has it")
    r = subprocess.run([sys.executable, "-m", "mypy"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
