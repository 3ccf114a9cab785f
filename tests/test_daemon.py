"""The daemon as store IT runs it: READY/WATCHDOG/STOPPING, exit codes, single instance."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Broker, make_config_dict
from tests.daemon import Daemon, NotifySocket, run_once, write_config


@pytest.mark.broker
def test_ready_watchdog_and_clean_stop(
    tmp_path: Path, cloud_broker: Broker, store_broker: Broker
) -> None:
    cfg = write_config(
        tmp_path / "gw.toml", make_config_dict(tmp_path, cloud_broker.url, store_broker.url)
    )
    notify = NotifySocket(tmp_path / "notify.sock")
    daemon = Daemon(cfg, env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"})
    try:
        daemon.start()
        msgs = notify.read_until("READY=1")
        notify.read_until("WATCHDOG=1")
        assert any(m.startswith("STATUS=") for m in notify.messages)
        assert (tmp_path / "state" / "gateway.db").exists()
        daemon.wait_log('"link up"')
        assert daemon.terminate() == 0
        notify.read_until("STOPPING=1")
        order = [m.strip() for m in notify.messages if m.strip() in ("READY=1", "STOPPING=1")]
        assert order == ["READY=1", "STOPPING=1"]
        assert msgs.index(next(m for m in msgs if "READY=1" in m)) >= 0
        assert "stopped cleanly" in daemon.log.read_text()
    finally:
        daemon.kill()
        notify.close()


def test_starts_without_brokers_and_stops(tmp_path: Path) -> None:
    """Links down is not fatal: READY, keeps retrying, SIGTERM → 0."""
    raw = make_config_dict(tmp_path, "mqtt://127.0.0.1:9", "mqtt://127.0.0.1:9")
    daemon = Daemon(write_config(tmp_path / "gw.toml", raw))
    try:
        daemon.start()
        daemon.wait_log('"ready"')
        daemon.wait_log("link down")
        assert daemon.terminate() == 0
    finally:
        daemon.kill()


@pytest.mark.parametrize(
    ("mutate", "key", "problem"),
    [
        (lambda r: r["cloud"].update(url="http://x"), "cloud.url", "mqtt://"),
        (lambda r: r["store"].update(id="Store 42!"), "store.id", "pattern"),
        (
            lambda r: r["cloud"].update(max_inflight=0),
            "cloud.max_inflight",
            "greater than or equal to 1",
        ),
        (lambda r: r["cloud"].update(protocol="4"), "cloud.protocol", "'5' or '3.1.1'"),
        (lambda r: r.pop("store"), "store", "required key is missing"),
    ],
)
def test_bad_config_exits_78_with_one_clear_message(
    tmp_path: Path, mutate: object, key: str, problem: str
) -> None:
    raw = make_config_dict(tmp_path, "mqtt://127.0.0.1:9", "mqtt://127.0.0.1:9")
    mutate(raw)  # type: ignore[operator]
    cfg = write_config(tmp_path / "gw.toml", raw)
    result = run_once(cfg, "run")
    assert result.returncode == 78
    assert str(cfg) in result.stderr and key in result.stderr and problem in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"[store\nid = 1", "invalid TOML"),
        (b"\xff\xfe bad", "not UTF-8"),
    ],
)
def test_unreadable_config_exits_78(tmp_path: Path, content: bytes, problem: str) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_bytes(content)
    result = run_once(cfg, "run")
    assert result.returncode == 78
    assert problem in result.stderr and "Traceback" not in result.stderr


def test_missing_config_exits_78(tmp_path: Path) -> None:
    result = run_once(tmp_path / "nope.toml", "run")
    assert result.returncode == 78
    assert "file not found" in result.stderr


def test_database_that_cannot_be_created_exits_73(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the state directory should be")
    raw = make_config_dict(
        tmp_path,
        "mqtt://127.0.0.1:9",
        "mqtt://127.0.0.1:9",
        storage={"path": str(blocker / "gw.db")},
    )
    result = run_once(write_config(tmp_path / "gw.toml", raw), "run")
    assert result.returncode == 73
    assert "cannot create database" in result.stderr
    assert "Traceback" not in result.stderr


def test_corrupt_database_exits_73(tmp_path: Path) -> None:
    db = tmp_path / "state" / "gateway.db"
    db.parent.mkdir()
    db.write_bytes(b"this is not an sqlite database" * 100)
    raw = make_config_dict(tmp_path, "mqtt://127.0.0.1:9", "mqtt://127.0.0.1:9")
    result = run_once(write_config(tmp_path / "gw.toml", raw), "run")
    assert result.returncode == 73
    assert "database" in result.stderr


def test_second_instance_refuses_to_start(tmp_path: Path) -> None:
    raw = make_config_dict(tmp_path, "mqtt://127.0.0.1:9", "mqtt://127.0.0.1:9")
    cfg = write_config(tmp_path / "gw.toml", raw)
    first = Daemon(cfg)
    try:
        first.start()
        first.wait_log('"ready"')
        result = run_once(cfg, "run")
        assert result.returncode == 73
        assert "already using" in result.stderr
        assert first.proc is not None and first.proc.poll() is None  # the first one is unharmed
        assert first.terminate() == 0
    finally:
        first.kill()


def test_unknown_keys_warn_but_start(tmp_path: Path) -> None:
    raw = make_config_dict(tmp_path, "mqtt://127.0.0.1:9", "mqtt://127.0.0.1:9")
    raw["cloud"]["keepalive"] = 10  # typo of keepalive_s
    daemon = Daemon(write_config(tmp_path / "gw.toml", raw))
    try:
        daemon.start()
        daemon.wait_log('"ready"')
        assert "cloud.keepalive" in daemon.log.read_text()
        assert daemon.terminate() == 0
    finally:
        daemon.kill()
