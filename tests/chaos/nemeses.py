"""Faults the chaos runs inject. Each nemesis applies its fault and heals it before returning.

Durations are short by default so a CI run sees many faults; ``Plan.long_faults`` stretches the
half-open ones past the MQTT keepalive (5 s → detected after ~7.5 s), so the gateway must notice
a dead link on its own rather than have it come back.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable

from tests.chaos.harness import Rig
from tests.chaos.lockers import UNITS

Nemesis = Callable[[Rig], Awaitable[None]]


def _hold_s(rig: Rig, short: tuple[float, float], long: tuple[float, float]) -> float:
    return rig.rng.uniform(*(long if rig.plan.long_faults else short))


async def kill_gateway(rig: Rig) -> None:
    """SIGKILL the daemon at a random moment and start it again."""
    await rig.kill_gateway()


async def restart_cloud_broker(rig: Rig) -> None:
    """SIGKILL the cloud broker (it loses every queued message), start it empty on the same port."""
    rig.cloud.kill()
    await asyncio.sleep(rig.rng.uniform(0.0, 1.0))
    await asyncio.to_thread(rig.cloud.start)


async def restart_store_broker(rig: Rig) -> None:
    """SIGKILL the store broker (tills and gateway lose their sessions), start it again empty."""
    rig.store.kill()
    await asyncio.sleep(rig.rng.uniform(0.0, 1.0))
    await asyncio.to_thread(rig.store.start)


async def pause_cloud_broker(rig: Rig) -> None:
    """SIGSTOP the cloud broker (a half-open link: TCP up, nobody answering), then SIGCONT."""
    rig.cloud.stop_signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(_hold_s(rig, (0.3, 2.5), (3.0, 10.0)))
    finally:
        rig.cloud.stop_signal(signal.SIGCONT)


async def proxy_delay(rig: Rig) -> None:
    """Add latency on the cloud path for a while."""
    rig.proxy.delay_s = rig.rng.uniform(0.02, 0.3)
    await asyncio.sleep(rig.rng.uniform(0.5, 2.0))
    rig.proxy.delay_s = 0.0


async def proxy_drop(rig: Rig) -> None:
    """Close the cloud connection cleanly (FIN)."""
    rig.proxy.drop()


async def proxy_reset(rig: Rig) -> None:
    """Abort the cloud connection (RST)."""
    rig.proxy.reset()


async def proxy_blackhole(rig: Rig) -> None:
    """Hold every byte on the cloud path for a while (no RST, no FIN), then let it through."""
    rig.proxy.blackhole(True)
    try:
        await asyncio.sleep(_hold_s(rig, (0.3, 2.5), (3.0, 10.0)))
    finally:
        rig.proxy.blackhole(False)


async def zvt_garbage(rig: Rig) -> None:
    """Line noise before every message from the terminal for a while."""
    assert rig.zvt is not None
    rig.zvt.faults.garbage = bytes(rig.rng.getrandbits(8) for _ in range(rig.rng.randint(1, 12)))
    await asyncio.sleep(rig.rng.uniform(0.3, 1.5))
    rig.zvt.faults.garbage = b""


async def zvt_flips(rig: Rig) -> None:
    """Corrupted frames: the terminal NAKs the next few and swallows one (as a bit flip would)."""
    assert rig.zvt is not None
    rig.zvt.faults.naks = rig.rng.randint(1, 2)
    rig.zvt.faults.drop_acks = rig.rng.randint(0, 1)
    await asyncio.sleep(rig.rng.uniform(0.3, 1.5))
    rig.zvt.faults.naks = rig.zvt.faults.drop_acks = 0


async def zvt_unplug(rig: Rig) -> None:
    """The cable goes at one step of the next transaction."""
    assert rig.zvt is not None
    rig.zvt.faults.disconnect_at = rig.rng.choice(["card", "status_info", "completion"])
    await asyncio.sleep(rig.rng.uniform(0.5, 2.0))
    rig.zvt.faults.disconnect_at = None


async def zvt_silent(rig: Rig) -> None:
    """The terminal hears nothing and says nothing for a while."""
    assert rig.zvt is not None
    rig.zvt.faults.silent = True
    await asyncio.sleep(rig.rng.uniform(0.3, 2.0))
    rig.zvt.faults.silent = False


async def locker_garbage(rig: Rig) -> None:
    """Line noise towards the gateway on the locker bus for a while (between and into replies)."""
    assert rig.lockers is not None
    loop = asyncio.get_running_loop()
    until = loop.time() + rig.rng.uniform(0.3, 1.5)
    while loop.time() < until:
        noise = bytes(rig.rng.getrandbits(8) for _ in range(rig.rng.randint(1, 12)))
        rig.lockers.inject_garbage(noise)
        await asyncio.sleep(rig.rng.uniform(0.01, 0.1))


async def locker_unplug(rig: Rig) -> None:
    """The locker bus goes away (connections and listener closed) and comes back."""
    assert rig.lockers is not None
    await rig.lockers.unplug()
    try:
        await asyncio.sleep(rig.rng.uniform(0.2, 1.5))
    finally:
        await rig.lockers.replug()


async def locker_silence(rig: Rig) -> None:
    """One board hears requests and answers nothing for a while."""
    assert rig.lockers is not None
    unit = rig.rng.choice(UNITS)
    rig.lockers.silence(unit)
    try:
        await asyncio.sleep(rig.rng.uniform(0.3, 1.5))
    finally:
        rig.lockers.silence(unit, False)


async def locker_slow(rig: Rig) -> None:
    """The boards answer after the gateway's response timeout for a while (a slow board, or a
    reply lost to noise): the gateway must not repeat a pulse write the board already executed
    (it found exactly that before the bus stopped retrying pulse writes)."""
    assert rig.lockers is not None
    rig.lockers.slow_replies(0.12)  # longer than the chaos config's response_timeout_ms=80
    try:
        await asyncio.sleep(rig.rng.uniform(1.0, 2.5))
    finally:
        rig.lockers.slow_replies(0.0)


NEMESES: dict[str, Nemesis] = {
    "kill_gateway": kill_gateway,
    "restart_cloud_broker": restart_cloud_broker,
    "restart_store_broker": restart_store_broker,
    "pause_cloud_broker": pause_cloud_broker,
    "proxy_delay": proxy_delay,
    "proxy_drop": proxy_drop,
    "proxy_reset": proxy_reset,
    "proxy_blackhole": proxy_blackhole,
    "zvt_garbage": zvt_garbage,
    "zvt_flips": zvt_flips,
    "zvt_unplug": zvt_unplug,
    "zvt_silent": zvt_silent,
    "locker_garbage": locker_garbage,
    "locker_unplug": locker_unplug,
    "locker_silence": locker_silence,
    "locker_slow": locker_slow,
}

NETWORK = (
    "restart_cloud_broker",
    "restart_store_broker",
    "pause_cloud_broker",
    "proxy_delay",
    "proxy_drop",
    "proxy_reset",
    "proxy_blackhole",
)
SERIAL = ("zvt_garbage", "zvt_flips", "zvt_unplug", "zvt_silent")
LOCKER = ("locker_garbage", "locker_unplug", "locker_silence", "locker_slow")
