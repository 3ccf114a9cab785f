"""`store-gateway demo` end to end, as a newcomer runs it: exit 0 and every check held."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "demo", "--speed", "20", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )


def assert_story_held(result: subprocess.CompletedProcess[str]) -> None:
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    assert "demo: every check held" in out
    for line in ("cloud unreachable", "rush hour", "caught up", "card charges booked / approved"):
        assert line in out
    summary = {
        k.strip(): v.strip() for k, _, v in (ln.partition("  ") for ln in out.splitlines()) if v
    }
    assert any(ln.split()[:1] == ["lost"] and ln.split()[-1] == "0" for ln in out.splitlines())
    assert any(
        ln.strip().startswith("duplicates applied") and ln.split()[-1] == "0"
        for ln in out.splitlines()
    )
    assert "CHECK FAILED" not in out
    assert summary  # the table was printed


@pytest.mark.broker
@pytest.mark.skipif(
    shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
    reason="no mosquitto",
)
def test_demo_with_mosquitto() -> None:
    assert_story_held(run_demo("--broker", "mosquitto"))


@pytest.mark.skipif(
    importlib.util.find_spec("amqtt") is None, reason="the demo extra (amqtt) is not installed"
)
def test_demo_with_the_embedded_broker() -> None:
    result = run_demo("--broker", "embedded")
    assert "amqtt (embedded)" in result.stdout
    assert_story_held(result)


def test_demo_keep_leaves_the_database(tmp_path: Path) -> None:
    if shutil.which("mosquitto") is None and importlib.util.find_spec("amqtt") is None:
        pytest.skip("no broker for the demo")
    result = run_demo("--keep")
    assert result.returncode == 0, result.stdout[-2000:]
    kept = Path(result.stdout.split("kept ", 1)[1].split()[0])
    try:
        assert (kept / "gateway.db").exists()
    finally:
        shutil.rmtree(kept, ignore_errors=True)
