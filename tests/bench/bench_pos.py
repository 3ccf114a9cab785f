"""Accepted sales per second from 4 pipelining tills vs a trivial MQTT echo on the same broker.

Run: ``.venv/bin/python -m tests.bench.bench_pos [--sales N] [--inflight N]``. Starts its own
mosquitto brokers (store, cloud) on free ports and the gateway in this process; the tills and
the echo responder run in this process too, so both figures pay the same client overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import structlog

from gateway.config import parse_config
from tests.conftest import Broker, make_config_dict
from tests.gwharness import running_gateway
from tests.tillclient import Till, sale, wait_store_bus

TILLS = 4
NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)


@dataclass(frozen=True, slots=True)
class Figures:
    """One measured run."""

    name: str
    requests: int
    seconds: float
    latencies_ms: list[float]
    rss_mib: float

    @property
    def rate(self) -> float:
        """Requests answered per second."""
        return self.requests / self.seconds

    def pct(self, q: float) -> float:
        """Latency percentile in ms."""
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rss_mib() -> float:
    """Resident set size of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


Send = Callable[[int], Awaitable[asyncio.Future[dict[str, Any]]]]


async def pipeline(send: Send, count: int, inflight: int, lat: list[float]) -> None:
    """Send ``count`` requests keeping ``inflight`` unanswered; record each latency."""
    window = asyncio.Semaphore(inflight)

    async def finish(fut: asyncio.Future[dict[str, Any]], started: float) -> None:
        try:
            reply = await fut
            if reply.get("status", "accepted") != "accepted":
                raise RuntimeError(f"not accepted: {reply}")
            lat.append((time.perf_counter() - started) * 1000)
        finally:
            window.release()

    async with asyncio.TaskGroup() as tg:
        for i in range(count):
            await window.acquire()
            started = time.perf_counter()
            tg.create_task(finish(await send(i), started))


async def measure(name: str, sends: list[Send], count: int, inflight: int) -> Figures:
    """Run all tills at once and collect figures."""
    lat: list[float] = []
    started = time.perf_counter()
    async with asyncio.timeout(300), asyncio.TaskGroup() as tg:
        for send in sends:
            tg.create_task(pipeline(send, count, inflight, lat))
    seconds = time.perf_counter() - started
    return Figures(name, count * len(sends), seconds, lat, rss_mib())


class EchoTill:
    """A till on a plain echo topic: same payloads, same QoS, no gateway."""

    def __init__(self, port: int, n: int) -> None:
        self.n = n
        self.client = aiomqtt.Client(
            "127.0.0.1", port, identifier=f"echo-till-{n}", socket_options=NODELAY
        )
        self.waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}

    async def read(self) -> None:
        """Resolve futures from results."""
        async for message in self.client.messages:
            assert isinstance(message.payload, bytes)
            body = json.loads(message.payload)
            self.waiting.pop(body["sale_id"]).set_result(body)

    async def send(self, i: int) -> asyncio.Future[dict[str, Any]]:
        """Publish one request shaped like a sale."""
        body = sale(f"echo-{self.n}-{i}", [("4006381333931", 2, 199), ("sku-b", 1, 50)])
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting[body["sale_id"]] = fut
        await self.client.publish(f"bench/echo/{self.n}/req", json.dumps(body).encode(), qos=1)
        return fut


async def echo_responder(port: int, ready: asyncio.Event) -> None:
    """Answer every echo request on its result topic (concurrently, MQTT 5: as the gateway)."""
    async with aiomqtt.Client(
        "127.0.0.1",
        port,
        identifier="echo-responder",
        socket_options=NODELAY,
        protocol=aiomqtt.ProtocolVersion.V5,
    ) as client:
        await client.subscribe("bench/echo/+/req", qos=1)
        ready.set()
        async with asyncio.TaskGroup() as tg:
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                reply = str(message.topic).removesuffix("/req") + "/result"
                tg.create_task(client.publish(reply, message.payload, qos=1))


async def run_echo(port: int, count: int, inflight: int) -> Figures:
    """The echo baseline."""
    ready = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        responder = tg.create_task(echo_responder(port, ready), name="echo-responder")
        await ready.wait()
        tills = [EchoTill(port, n) for n in range(TILLS)]
        for till in tills:
            await till.client.__aenter__()
            await till.client.subscribe(f"bench/echo/{till.n}/result", qos=1)
        readers = [tg.create_task(t.read(), name=f"echo-reader-{t.n}") for t in tills]
        try:
            await measure("warm-up", [t.send for t in tills], 50, inflight)
            return await measure("echo", [t.send for t in tills], count, inflight)
        finally:
            for task in [*readers, responder]:
                task.cancel()
            for till in tills:
                await till.client.__aexit__(None, None, None)


async def run_sales(store: Broker, cloud: Broker, tmp: Path, count: int, inflight: int) -> Figures:
    """Sales through the gateway."""
    cfg = parse_config(make_config_dict(tmp, cloud.url, store.url, logging={"level": "warning"}))
    async with running_gateway(cfg) as gw:
        await wait_store_bus(gw)
        tills = [Till(store.port, f"pos-{n}") for n in range(TILLS)]
        for till in tills:
            await till.__aenter__()
        try:

            def sender(till: Till, prefix: str) -> Send:
                async def send(i: int) -> asyncio.Future[dict[str, Any]]:
                    lines = [("4006381333931", 2, 199), ("sku-b", 1, 50)]
                    return await till.send("sale", sale(f"{prefix}{till.terminal}-{i}", lines))

                return send

            await measure("warm-up", [sender(t, "w-") for t in tills], 50, inflight)
            figures = await measure("sales", [sender(t, "") for t in tills], count, inflight)
            expected = (count + 50) * TILLS * 3  # sale.completed + 2 inventory.changed
            assert gw.db.last_seq == expected, (gw.db.last_seq, expected)
            print(f"gateway: {gw.db.commits} commits for {gw.db.last_seq} events")
            return figures
        finally:
            for till in tills:
                await till.__aexit__(None, None, None)


def table(rows: list[Figures], echo: Figures) -> str:
    """The report."""
    out = [
        f"{'run':<8} {'requests':>8} {'req/s':>9} {'x echo':>7} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'RSS MiB':>8}"
    ]
    for f in rows:
        out.append(
            f"{f.name:<8} {f.requests:>8} {f.rate:>9.0f} {f.rate / echo.rate:>7.2f} "
            f"{f.pct(0.5):>8.1f} {f.pct(0.99):>8.1f} {f.rss_mib:>8.1f}"
        )
    return "\n".join(out)


async def main() -> None:
    """Start brokers, measure echo then sales, print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sales", type=int, default=1000, help="requests per till")
    parser.add_argument("--inflight", type=int, default=16, help="requests in flight per till")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    logging.getLogger("mqtt").setLevel(logging.ERROR)  # aiomqtt: "N pending publish calls"
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        store = Broker(tmp, extra_conf="set_tcp_nodelay true").start()
        cloud = Broker(tmp).start()
        try:
            echo = await run_echo(store.port, args.sales, args.inflight)
            sales = await run_sales(store, cloud, tmp, args.sales, args.inflight)
        finally:
            store.kill()
            cloud.kill()
    print(f"{TILLS} tills x {args.sales} requests, {args.inflight} in flight each")
    print(table([echo, sales], echo))
    print(f"p50 latency sales/echo: {sales.pct(0.5) / echo.pct(0.5):.2f}")


if __name__ == "__main__":
    asyncio.run(main())
