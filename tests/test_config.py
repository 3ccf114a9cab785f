"""Configuration loading: every failure names file, dotted key and problem; generated files fresh."""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path

import pytest

from gateway import configfile
from gateway.config import GatewayConfig, effective_dict, load_config, parse_config
from gateway.errors import ConfigError

REPO_CONFIG = Path(__file__).resolve().parent.parent / "config"
REGENERATE = "regenerate with: python -m gateway.configfile --write"

VALID = """\
schema_version = 1

[store]
id = "store-0042"

[cloud]
url = "mqtts://broker.example.com:8883"

[store_bus]
url = "mqtt://127.0.0.1:1883"

[[payment_terminals]]
id = "pt-1"
endpoint = "/dev/ttyUSB0"
pos_terminals = ["pos-1"]
password = "123456"
"""


def write(tmp_path: Path, text: str | bytes, name: str = "gateway.toml") -> Path:
    """The text as a config file in tmp_path."""
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def load_error(path: Path, env: dict[str, str] | None = None) -> ConfigError:
    """The ConfigError load_config raises for this file."""
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env or {})
    return info.value


def test_valid_file_loads(tmp_path: Path) -> None:
    config, warnings = load_config(write(tmp_path, VALID), env={})
    assert config.store.id == "store-0042"
    assert config.cloud.port == 8883
    assert config.payment_terminal_for("pos-1") is not None
    assert warnings == []


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    err = load_error(path)
    assert err.path == str(path)
    assert str(err) == f"{path}: file not found"


def test_directory_as_path_is_unreadable(tmp_path: Path) -> None:
    err = load_error(tmp_path)
    assert err.path == str(tmp_path)
    assert "cannot read" in str(err)
    assert "directory" in str(err).lower()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path: Path) -> None:
    path = write(tmp_path, VALID)
    path.chmod(0)
    err = load_error(path)
    assert str(err).startswith(f"{path}: cannot read")
    assert "ermission" in str(err)


def test_not_utf8(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.encode() + b'\n[logging]\nlevel = "\xff"\n')
    err = load_error(path)
    assert str(err).startswith(f"{path}: not UTF-8")


def test_invalid_toml_names_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.replace('id = "store-0042"', "id = store-0042"))
    err = load_error(path)
    assert str(err).startswith(f"{path}: invalid TOML")
    assert "line 4" in str(err)
    assert "column" in str(err)


@pytest.mark.parametrize(
    ("old", "new", "key", "problem"),
    [
        pytest.param("[cloud]\n", '[cloud]\nkeepalive_s = "thirty"\n', "cloud.keepalive_s",
                     "valid integer", id="wrong-type"),
        pytest.param("[cloud]\n", "[cloud]\nkeepalive_s = 1\n", "cloud.keepalive_s",
                     "greater than or equal to 5", id="out-of-range"),
        pytest.param('"mqtts://broker.example.com:8883"', '"https://broker.example.com"',
                     "cloud.url", "mqtt:// or mqtts://", id="bad-url"),
        pytest.param('"mqtt://127.0.0.1:1883"', '"mqtt://127.0.0.1:99999"',
                     "store_bus.url", "port", id="bad-port"),
        pytest.param('id = "store-0042"', 'id = "Store 42"', "store.id",
                     "pattern", id="bad-store-id"),
        pytest.param('url = "mqtt://127.0.0.1:1883"', "", "store_bus.url",
                     "required key is missing", id="missing-required"),
        pytest.param('endpoint = "/dev/ttyUSB0"', 'endpoint = "COM3"',
                     "payment_terminals.0.endpoint", "expected a /dev path", id="bad-endpoint"),
        pytest.param('password = "123456"', 'password = "12"',
                     "payment_terminals.0.password", "pattern", id="bad-terminal-password"),
        pytest.param("schema_version = 1", "schema_version = 7", "schema_version",
                     "upgrade the gateway", id="from-the-future"),
    ],
)  # fmt: skip
def test_invalid_values_name_file_key_and_problem(
    tmp_path: Path, old: str, new: str, key: str, problem: str
) -> None:
    assert old in VALID
    path = write(tmp_path, VALID.replace(old, new, 1))
    err = load_error(path)
    assert (err.path, err.key) == (str(path), key)
    assert str(err).startswith(f"{path}: {key}: ")
    assert problem in err.problem


def test_unknown_keys_warn_but_load(tmp_path: Path) -> None:
    text = VALID.replace("[cloud]\n", "[cloud]\nurll = 1\n") + "baud = 1\n\n[extra]\nx = 1\n"
    config, warnings = load_config(write(tmp_path, text), env={})
    assert config.cloud.url == "mqtts://broker.example.com:8883"
    joined = "\n".join(warnings)
    for key in ("cloud.urll", "payment_terminals.0.baud", "extra"):
        assert repr(key) in joined
    assert all(w.startswith(str(tmp_path)) for w in warnings)


def test_env_overrides_file_values(tmp_path: Path) -> None:
    env = {
        "STORE_GATEWAY__CLOUD__URL": "mqtt://10.0.0.9:1884",
        "STORE_GATEWAY__PAYMENT_TERMINALS__0__ENDPOINT": "socket://127.0.0.1:20007",
        "STORE_GATEWAY__CLOUD__KEEPALIVE_S": "45",
        "STORE_GATEWAY__CLOUD__PROTOCOL": "5",  # text-only key: stays "5", not the number
        "UNRELATED": "x",
    }
    config, _ = load_config(write(tmp_path, VALID), env=env)
    assert config.cloud.url == "mqtt://10.0.0.9:1884"
    assert config.payment_terminals[0].endpoint == "socket://127.0.0.1:20007"
    assert config.cloud.keepalive_s == 45
    assert config.cloud.protocol == "5"


def test_invalid_env_override_names_the_key(tmp_path: Path) -> None:
    err = load_error(write(tmp_path, VALID), env={"STORE_GATEWAY__CLOUD__URL": "ftp://x"})
    assert err.key == "cloud.url"


def test_env_override_of_missing_list_entry(tmp_path: Path) -> None:
    env = {"STORE_GATEWAY__PAYMENT_TERMINALS__3__ENDPOINT": "/dev/ttyS0"}
    err = load_error(write(tmp_path, VALID), env=env)
    assert "STORE_GATEWAY__PAYMENT_TERMINALS__3__ENDPOINT" in str(err)


def _with_password_file(tmp_path: Path, mode: int) -> Path:
    secret = tmp_path / "cloud.pw"
    secret.write_text("hunter2\n")
    secret.chmod(mode)
    extra = f'username = "gw"\npassword_file = "{secret}"\n'
    return write(tmp_path, VALID.replace("[cloud]\n", "[cloud]\n" + extra))


def test_group_readable_secret_file_is_refused(tmp_path: Path) -> None:
    err = load_error(_with_password_file(tmp_path, 0o640))
    assert err.key == "cloud.password_file"
    assert "readable by group or others" in err.problem
    assert "chmod 600" in err.problem


def test_private_secret_file_is_accepted(tmp_path: Path) -> None:
    config, _ = load_config(_with_password_file(tmp_path, 0o600), env={})
    assert config.cloud.password_file == tmp_path / "cloud.pw"


def test_missing_secret_file_is_refused(tmp_path: Path) -> None:
    path = _with_password_file(tmp_path, 0o600)
    (tmp_path / "cloud.pw").unlink()
    assert load_error(path).key == "cloud.password_file"


def test_effective_dict_redacts_secrets(tmp_path: Path) -> None:
    config, _ = load_config(write(tmp_path, VALID), env={})
    data = effective_dict(config)
    assert data["payment_terminals"][0]["password"] == "***"
    assert "123456" not in json.dumps(data)
    assert data["cloud"]["url"] == "mqtts://broker.example.com:8883"  # not a secret


# --- generated files --------------------------------------------------------------------------


def test_example_config_validates() -> None:
    config, warnings = load_config(REPO_CONFIG / configfile.EXAMPLE_FILE, env={})
    assert warnings == []
    assert config.store.id == configfile.EXAMPLE_STORE_ID
    assert config.store_bus.url == "mqtt://127.0.0.1:1883"
    assert len(config.payment_terminals) == 1
    assert [c.number for c in config.locker_banks[0].compartments] == [1, 2]


def test_schema_file_is_not_stale() -> None:
    checked_in = (REPO_CONFIG / configfile.SCHEMA_FILE).read_text(encoding="utf-8")
    assert checked_in == configfile.render_schema(), (
        f"config/{configfile.SCHEMA_FILE} is stale; {REGENERATE}"
    )


def test_example_file_is_not_stale() -> None:
    checked_in = (REPO_CONFIG / configfile.EXAMPLE_FILE).read_text(encoding="utf-8")
    assert checked_in == configfile.render_starter(), (
        f"config/{configfile.EXAMPLE_FILE} is stale; {REGENERATE}"
    )


def test_generator_check_mode_detects_staleness(tmp_path: Path) -> None:
    assert configfile.main(["--check", "--dir", str(tmp_path)]) == 1
    assert configfile.main(["--write", "--dir", str(tmp_path)]) == 0
    assert configfile.main(["--check", "--dir", str(tmp_path)]) == 0


def _all_fields(model: type[GatewayConfig] | type) -> set[str]:
    names: set[str] = set()
    for name, field in model.model_fields.items():
        names.add(name)
        sub = configfile._item_model(field.annotation)
        if sub is not None:
            names |= _all_fields(sub)
    return names


def test_starter_documents_every_key() -> None:
    text = configfile.render_starter()
    mentioned = set(re.findall(r"^(?:#\s*)?\s*(\w+) =", text, re.MULTILINE))
    mentioned |= set(re.findall(r"^#\s+(\w+): ", text, re.MULTILINE))  # inline-table fields
    mentioned |= set(re.findall(r"^\[\[?(\w+)\]", text, re.MULTILINE))  # sections
    assert _all_fields(GatewayConfig) - mentioned == set()


def test_starter_commented_defaults_are_the_real_defaults() -> None:
    """Uncommenting every ``# key = value`` line yields a valid file with the same meaning."""
    text = configfile.render_starter("store-7")
    commented = re.compile(r"^# (\w+ = (?!\s*\(not set).*)$", re.MULTILINE)
    assert len(commented.findall(text)) > 40
    uncommented = commented.sub(r"\1", text)
    as_is = parse_config(tomllib.loads(text))
    spelled_out = parse_config(tomllib.loads(uncommented))
    assert as_is.store.id == "store-7"
    assert spelled_out == as_is


def test_starter_fails_loudly_without_an_example_for_a_required_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delitem(configfile._EXAMPLES, "cloud.url")
    with pytest.raises(LookupError, match=r"cloud\.url"):
        configfile.render_starter()
