"""The command line as a person meets it: help, one-line errors, exit codes, start-up cost."""

import subprocess
import sys

from appliance.cli import main
from helpers import ROOT


def test_every_command_has_help(capsys):
    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    for command in ("scp", "ls", "locate", "reindex", "import", "echo", "send", "export", "queue",
                    "run", "config", "status", "console", "rt-export"):
        assert f"    {command}" in out, command


def test_usage_errors_exit_2_and_appliance_errors_exit_1(tmp_path, capsys):
    try:
        main(["scp", "--max-associations", "many"])
    except SystemExit as e:
        assert e.code == 2
    capsys.readouterr()
    bad = tmp_path / "bad.toml"
    bad.write_text("[scp]\nport = 0.5\n")
    assert main(["--config", str(bad), "--data-dir", str(tmp_path), "ls"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("appliance: ") and "scp.port" in err[0]


def test_starting_a_command_imports_no_heavy_library():
    """Every 'appliance' command (and the SCP child) builds the whole parser: it must not
    import scipy, SimpleITK or pyroute2 on the way."""
    code = ("import sys, appliance.cli as c; c.build_parser(); "
            "print(sorted(m for m in ('scipy', 'SimpleITK', 'pyroute2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
