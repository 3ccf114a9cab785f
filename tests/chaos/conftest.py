"""Chaos budget knobs and the one-line summaries shown at the end of the session.

``CHAOS_SECONDS`` (default 12) is the fault-injection time of each chaos run; ``CHAOS_ROUNDS``
(default 1) repeats each run with the next seeds; ``CHAOS_SEED`` moves the first seed. The CI
default keeps the whole directory near two minutes on two cores; a long run is e.g.
``CHAOS_SECONDS=300 CHAOS_ROUNDS=3 .venv/bin/pytest tests/chaos -p no:cacheprovider``.
"""

from __future__ import annotations

import os

import pytest

SUMMARIES: list[str] = []

CHAOS_SECONDS = float(os.environ.get("CHAOS_SECONDS", "12"))
CHAOS_ROUNDS = int(os.environ.get("CHAOS_ROUNDS", "1"))
CHAOS_SEED = int(os.environ.get("CHAOS_SEED", "1"))
# pytest-timeout per test: the fault time of every round plus settling and start-up
CHAOS_TIMEOUT_S = max(120.0, CHAOS_ROUNDS * (CHAOS_SECONDS + 90.0))


def seeds() -> list[int]:
    """The seeds of this session's rounds."""
    return [CHAOS_SEED + i for i in range(CHAOS_ROUNDS)]


def record_summary(line: str) -> None:
    """Print a run's summary now and again at the end of the session."""
    print(line)
    SUMMARIES.append(line)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Show every chaos summary (kills survived, events, lost, duplicates) after the run."""
    if SUMMARIES:
        terminalreporter.section("chaos summaries")
        for line in SUMMARIES:
            terminalreporter.write_line(line)
