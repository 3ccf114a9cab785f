"""``gatewayctl config set`` SIGKILLed mid-write (crash point ``config-write``: the new file is
written and synced, the old one backed up, the rename not done): the configuration on disk is
the old one, whole and valid, and the daemon starts on it; the next ``set`` succeeds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from gateway.config import load_config
from tests.conftest import make_config_dict
from tests.daemon import REPO, Daemon, write_config


def _ctl(config: Path, *args: str, crash_at: str | None = None) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if crash_at:
        env["STORE_GATEWAY_CRASH_AT"] = crash_at
    done = subprocess.run(
        [sys.executable, "-m", "gateway.ctl", "--config", str(config), *args],
        capture_output=True,
        timeout=30,
        check=False,
        env=env,
    )
    return done.returncode


def test_config_set_killed_mid_write_leaves_the_old_file_whole(tmp_path: Path) -> None:
    raw = make_config_dict(tmp_path, "mqtt://127.0.0.1:9", "mqtt://127.0.0.1:9")
    config = write_config(tmp_path / "gw.toml", raw)
    before = config.read_bytes()

    assert _ctl(config, "config", "set", "cloud.resend_after_s", "7", crash_at="config-write") == -9
    assert config.read_bytes() == before, "a crash mid-write changed the configuration"
    assert load_config(config)[0].cloud.resend_after_s == 2
    leftovers = [p.name for p in tmp_path.glob(".gw.toml.*.tmp")]
    assert len(leftovers) <= 1  # the synced temp file may stay behind; it is never read

    daemon = Daemon(config).start()
    try:
        daemon.wait_log('"ready"')
        assert daemon.terminate() == 0
    finally:
        daemon.kill()

    assert _ctl(config, "config", "set", "cloud.resend_after_s", "7") == 0
    assert load_config(config)[0].cloud.resend_after_s == 7
    assert any(tmp_path.glob("gw.toml.*.bak")), "the old file is kept as a backup"
