import pytest

from appliance import config
from appliance.config import Config, DuplicatePolicy
from appliance.errors import ConfigError


def test_defaults_match_the_statement():
    c = Config()
    assert (c.scp.ae_title, c.scp.port, c.scp.max_associations) == ("ELEKTA_STORAGE", 104, 5)
    assert c.store.duplicate_policy is DuplicatePolicy.REJECT and c.store.charset_strict


def test_a_file_with_only_the_port_is_complete(tmp_path):
    p = tmp_path / "a.toml"
    p.write_text("[scp]\nport = 11112\n")
    c = config.load(p)
    assert c.scp.port == 11112 and c.scp.ae_title == "ELEKTA_STORAGE"


def test_every_problem_is_reported_at_once(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text(
        '[scp]\nae_title = "CT_SCANNER_ROOM_01"\nport = 70000\nmax_pdu = 100\ncolour = "red"\n'
        '[store]\nduplicate_policy = "overwrite"\n'
    )
    with pytest.raises(ConfigError) as e:
        config.load(p)
    msg = str(e.value)
    for part in ("'CT_SCANNER_ROOM_01' is 18 characters; the limit is 16", "scp.port 70000",
                 "scp.max_pdu 100", "scp.colour is not a known setting", "'overwrite' is not one of"):
        assert part in msg


def test_invalid_toml_and_wrong_types(tmp_path):
    p = tmp_path / "x.toml"
    p.write_text("[scp\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(p)
    p.write_text('[scp]\nport = "104"\ncheck_called_ae = 1\n')
    with pytest.raises(ConfigError, match="must be a whole number.*must be true or false"):
        config.load(p)
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "missing.toml")


def test_save_is_atomic_and_round_trips(tmp_path):
    p = tmp_path / "etc" / "appliance.toml"
    c = config.with_overrides(Config(), ae_title="BOX", port=4242)
    config.save(c, p)
    assert config.load(p) == c
    assert [f.name for f in p.parent.iterdir()] == ["appliance.toml"]


def test_overrides_are_validated():
    with pytest.raises(ConfigError, match="limit is 16"):
        config.with_overrides(Config(), ae_title="X" * 17)
    assert config.with_overrides(Config(), port=None).scp.port == 104


def test_a_file_that_is_not_utf8_is_one_error_saying_so(tmp_path, capsys):
    from appliance.cli import main

    p = tmp_path / "latin1.toml"
    p.write_bytes('[scp]\nae_title = "RÉSEAU"\n'.encode("latin-1"))  # as an old editor saves it
    with pytest.raises(ConfigError) as e:
        config.load(p)
    msg = str(e.value)
    assert str(p) in msg and "not UTF-8" in msg and "save it as UTF-8" in msg and "0xC9" in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no UnicodeDecodeError chained
    # The command line reports it in one line, without a traceback.
    assert main(["--config", str(p), "--data-dir", str(tmp_path / "data"), "ls"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "save it as UTF-8" in err[0] and str(p) in err[0], err


@pytest.mark.parametrize("value", ["0.0001", "0", "0.999", "3600.5", "-1", "nan", "inf"])
def test_a_network_timeout_outside_1_to_3600_seconds_is_refused(tmp_path, value):
    p = tmp_path / "t.toml"
    p.write_text(f"[scp]\nnetwork_timeout = {value}\n")
    with pytest.raises(ConfigError, match=r"scp\.network_timeout .* is out of range; use 1 to 3600 seconds"):
        config.load(p)


#: The [scp] limits added for issue 14: (field, lowest, highest, unit) as the README gives them.
SCP_LIMITS = [
    ("acse_timeout", 1, 3600, "seconds"),
    ("network_timeout", 1, 3600, "seconds"),
    ("pdu_timeout", 1, 3600, "seconds"),
    ("idle_timeout", 10, 86400, "seconds"),
    ("max_command_bytes", 1024, 1 << 20, "bytes"),
    ("max_associate_rq_bytes", 16384, 1 << 20, "bytes"),
    ("max_pending_connections", 8, 4096, ""),
]


@pytest.mark.parametrize("name, low, high, unit", SCP_LIMITS, ids=[s[0] for s in SCP_LIMITS])
def test_each_scp_limit_is_checked_against_its_range(tmp_path, name, low, high, unit):
    whole = isinstance(getattr(Config().scp, name), int)
    p = tmp_path / "limits.toml"
    for value in (low, high, (low + high) // 2):
        p.write_text(f"[scp]\n{name} = {value}\n")
        assert getattr(config.load(p).scp, name) == value
    outside = [low - 1, high + 1, 0, -5] + ([] if whole else [low - 0.001, high + 0.5])
    for value in outside:
        p.write_text(f"[scp]\n{name} = {value}\n")
        with pytest.raises(ConfigError) as e:
            config.load(p)
        assert f"scp.{name} {value if whole else float(value)} is out of range" in str(e.value)
        assert f"use {low} to {high} {unit}".rstrip() in str(e.value), str(e.value)
    if whole:
        p.write_text(f"[scp]\n{name} = {low}.5\n")
        with pytest.raises(ConfigError, match=f"scp.{name}: .* must be a whole number"):
            config.load(p)


def test_the_scp_limits_have_the_documented_defaults():
    s = Config().scp
    assert (s.acse_timeout, s.network_timeout, s.pdu_timeout, s.idle_timeout) == (30.0, 60.0, 120.0, 900.0)
    assert (s.max_command_bytes, s.max_associate_rq_bytes, s.max_pending_connections) == (65536, 131072, 256)
    for name, low, high, _ in SCP_LIMITS:
        assert low <= getattr(s, name) <= high, name


def test_the_readme_example_is_the_defaults():
    import re
    import tomllib

    from helpers import ROOT

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Configuration"):]
    example = re.search(r"```toml\n(.*?)```", section, re.S).group(1)
    assert config.from_dict(tomllib.loads(example)) == Config()


def test_a_config_file_with_a_byte_order_mark_reads_as_written(tmp_path):
    from appliance import config

    path = tmp_path / "appliance.toml"
    path.write_bytes(b"\xef\xbb\xbf" + b'[scp]\nport = 11112\nae_title = "BOM_AE"\n')
    cfg = config.load(path)
    assert cfg.scp.port == 11112 and cfg.scp.ae_title == "BOM_AE"
