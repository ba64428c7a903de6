"""The command line as a person meets it: help, one-line errors, exit codes, start-up cost."""

import argparse
import importlib
import subprocess
import sys

import pytest

from appliance.cli import COMMANDS, command_of, main
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
    """The full parser (for 'appliance --help') must not import scipy, SimpleITK or pyroute2."""
    code = ("import sys, appliance.cli as c; c.build_parser(); "
            "print(sorted(m for m in ('scipy', 'SimpleITK', 'pyroute2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_each_module_adds_the_commands_the_table_gives_it():
    for module in dict.fromkeys(COMMANDS.values()):
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(module).add_commands(sub)
        assert set(sub.choices) == {c for c, m in COMMANDS.items() if m == module}, module


@pytest.mark.parametrize("argv, command", [
    (["run"], "run"),
    (["--config", "run", "-v", "--data-dir", "d", "console", "--help"], "console"),
    (["-d", "scp", "--listen-fd", "3"], "scp"),
    (["--help"], None),
    (["--version"], None),
    (["--config"], None),
])
def test_the_command_is_found_after_the_global_options(argv, command, capsys):
    assert command_of(argv) == command
    assert capsys.readouterr() == ("", "")  # a bad option is reported once, by the full parser


@pytest.mark.parametrize("command", ["run", "console", "config", "status"])
def test_the_box_s_long_running_commands_start_without_pydicom(command):
    """The supervisor and the serial console start on every boot, where loading pydicom,
    numpy and pynetdicom takes seconds: their parser and module must not load them (the
    supervisor loads them after it has spawned the SCP)."""
    code = ("import sys, importlib, appliance.cli as c; c.build_parser(c.command_of(sys.argv[1:])); "
            "importlib.import_module(c.COMMANDS[sys.argv[-1]]); "
            "print(sorted(m for m in ('pydicom', 'pynetdicom', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, "-v", command], capture_output=True, text=True, cwd=ROOT,
                         check=True)
    assert out.stdout.strip() == "[]"
