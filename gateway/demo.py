"""``store-gateway demo``: the whole product on one machine, no hardware, no configuration.

Stub until the demo issue is done: it starts two local brokers (mosquitto from the PATH), the
daemon with a generated configuration in a temporary directory and a simulated cloud backend,
sends a command through the cloud link and checks that its result arrives gapless and acked.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path

from gateway.app import Gateway
from gateway.backend_sim import RecordingBackend
from gateway.config import parse_config
from gateway.logs import configure_logging


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def local_broker(workdir: Path) -> Iterator[int]:
    """A throwaway mosquitto on a free loopback port; yields the port."""
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(exe).exists():
        raise RuntimeError("the demo needs mosquitto on the PATH (apt-get install mosquitto)")
    port = _free_port()
    conf = workdir / f"mosquitto-{port}.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen(
        [exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.05)
        yield port
    finally:
        proc.kill()
        proc.wait()


@contextlib.asynccontextmanager
async def _gateway(cfg_dir: Path, cloud_port: int, store_port: int) -> AsyncIterator[Gateway]:
    config = parse_config(
        {
            "store": {"id": "demo-store"},
            "cloud": {"url": f"mqtt://127.0.0.1:{cloud_port}", "keepalive_s": 10},
            "store_bus": {"url": f"mqtt://127.0.0.1:{store_port}", "keepalive_s": 10},
            "storage": {"path": str(cfg_dir / "gateway.db")},
            "clock": {"synced": "yes"},
            "control": {"socket": str(cfg_dir / "control.sock")},
            "discovery": {"enabled": False},  # a demo must not announce a store on the real LAN
        }
    )
    gw = Gateway(config)
    async with AsyncExitStack() as stack:
        await gw.build(stack)
        task = asyncio.get_running_loop().create_task(gw.serve(), name="gateway")
        try:
            await asyncio.wait_for(gw.ready.wait(), 10)
            yield gw
        finally:
            gw.request_stop()
            await task


async def _story(cfg_dir: Path, cloud_port: int, store_port: int) -> bool:
    async with (
        _gateway(cfg_dir, cloud_port, store_port) as gw,
        RecordingBackend("127.0.0.1", cloud_port, "demo-store") as backend,
    ):
        print("gateway ready; cloud backend connected")  # noqa: T201
        cid = await backend.send_command("events.replay", {"from_seq": 1})
        result = await backend.wait_for_result(cid)
        print(f"command {cid}: {result['status']}")  # noqa: T201
        await backend.wait_for_seq(gw.db.last_seq)
        rec = backend.record
        ok = result["status"] == "ok" and not rec.gaps() and not rec.changed_ids
        print(  # noqa: T201
            f"events committed {gw.db.last_seq}, received {len(rec.events)}, "
            f"lost {len(rec.gaps())}, changed {len(rec.changed_ids)}"
        )
        return ok


def run_demo(*, speed: float = 1.0, keep: bool = False) -> int:
    """Run the demonstration; exit 0 only when every check held."""
    del speed
    configure_logging("warning", "console", sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="store-gateway-demo-"))
    try:
        with local_broker(tmp) as cloud_port, local_broker(tmp) as store_port:
            ok = asyncio.run(_story(tmp, cloud_port, store_port))
    finally:
        if keep:
            print(f"kept {tmp}")  # noqa: T201
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print("demo: all checks held" if ok else "demo: a check FAILED")  # noqa: T201
    return 0 if ok else 1
