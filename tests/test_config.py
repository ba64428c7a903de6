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
