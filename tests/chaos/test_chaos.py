"""Chaos runs against the real daemon: faults at random, then every invariant is checked.

Each test prints one summary line (also repeated at the end of the session). Budget knobs:
``CHAOS_SECONDS``, ``CHAOS_ROUNDS``, ``CHAOS_SEED`` (see conftest.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.chaos.conftest import CHAOS_SECONDS, CHAOS_TIMEOUT_S, record_summary, seeds
from tests.chaos.harness import (
    DB_CRASH_POINTS,
    LOCKER_CRASH_POINTS,
    PAYMENT_CRASH_POINTS,
    Plan,
    Workload,
    run_chaos,
)
from tests.chaos.lockers import LockersWorkload
from tests.chaos.nemeses import LOCKER, NETWORK, SERIAL
from tests.conftest import Broker

pytestmark = [pytest.mark.broker, pytest.mark.timeout(CHAOS_TIMEOUT_S)]


async def _run(
    plan: Plan,
    tmp_path: Path,
    broker_factory: Callable[..., Broker],
    workloads: tuple[Workload, ...] = (),
) -> None:
    report = await run_chaos(plan, tmp_path, broker_factory, workloads=workloads)
    record_summary(report.summary(plan.name))
    assert not report.violations, "\n".join(report.violations[:30])
    assert report.counts["lost"] == 0 and report.counts["duplicates applied"] == 0


@pytest.mark.parametrize("seed", seeds())
async def test_sales_under_kills_broker_restarts_and_network_faults(
    tmp_path: Path, broker_factory: Callable[..., Broker], seed: int
) -> None:
    """Three pipelining tills; the gateway SIGKILLed (also at named crash points), either broker
    SIGKILLed and restarted empty, the cloud broker SIGSTOPped, the cloud path delayed, dropped,
    reset and blackholed; some lives with an unsynchronised clock."""
    plan = Plan(
        name=f"sales/network seed={seed}",
        seconds=CHAOS_SECONDS,
        seed=seed,
        nemeses=("kill_gateway", "kill_gateway", *NETWORK),
        crash_points=DB_CRASH_POINTS,
        crash_share=0.3,
        clock_modes=("yes", "no"),
        long_faults=CHAOS_SECONDS >= 60,
    )
    await _run(plan, tmp_path, broker_factory)


@pytest.mark.parametrize("seed", seeds())
async def test_every_commit_crash_point_under_sales(
    tmp_path: Path, broker_factory: Callable[..., Broker], seed: int
) -> None:
    """Every life is armed with the next of before-commit / after-commit / after-publish."""
    plan = Plan(
        name=f"crash points seed={seed}",
        seconds=max(6.0, CHAOS_SECONDS * 0.6),
        seed=seed,
        nemeses=(),
        tills=2,
        crash_points=DB_CRASH_POINTS,
        crash_share=1.0,
    )
    await _run(plan, tmp_path, broker_factory)


@pytest.mark.parametrize("seed", seeds())
async def test_payments_under_kills_and_serial_noise(
    tmp_path: Path, broker_factory: Callable[..., Broker], seed: int
) -> None:
    """Card payments through the ZVT simulator next to sales: line noise, NAKs, lost ACKs,
    unplugged cable and a silent terminal; the gateway killed, also at every payment step."""
    plan = Plan(
        name=f"payments/serial seed={seed}",
        seconds=CHAOS_SECONDS,
        seed=seed,
        nemeses=("kill_gateway", *SERIAL, "restart_store_broker"),
        tills=1,
        payments=True,
        crash_points=PAYMENT_CRASH_POINTS,
        crash_share=0.5,
        gap_s=(0.5, 1.5),
    )
    await _run(plan, tmp_path, broker_factory)


LOCKER_NETWORK = ("restart_store_broker", "restart_cloud_broker", "proxy_reset", "proxy_blackhole")


@pytest.mark.parametrize("seed", seeds())
async def test_lockers_under_kills_crash_points_and_board_faults(
    tmp_path: Path, broker_factory: Callable[..., Broker], seed: int
) -> None:
    """Click and collect beside a till: orders created by the backend, loaded by staff, picked
    up at the kiosk with the code from the backend's in_locker event; the gateway killed at
    random and at locker-after-pulse (between a pulse and its state commit) and the commit
    points; the locker bus fed garbage, unplugged, a board silent; broker and proxy faults."""
    plan = Plan(
        name=f"lockers seed={seed}",
        seconds=CHAOS_SECONDS,
        seed=seed,
        nemeses=("kill_gateway", "kill_gateway", *LOCKER, *LOCKER, *LOCKER_NETWORK),
        tills=1,
        inflight=2,
        till_pause_s=0.05,
        crash_points=(*LOCKER_CRASH_POINTS, *LOCKER_CRASH_POINTS, "after-commit", "before-commit"),
        crash_share=0.7,
        clock_modes=("yes", "no"),
        gap_s=(0.4, 1.2),
    )
    await _run(plan, tmp_path, broker_factory, (LockersWorkload(seed),))
