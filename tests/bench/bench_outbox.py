"""Outbox benchmarks: every figure beside a raw baseline measured in the same run.

Run: ``.venv/bin/python -m tests.bench.bench_outbox [--events 100000]``

1. durable enqueue (group commit, synchronous=FULL) with 1/10/100 producers
   vs raw sqlite3 batched inserts (100 rows per FULL commit) of the same rows;
2. drain of an N-event backlog to a local mosquitto (QoS 1, PUBACKed)
   vs raw paho pipelined QoS 1 publish of the very same batch messages (window 100);
3. enqueue→cloud latency p50/p99 at 200 events/s through the running gateway;
4. RSS before/peak/after the drain (flat = the backlog is streamed, not loaded);
5. sustained pipeline: 100 producers committing while the link drains live.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiomqtt
import paho.mqtt.client as paho

from gateway.config import parse_config
from gateway.db import Database, Work
from gateway.drain import make_batches
from gateway.logs import configure_logging
from tests.conftest import Broker, make_config_dict
from tests.gwharness import running_gateway, wait_connected

PAD = "x" * 200  # ~300-byte envelopes, as in shared/measurements.md


def rss_mb() -> float:
    """Resident set size of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


# --- 1. enqueue -----------------------------------------------------------------------------


def raw_sqlite_batched(path: Path, n: int, per_commit: int = 100) -> float:
    """Raw sqlite3, WAL + FULL, ``per_commit`` rows per transaction: rows/s."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(
        "CREATE TABLE e (seq INTEGER PRIMARY KEY, id TEXT, type TEXT, created_at REAL, body TEXT)"
    )
    body = json.dumps({"id": "0" * 36, "type": "bench", "data": {"i": 0, "pad": PAD}})
    t0 = time.perf_counter()
    seq = 0
    for _ in range(n // per_commit):
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO e VALUES (?, ?, 'bench', ?, ?)",
            [(seq + k + 1, f"id{seq + k}", time.time(), body) for k in range(per_commit)],
        )
        conn.execute("COMMIT")
        seq += per_commit
    rate = seq / (time.perf_counter() - t0)
    conn.close()
    return rate


async def enqueue_rate(path: Path, producers: int, total: int) -> tuple[float, float]:
    """Durable enqueue through the gateway's writer: (events/s, mean events per commit)."""
    async with Database(path, store_id="bench", boot_id="bench") as db:
        writer = asyncio.get_running_loop().create_task(db.run())
        per = total // producers

        async def produce() -> None:
            for i in range(per):
                await db.submit(Work(events=[db.draft("bench", {"i": i, "pad": PAD})]))

        commits0 = db.commits
        t0 = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for _ in range(producers):
                tg.create_task(produce())
        elapsed = time.perf_counter() - t0
        commits = db.commits - commits0
        db.request_stop()
        await writer
    return per * producers / elapsed, per * producers / max(1, commits)


# --- 2. drain ---------------------------------------------------------------------------------


async def fill(path: Path, n: int) -> None:
    """Commit n events in large units (setup, not measured)."""
    async with Database(path, store_id="store-0042", boot_id="bench") as db:
        writer = asyncio.get_running_loop().create_task(db.run())
        chunk = 1000
        for start in range(0, n, chunk):
            await db.submit(
                Work(
                    events=[
                        db.draft("bench", {"i": i, "pad": PAD})
                        for i in range(start, min(n, start + chunk))
                    ]
                )
            )
        db.request_stop()
        await writer


def raw_paho_pipelined(port: int, payloads: list[bytes], window: int = 100) -> float:
    """paho with its network thread, app-capped window, QoS 1: seconds until all PUBACKed."""
    done = threading.Semaphore(0)
    slots = threading.Semaphore(window)
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="raw-paho-bench")
    client.max_inflight_messages_set(0)
    client.max_queued_messages_set(0)

    def on_publish(*_: Any) -> None:
        slots.release()
        done.release()

    client.on_publish = on_publish
    client.connect("127.0.0.1", port)
    client.loop_start()
    t0 = time.perf_counter()
    for p in payloads:
        slots.acquire()
        client.publish("raw/bench", p, qos=1)
    for _ in payloads:
        done.acquire()
    elapsed = time.perf_counter() - t0
    client.loop_stop()
    client.disconnect()
    return elapsed


async def drain_backlog(tmp: Path, cloud: Broker, store: Broker, n: int) -> dict[str, float]:
    """Fill n events, start the gateway, time until every event is PUBACKed; RSS while draining."""
    raw = make_config_dict(tmp, cloud.url, store.url)
    raw["storage"]["path"] = str(tmp / "drain.db")
    cfg = parse_config(raw)
    await fill(Path(raw["storage"]["path"]), n)
    async with Database(Path(raw["storage"]["path"]), store_id="store-0042", boot_id="x") as db:
        rows = [r for r in await db.fetchall("SELECT seq, body FROM events ORDER BY seq")]
    payloads = [b.payload for b in make_batches([(int(s), str(b)) for s, b in rows], 100)]
    singles = [str(b).encode() for _s, b in rows]
    del rows
    raw_s = await asyncio.to_thread(raw_paho_pipelined, cloud.port, payloads)
    raw_single_s = await asyncio.to_thread(raw_paho_pipelined, cloud.port, singles)
    del singles
    messages = len(payloads)
    del payloads
    samples: list[float] = []
    rss_before = rss_mb()
    async with running_gateway(cfg) as gw:
        t0 = time.perf_counter()
        await wait_connected(gw)

        async def sample() -> None:
            while True:
                samples.append(rss_mb())
                await asyncio.sleep(0.05)

        sampler = asyncio.get_running_loop().create_task(sample())
        while gw.outbox.sent_through < n:  # noqa: ASYNC110 - a benchmark's measurement loop
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - t0
        sampler.cancel()
    return {
        "events": n,
        "messages": messages,
        "gateway_s": elapsed,
        "raw_s": raw_s,
        "raw_single_s": raw_single_s,
        "rss_before": rss_before,
        "rss_peak": max(samples, default=rss_before),
        "rss_after": rss_mb(),
    }


# --- 3. latency and 5. pipeline -------------------------------------------------------------


async def latency_at_rate(
    tmp: Path, cloud: Broker, store: Broker, rate: float, seconds: float
) -> list[float]:
    """Commit one event every 1/rate s; measure commit-start → received by a cloud subscriber."""
    raw = make_config_dict(tmp, cloud.url, store.url)
    raw["storage"]["path"] = str(tmp / "latency.db")
    sent: dict[int, float] = {}
    latencies: list[float] = []
    async with (
        running_gateway(parse_config(raw)) as gw,
        aiomqtt.Client("127.0.0.1", cloud.port) as sub,
    ):
        await wait_connected(gw)
        await sub.subscribe("retail/v1/store-0042/events", qos=1)
        n = int(rate * seconds)

        async def receive() -> None:
            async for msg in sub.messages:
                now = time.perf_counter()
                for env in json.loads(bytes(msg.payload))["events"]:  # type: ignore[arg-type]
                    i = env["data"].get("i")
                    if i in sent:
                        latencies.append((now - sent.pop(i)) * 1000)
                if len(latencies) >= n:
                    return

        async def produce() -> None:
            start = time.perf_counter()
            for i in range(n):
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                sent[i] = time.perf_counter()
                await gw.db.submit(Work(events=[gw.db.draft("bench", {"i": i, "pad": PAD})]))

        async with asyncio.timeout(seconds * 3 + 10), asyncio.TaskGroup() as tg:
            tg.create_task(receive())
            tg.create_task(produce())
    return latencies


async def pipeline(tmp: Path, cloud: Broker, store: Broker, total: int) -> float:
    """100 producers commit ``total`` events while the link drains: events/s committed→PUBACKed."""
    raw = make_config_dict(tmp, cloud.url, store.url)
    raw["storage"]["path"] = str(tmp / "pipeline.db")
    async with running_gateway(parse_config(raw)) as gw:
        await wait_connected(gw)
        per = total // 100

        async def produce() -> None:
            for i in range(per):
                await gw.db.submit(Work(events=[gw.db.draft("bench", {"i": i, "pad": PAD})]))

        t0 = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for _ in range(100):
                tg.create_task(produce())
        while gw.outbox.sent_through < per * 100:  # noqa: ASYNC110 - measurement loop
            await asyncio.sleep(0.005)
        return per * 100 / (time.perf_counter() - t0)


# --- main ---------------------------------------------------------------------------------------


async def main(events: int, only: str | None = None) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-outbox-"))
    rows: list[tuple[str, str, str, str]] = []

    def add(what: str, value: str, baseline: str, ratio: str) -> None:
        rows.append((what, value, baseline, ratio))
        print(f"  {what}: {value} (baseline {baseline}, ratio {ratio})", flush=True)

    raw_rate = raw_sqlite_batched(tmp / "raw.db", 50_000)
    for producers, total in (
        ((1, 3000), (10, 20_000), (100, 50_000)) if only in (None, "enqueue") else ()
    ):
        rate, per_commit = await enqueue_rate(tmp / f"enq{producers}.db", producers, total)
        add(
            f"enqueue, {producers} producer(s)",
            f"{rate:,.0f} ev/s ({per_commit:.0f}/commit)",
            f"raw sqlite {raw_rate:,.0f} rows/s",
            f"{rate / raw_rate:.2f}",
        )

    cloud = Broker(tmp).start()
    store = Broker(tmp).start()
    try:
        if only == "enqueue":
            return
        d = await drain_backlog(tmp, cloud, store, events)
        gw_rate = d["events"] / d["gateway_s"]
        raw_rate_p = d["events"] / d["raw_s"]
        add(
            f"drain {events:,} backlog",
            f"{gw_rate:,.0f} ev/s ({d['messages']:.0f} msgs)",
            f"raw paho, same batch msgs {raw_rate_p:,.0f} ev/s",
            f"{gw_rate / raw_rate_p:.2f}",
        )
        single = d["events"] / d["raw_single_s"]
        add(
            f"drain {events:,} backlog",
            f"{gw_rate:,.0f} ev/s",
            f"raw paho, one msg per event {single:,.0f} ev/s",
            f"{gw_rate / single:.1f}",
        )
        add(
            "RSS during drain",
            f"{d['rss_before']:.0f} → peak {d['rss_peak']:.0f} → {d['rss_after']:.0f} MB",
            "-",
            "-",
        )
        if only == "drain":
            return
        lat = await latency_at_rate(tmp, cloud, store, rate=200, seconds=10)
        add(
            "enqueue→cloud latency at 200 ev/s",
            f"p50 {statistics.median(lat):.2f} ms, p99 {pct(lat, 99):.2f} ms",
            "-",
            "-",
        )
        pipe = await pipeline(tmp, cloud, store, 50_000)
        add(
            "pipeline, 100 producers, live drain",
            f"{pipe:,.0f} ev/s committed→PUBACKed",
            "peer gateway 510–1,180 msg/s",
            f"{pipe / 1180:.1f}× peer best",
        )
    finally:
        cloud.kill()
        store.kill()

    print("\n| measurement | gateway | baseline (same run) | ratio |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--only", choices=["enqueue", "drain"], default=None)
    args = parser.parse_args()
    configure_logging("warning", "console")
    asyncio.run(main(args.events, args.only))
