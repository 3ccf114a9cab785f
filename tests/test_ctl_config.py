"""``gatewayctl config …``: init, validate, show, set, schema; exit codes; files left intact."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway import cli, configfile
from gateway.config import json_schema, load_config
from gateway.ctl import COMMANDS, main

BACKUP_RE = re.compile(r"gateway\.toml\.\d{8}T\d{6}Z(-\d+)?\.bak")


def ctl(config: Path, *args: str) -> int:
    """Run gatewayctl in-process against ``config``."""
    return main(["--config", str(config), *args])


@pytest.fixture(autouse=True)
def _no_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("STORE_GATEWAY"):
            monkeypatch.delenv(name)


@pytest.fixture
def config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A starter configuration written by ``config init``."""
    path = tmp_path / "etc" / "gateway.toml"
    assert ctl(path, "config", "init", "--store-id", "store-0007") == 0
    capsys.readouterr()
    return path


def backups(path: Path) -> list[Path]:
    """Backups beside the config file."""
    return sorted(p for p in path.parent.iterdir() if BACKUP_RE.fullmatch(p.name))


def comment_lines(text: str) -> list[str]:
    """Every comment line of a TOML text, in order."""
    return [line for line in text.splitlines() if line.lstrip().startswith("#")]


# --- init -------------------------------------------------------------------------------------


def test_init_writes_a_valid_commented_file_with_mode_0640(config: Path) -> None:
    assert stat.S_IMODE(config.stat().st_mode) == 0o640
    text = config.read_text()
    assert text == configfile.render_starter("store-0007")
    assert len(comment_lines(text)) > 100
    loaded, warnings = load_config(config, env={})
    assert loaded.store.id == "store-0007"
    assert warnings == []


def test_init_refuses_to_overwrite(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config.write_text("# hand-edited\n")
    assert ctl(config, "config", "init") == 1
    err = capsys.readouterr().err
    assert "already exists" in err
    assert "--force" in err
    assert "Traceback" not in err
    assert config.read_text() == "# hand-edited\n"
    assert backups(config) == []


def test_init_force_replaces_and_keeps_a_backup(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config.write_text("# hand-edited\n")
    assert ctl(config, "config", "init", "--force") == 0
    assert "store-0042" in config.read_text()
    [backup] = backups(config)
    assert backup.read_text() == "# hand-edited\n"
    assert str(backup) in capsys.readouterr().out


def test_init_rejects_a_bad_store_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "gateway.toml"
    assert ctl(path, "config", "init", "--store-id", "Store 7") == 78
    assert "store.id" in capsys.readouterr().err
    assert not path.exists()


def test_init_into_an_impossible_place_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "afile").write_text("")
    assert ctl(tmp_path / "afile" / "gateway.toml", "config", "init") == 1
    err = capsys.readouterr().err
    assert err.startswith("gatewayctl: ")
    assert "Traceback" not in err


# --- validate ---------------------------------------------------------------------------------


def test_validate_ok(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl(config, "config", "validate") == 0
    out = capsys.readouterr()
    assert out.out == f"{config}: valid (store store-0007, 1 payment terminal, 1 locker bank)\n"
    assert out.err == ""


def test_validate_prints_what_run_prints(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config.write_text(config.read_text().replace("# keepalive_s = 30", "keepalive_s = 2", 1))
    assert ctl(config, "config", "validate") == 78
    ctl_err = capsys.readouterr().err
    assert (
        ctl_err
        == f"config error: {config}: cloud.keepalive_s: Input should be greater than or equal to 5\n"
    )
    assert cli.main(["run", "--config", str(config)]) == 78
    assert capsys.readouterr().err == ctl_err


def test_validate_warns_about_unknown_keys(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config.write_text(config.read_text().replace("[cloud]\n", "[cloud]\nkeepalive = 10\n", 1))
    assert ctl(config, "config", "validate") == 0
    out = capsys.readouterr()
    assert "valid" in out.out
    assert "warning:" in out.err
    assert "'cloud.keepalive'" in out.err


def test_validate_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl(tmp_path / "none.toml", "config", "validate") == 78
    assert capsys.readouterr().err == f"config error: {tmp_path / 'none.toml'}: file not found\n"


def test_validate_applies_env_overrides(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STORE_GATEWAY__CLOUD__URL", "http://nope")
    assert ctl(config, "config", "validate") == 78
    assert "cloud.url" in capsys.readouterr().err


def test_config_path_from_environment(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STORE_GATEWAY_CONFIG", str(config))
    assert main(["config", "validate"]) == 0
    assert capsys.readouterr().out.startswith(f"{config}: valid")


def test_config_option_after_the_subcommand(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "validate", "--config", str(config)]) == 0
    assert capsys.readouterr().out.startswith(f"{config}: valid")


# --- show -------------------------------------------------------------------------------------


def test_show_redacts_secrets(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl(config, "config", "set", "payment_terminals.0.password", "314159") == 0
    capsys.readouterr()
    assert ctl(config, "config", "show") == 0
    out = capsys.readouterr().out
    assert "314159" not in out
    assert re.search(r'^password\s+= "\*\*\*"$', out, re.MULTILINE)
    assert re.search(r'^id\s+= "store-0007"$', out, re.MULTILINE)
    assert "[[locker_banks]]" in out


def test_show_json_parses_and_includes_env_overrides(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STORE_GATEWAY__CLOUD__URL", "mqtt://10.9.8.7:1883")
    assert ctl(config, "config", "show", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["cloud"]["url"] == "mqtt://10.9.8.7:1883"
    assert data["payment_terminals"][0]["password"] == "***"
    assert data["locker_banks"][0]["compartments"][1]["size"] == "M"
    assert data["storage"]["retention_s"] == 604800


def test_show_human_names_env_overrides(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STORE_GATEWAY__CLOUD__URL", "mqtt://10.9.8.7:1883")
    assert ctl(config, "config", "show") == 0
    out = capsys.readouterr().out
    assert "overridden from the environment: cloud.url" in out
    assert re.search(r'^url\s+= "mqtt://10\.9\.8\.7:1883"$', out, re.MULTILINE)


# --- set --------------------------------------------------------------------------------------


def test_set_keeps_comments_and_makes_a_backup(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config.chmod(0o600)
    before = config.read_bytes()
    assert ctl(config, "config", "set", "cloud.url", "mqtts://iot.example.net:8883") == 0
    assert "previous file kept as" in capsys.readouterr().out
    after = config.read_text()
    assert comment_lines(after) == comment_lines(before.decode())
    assert 'url = "mqtts://iot.example.net:8883"' in after
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    [backup] = backups(config)
    assert backup.read_bytes() == before
    loaded, _ = load_config(config, env={})
    assert loaded.cloud.url == "mqtts://iot.example.net:8883"


def test_set_refuses_an_invalid_value(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = config.read_bytes()
    assert ctl(config, "config", "set", "cloud.keepalive_s", "1") == 78
    err = capsys.readouterr().err
    assert (
        err
        == f"config error: {config}: cloud.keepalive_s: Input should be greater than or equal to 5\n"
    )
    assert config.read_bytes() == before
    assert backups(config) == []
    assert [p.name for p in config.parent.iterdir()] == [config.name]  # no temp files left


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("cloud.urll", "mqtt://x:1", "unknown key"),
        ("cloud", "1", "section"),
        ("payment_terminals.4.endpoint", "/dev/ttyS0", "no entry 4"),
        ("locker_banks.0.compartments.1.channel", "8", "less than or equal to 7"),
        ("payment_terminals.0.endpoint", "COM3", "expected a /dev path"),
    ],
)
def test_set_refuses_bad_keys_and_values(
    config: Path, capsys: pytest.CaptureFixture[str], key: str, value: str, problem: str
) -> None:
    before = config.read_bytes()
    assert ctl(config, "config", "set", key, value) == 78
    err = capsys.readouterr().err
    assert err.startswith(f"config error: {config}: ")
    assert problem in err
    assert config.read_bytes() == before


def test_set_array_of_tables_keys(config: Path) -> None:
    assert ctl(config, "config", "set", "payment_terminals.0.endpoint", "tcp://10.0.0.5:20007") == 0
    assert ctl(config, "config", "set", "locker_banks.0.compartments.1.channel", "5") == 0
    assert ctl(config, "config", "set", "payment_terminals.0.pos_terminals", '["till-9"]') == 0
    loaded, _ = load_config(config, env={})
    assert loaded.payment_terminals[0].endpoint == "tcp://10.0.0.5:20007"
    assert loaded.payment_terminals[0].pos_terminals == ["till-9"]
    assert loaded.locker_banks[0].compartments[1].channel == 5
    assert len(backups(config)) == 3
    assert "# Serial device path" in config.read_text()  # the terminal's comments survive


def test_set_parses_toml_literals_but_keeps_text_keys_text(config: Path) -> None:
    assert ctl(config, "config", "set", "cloud.protocol", "5") == 0  # Literal["5", ...]: text
    assert ctl(config, "config", "set", "cloud.keepalive_s", "45") == 0
    assert ctl(config, "config", "set", "discovery.enabled", "false") == 0
    assert ctl(config, "config", "set", "store.name", "Filiale Nord") == 0  # not TOML: text
    loaded, _ = load_config(config, env={})
    assert (loaded.cloud.protocol, loaded.cloud.keepalive_s) == ("5", 45)
    assert loaded.discovery.enabled is False
    assert loaded.store.name == "Filiale Nord"
    assert 'protocol = "5"' in config.read_text()


def test_set_creates_a_missing_section(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(
        '[store]\nid = "s1"\n[cloud]\nurl = "mqtt://a:1"\n[store_bus]\nurl = "mqtt://b:1"\n'
    )
    assert ctl(path, "config", "set", "inventory.stale_after_s", "600") == 0
    loaded, _ = load_config(path, env={})
    assert loaded.inventory.stale_after_s == 600


def test_set_unchanged_value_writes_nothing(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl(config, "config", "set", "store.id", "store-0007") == 0
    assert "unchanged" in capsys.readouterr().out
    assert backups(config) == []


def test_set_on_a_broken_file_fails_without_writing(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config.write_text("[store\n")
    assert ctl(config, "config", "set", "store.id", "x") == 78
    assert "invalid TOML" in capsys.readouterr().err
    assert config.read_text() == "[store\n"


def test_set_through_a_symlink_keeps_the_link(config: Path) -> None:
    link = config.parent / "link.toml"
    link.symlink_to(config)
    assert ctl(link, "config", "set", "store.name", "via-link") == 0
    assert link.is_symlink()
    assert 'name = "via-link"' in config.read_text()


# --- atomic writes ----------------------------------------------------------------------------


def test_replace_file_backups_are_timestamped_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text("one\n")
    path.chmod(0o604)
    now = datetime(2026, 3, 1, 12, 30, 5, tzinfo=UTC)
    first = configfile.replace_file(path, "two\n", now=now)
    second = configfile.replace_file(path, "three\n", now=now)
    assert first.name == "gateway.toml.20260301T123005Z.bak"
    assert second.name == "gateway.toml.20260301T123005Z-2.bak"
    assert (first.read_text(), second.read_text(), path.read_text()) == (
        "one\n",
        "two\n",
        "three\n",
    )
    assert stat.S_IMODE(path.stat().st_mode) == 0o604


def test_create_file_never_clobbers(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text("mine\n")
    with pytest.raises(configfile.TargetExists):
        configfile.create_file(path, "theirs\n")
    assert path.read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gateway.toml"]


# --- schema, usage, subprocess ----------------------------------------------------------------


def test_schema_prints_the_json_schema(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert ctl(tmp_path / "unused.toml", "config", "schema") == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema == json_schema()
    assert {"store", "cloud", "store_bus"} <= set(schema["required"])


@pytest.mark.parametrize(
    "argv",
    [[], ["config"], ["config", "frobnicate"], ["config", "set", "cloud.url"], ["--nope"]],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "usage: gatewayctl" in err
    assert "Traceback" not in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--help"]) == 0
    out = capsys.readouterr().out
    for word in ("init", "validate", "show", "set", "schema"):
        assert word in out


def test_registry_holds_the_config_commands() -> None:
    assert {w for w in COMMANDS if w[0] == "config"} == {
        ("config", name) for name in ("init", "validate", "show", "set", "schema")
    }


def test_subprocess_exit_codes(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    base = [sys.executable, "-m", "gateway.ctl", "--config", str(path)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORE_GATEWAY")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*base, *args], check=False, capture_output=True, text=True, env=env, timeout=60
        )

    assert run("config", "init").returncode == 0
    ok = run("config", "validate")
    assert (ok.returncode, ok.stdout.endswith("1 locker bank)\n")) == (0, True)
    bad = run("config", "set", "store_bus.url", "http://127.0.0.1")
    assert bad.returncode == 78
    assert bad.stderr.startswith(f"config error: {path}: store_bus.url: ")
    assert "Traceback" not in bad.stderr
    assert run("config", "bogus").returncode == 2


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give the file to the service group")
def test_init_as_root_gives_the_file_to_the_service_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import grp  # noqa: PLC0415 - POSIX only

    group = next((g for g in grp.getgrall() if g.gr_gid != 0), None)
    if group is None:
        pytest.skip("no non-root group on this system")
    monkeypatch.setattr(configfile, "SERVICE_GROUP", group.gr_name)
    path = tmp_path / "gateway.toml"
    assert ctl(path, "config", "init") == 0
    st = path.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, group.gr_gid, 0o640)
