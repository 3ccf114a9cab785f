"""The chaos rig: the real daemon, real brokers, tills, a backend, simulators and a nemesis.

Shape of one run (:func:`run_chaos`):

1. Start the store and cloud mosquitto, a :class:`~tests.chaos.proxy.FaultProxy` in front of the
   cloud broker (the gateway's ``cloud.url`` points at it), the
   :class:`~gateway.backend_sim.RecordingBackend` (straight on the cloud broker, acking), the ZVT
   simulator when the plan has payments, the daemon, and the tills.
2. For ``plan.seconds`` the nemesis picks a fault at random (see :mod:`tests.chaos.nemeses`),
   applies it, heals it, waits a little, again. A supervisor restarts the daemon whenever it
   died (a crash point fired), optionally arming the next life with another crash point or
   another clock mode.
3. Settle: heal everything, restart the daemon clean, let every till get a final answer for
   every request (they retry with the same id), ask the stock, wait until the backend holds every
   committed seq, stop the daemon with SIGTERM (exit 0).
4. Check the invariants (:mod:`tests.chaos.invariants`) and return the report.

Seam for more workloads: a :class:`Workload` configures its simulators into the daemon before
the first start, runs its own clients beside the tills, finishes its work at the settle and adds
its evidence for the invariants — the locker workload (:mod:`tests.chaos.lockers`) is one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from devices.sim.locker_sim import LockerBoardSim
from devices.sim.zvt_sim import ZvtSimulator
from gateway.backend_sim import RecordingBackend
from tests.chaos.invariants import Evidence, Report, check
from tests.chaos.proxy import FaultProxy
from tests.chaos.tills import SKUS, ChaosTill, payments, sales_and_returns
from tests.conftest import Broker, make_config_dict
from tests.daemon import Daemon, write_config
from tests.pos_client import terminal

STORE_ID = "store-0042"
DB_CRASH_POINTS = ("before-commit", "after-commit", "after-publish")
PAYMENT_CRASH_POINTS = (
    "payment-after-authorizing",
    "payment-after-confirming-before-ack",
    "payment-after-ack",
    "payment-before-final",
)
LOCKER_CRASH_POINTS = ("locker-after-pulse",)
# highest N of ``name@N``: a point reached rarely must fire within a few seconds of a life
CRASH_MAX_N = {"locker-after-pulse": 3}


@dataclass(frozen=True, slots=True)
class Plan:
    """What one chaos run does."""

    name: str
    seconds: float
    seed: int
    nemeses: tuple[str, ...]
    tills: int = 3
    inflight: int = 4
    till_pause_s: float = 0.02
    payments: bool = False
    crash_points: tuple[str, ...] = ()  # armed on some restarts (``name@N``)
    crash_share: float = 0.5  # share of restarts that arm a crash point
    clock_modes: tuple[str, ...] = ("yes",)  # clock.synced per life, chosen at random
    gap_s: tuple[float, float] = (0.2, 1.2)  # pause between faults
    long_faults: bool = False  # SIGSTOP/blackhole beyond the keepalive (slow: long runs only)


class Workload(Protocol):
    """Extra load and evidence beside the tills (lockers: :mod:`tests.chaos.lockers`)."""

    async def configure(self, rig: Rig, stack: AsyncExitStack) -> None:
        """Before the first start: simulators on the stack, sections in ``rig.raw_config``."""
        ...

    async def start(self, rig: Rig, stack: AsyncExitStack) -> None:
        """Start the workload's clients (they run until the stack closes)."""
        ...

    async def settle(self, rig: Rig) -> None:
        """Faults healed, the daemon clean: finish every piece of work started."""
        ...

    async def evidence(self, rig: Rig, ev: Evidence) -> None:
        """After the clean stop: put what the workload saw into ``ev``."""
        ...


@dataclass(slots=True)
class Life:
    """One process of the daemon."""

    crash_at: str | None
    clock: str
    started_at: float = 0.0  # wall clock
    boot_id: str | None = None
    exit_code: int | None = None
    killed: bool = False  # SIGKILLed by the nemesis (not by its own crash point)


@dataclass(slots=True)
class Rig:
    """Everything a nemesis may touch."""

    plan: Plan
    tmp: Path
    cloud: Broker
    store: Broker
    proxy: FaultProxy
    backend: RecordingBackend
    rng: random.Random
    raw_config: dict[str, Any]
    config_path: Path
    daemon: Daemon
    zvt: ZvtSimulator | None = None
    lockers: LockerBoardSim | None = None
    tills: list[ChaosTill] = field(default_factory=list)
    lives: list[Life] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    gw_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _log_pos: int = 0

    @property
    def db_path(self) -> Path:
        """The gateway's database file."""
        return Path(self.raw_config["storage"]["path"])

    # --- the daemon ---------------------------------------------------------------------------

    def alive(self) -> bool:
        """The daemon process is running."""
        proc = self.daemon.proc
        return proc is not None and proc.poll() is None

    async def start_gateway(self, *, clean: bool = False) -> bool:
        """Start a new life (armed with a crash point unless ``clean``); True once ready."""
        plan = self.plan
        crash_at = None
        if not clean and plan.crash_points and plan.crash_share >= 1.0:  # each point in turn
            point = plan.crash_points[len(self.lives) % len(plan.crash_points)]
            crash_at = f"{point}@{self.rng.randint(1, CRASH_MAX_N.get(point, 12))}"
        elif not clean and plan.crash_points and self.rng.random() < plan.crash_share:
            point = self.rng.choice(plan.crash_points)
            crash_at = f"{point}@{self.rng.randint(1, CRASH_MAX_N.get(point, 12))}"
        clock = "yes" if clean else self.rng.choice(plan.clock_modes)
        if clock != self.raw_config["clock"]["synced"]:
            self.raw_config["clock"]["synced"] = clock
            write_config(self.config_path, self.raw_config)
        life = Life(crash_at, clock, started_at=time.time())
        self.lives.append(life)
        self._log_pos = self.daemon.log.stat().st_size if self.daemon.log.exists() else 0
        env = {"STORE_GATEWAY_CRASH_AT": crash_at} if crash_at else {}
        self.daemon.start(**env)
        ready = await self._wait_ready(life)
        return ready

    async def _wait_ready(self, life: Life, timeout_s: float = 20.0) -> bool:
        async with asyncio.timeout(timeout_s):
            while True:  # polls the subprocess's log file; bounded by the timeout
                for line in self._new_log_lines():
                    if '"ready"' in line:
                        with contextlib.suppress(ValueError):
                            life.boot_id = json.loads(line).get("boot_id")
                        return True
                if not self.alive():
                    self._reap(life)
                    return False
                await asyncio.sleep(0.05)

    def _new_log_lines(self) -> list[str]:
        if not self.daemon.log.exists():
            return []
        with self.daemon.log.open("rb") as fh:
            fh.seek(self._log_pos)
            data = fh.read()
        cut = data.rfind(b"\n") + 1
        self._log_pos += cut
        return data[:cut].decode(errors="replace").splitlines()

    def _reap(self, life: Life) -> None:
        proc = self.daemon.proc
        if proc is None:
            return
        code = proc.wait(10)
        if life.exit_code is None:
            life.exit_code = code
            if code == -signal.SIGKILL:
                self.counts["kills survived"] += 1
                if life.crash_at and not life.killed:
                    self.counts["crash points hit"] += 1
                    self.counts[f"crash at {life.crash_at.partition('@')[0]}"] += 1
            elif code != 0:
                raise AssertionError(
                    f"gateway exited {code}:\n{self.daemon.log.read_text()[-3000:]}"
                )

    async def kill_gateway(self) -> None:
        """SIGKILL the daemon now and start a new life."""
        async with self.gw_lock:
            self.lives[-1].killed = self.alive()
            self.daemon.kill()
            self._reap(self.lives[-1])
            await self.start_gateway()

    async def supervise(self, stop: asyncio.Event) -> None:
        """Restart the daemon whenever it died on its own (a crash point fired)."""
        while not stop.is_set():
            await asyncio.sleep(0.1)
            async with self.gw_lock:
                if not self.alive() and not stop.is_set():
                    self._reap(self.lives[-1])
                    await self.start_gateway()

    async def settle(self) -> None:
        """Heal every fault; a clean, unarmed, ready daemon."""
        self.proxy.heal()
        for broker in (self.cloud, self.store):
            if broker.proc is None:
                broker.start()
            else:
                broker.stop_signal(signal.SIGCONT)
        if self.zvt is not None:
            self.zvt.faults.garbage = b""
            self.zvt.faults.silent = False
            self.zvt.faults.naks = self.zvt.faults.drop_acks = 0
            self.zvt.faults.disconnect_at = None
        async with self.gw_lock:
            life = self.lives[-1]
            if self.alive() and (life.crash_at or life.clock != "yes"):
                life.killed = True
                self.daemon.kill()  # an armed life could still fire while we settle
            if not self.alive():
                self._reap(life)
                for _ in range(3):
                    if await self.start_gateway(clean=True):
                        break
            assert self.alive(), "the gateway does not come up after the run"

    def last_seq(self) -> int:
        """The highest committed seq, read from the database."""
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True)
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()
            return int(row[0]) if row else 0
        finally:
            conn.close()


@asynccontextmanager
async def rig_for(
    plan: Plan, tmp: Path, broker_factory: Callable[..., Broker]
) -> AsyncIterator[Rig]:
    """All parts of a run, started; everything stopped on exit."""
    async with AsyncExitStack() as stack:
        cloud, store = broker_factory(), broker_factory()
        proxy = await stack.enter_async_context(FaultProxy(cloud.port))
        zvt = None
        sections: dict[str, Any] = {}
        if plan.payments:
            zvt = await stack.enter_async_context(ZvtSimulator("socket", t2_s=0.3, t3_s=1.0))
            sections["payment_terminals"] = [terminal(zvt.endpoint)]
        raw = make_config_dict(tmp, proxy.url, store.url, **sections)
        raw["cloud"] |= {"connect_timeout_s": 2, "resend_after_s": 1}
        raw["store_bus"] |= {"connect_timeout_s": 2}
        config_path = write_config(tmp / "gw.toml", raw)
        backend = await stack.enter_async_context(
            RecordingBackend("127.0.0.1", cloud.port, STORE_ID)
        )
        daemon = Daemon(config_path)
        stack.callback(daemon.kill)
        rig = Rig(
            plan, tmp, cloud, store, proxy, backend, random.Random(plan.seed), raw, config_path,
            daemon, zvt,
        )  # fmt: skip
        yield rig


async def run_chaos(
    plan: Plan,
    tmp: Path,
    broker_factory: Callable[..., Broker],
    *,
    workloads: tuple[Workload, ...] = (),
) -> Report:
    """One whole run (see the module docstring); the report of the invariant checks."""
    from tests.chaos.nemeses import NEMESES  # noqa: PLC0415 - nemeses import this module

    async with rig_for(plan, tmp, broker_factory) as rig, AsyncExitStack() as stack:
        for workload in workloads:
            await workload.configure(rig, stack)
        await rig.start_gateway()  # may be armed: the supervisor restarts it when it dies
        for i in range(plan.tills):
            gen = sales_and_returns(f"pos-{i + 1}")
            rig.tills.append(
                ChaosTill(rig.store.port, f"pos-{i + 1}", gen, seed=plan.seed * 100 + i,
                          inflight=plan.inflight, pause_s=plan.till_pause_s)
            )  # fmt: skip
        if plan.payments:
            rig.tills.append(
                ChaosTill(rig.store.port, "pos-2", payments("pos-2", 10_000 + plan.seed * 1000),
                          seed=plan.seed, inflight=1, pause_s=0.2, retry_s=2.0)
            )  # fmt: skip
        for workload in workloads:
            await workload.start(rig, stack)
        stop_new, stop_all, stop_nemesis = asyncio.Event(), asyncio.Event(), asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            till_tasks = [
                tg.create_task(t.run(stop_new, stop_all), name=f"till-{t.terminal}")
                for t in rig.tills
            ]
            supervisor = tg.create_task(rig.supervise(stop_nemesis), name="supervisor")
            await _nemesis(rig, NEMESES, plan.seconds)
            stop_nemesis.set()
            await supervisor
            await rig.settle()
            stop_new.set()
            for workload in workloads:
                await workload.settle(rig)
            stock = await _finish_tills(rig)
            await rig.backend.wait_until(lambda r: r.contiguous >= rig.last_seq(), timeout_s=60)
            assert rig.daemon.terminate() == 0, "the gateway did not stop cleanly"
            stop_all.set()
            for task in till_tasks:
                await task
        evidence = Evidence(
            db_path=rig.db_path,
            record=rig.backend.record,
            tills=[t.log for t in rig.tills],
            stock=stock,
            ledger=list(rig.zvt.ledger) if rig.zvt else None,
            boots={life.boot_id: life.clock for life in rig.lives if life.boot_id},
        )
        for workload in workloads:
            await workload.evidence(rig, evidence)
        report = check(evidence)
        report.counts.update(rig.counts)
        report.counts["proxy connections"] = rig.proxy.stats["connections"]
        report.counts["lives"] = len(rig.lives)
        report.counts["till resends"] = sum(t.log.resends for t in rig.tills)
        return report


async def _nemesis(rig: Rig, nemeses: dict[str, Any], seconds: float) -> None:
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    while loop.time() < until:
        await asyncio.sleep(rig.rng.uniform(*rig.plan.gap_s))
        if not rig.plan.nemeses:
            continue
        name = rig.rng.choice(rig.plan.nemeses)
        await nemeses[name](rig)
        rig.counts[name] += 1
        rig.counts["faults"] += 1


async def _finish_tills(rig: Rig, timeout_s: float = 90.0) -> dict[str, int]:
    """Wait until every till has a final answer for every request; the gateway's stock."""
    try:
        async with asyncio.timeout(timeout_s):
            while any(t.unanswered for t in rig.tills):  # noqa: ASYNC110 - bounded by timeout
                await asyncio.sleep(0.1)
    except TimeoutError:
        left = {t.terminal: sorted(t.pending)[:5] for t in rig.tills if t.unanswered}
        raise AssertionError(f"requests without a final answer after settling: {left}") from None
    reply = await rig.tills[0].ask_stock(list(SKUS))
    assert "items" in reply, f"stock lookup answered {reply}"
    return {item["sku"]: int(item["on_hand"]) for item in reply["items"]}
