"""Run a Gateway in-process for tests (the subprocess harness lives in tests/chaos)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

from gateway.app import Gateway
from gateway.config import GatewayConfig
from gateway.db import Work


@contextlib.asynccontextmanager
async def running_gateway(config: GatewayConfig) -> AsyncIterator[Gateway]:
    """A built, serving gateway; stopped cleanly (and checked) on exit."""
    gw = Gateway(config)
    async with AsyncExitStack() as stack:
        await gw.build(stack)
        task = asyncio.get_running_loop().create_task(gw.serve(), name="gateway")
        try:
            async with asyncio.timeout(10):
                await gw.ready.wait()
            yield gw
        finally:
            gw.request_stop()
            async with asyncio.timeout(20):
                await task


async def emit(gw: Gateway, n: int, type_: str = "test.event") -> list[int]:
    """Commit ``n`` events through the writer; returns their seqs."""
    results = await asyncio.gather(
        *(gw.db.submit(Work(events=[gw.db.draft(type_, {"i": i})])) for i in range(n))
    )
    return [s for r in results for s in r.seqs]


async def wait_connected(gw: Gateway, timeout_s: float = 10.0) -> None:
    """Wait until the cloud link is up."""
    async with asyncio.timeout(timeout_s):
        while not gw.cloud.link.connected:  # noqa: ASYNC110 - test helper, bounded by timeout
            await asyncio.sleep(0.02)
