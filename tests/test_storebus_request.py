"""Request.publish puts side messages under the owner's topics, whatever the action's depth."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.storebus import Request


class FakeBus:
    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []

    async def publish_json(self, topic: str, body: Any, *, retain: bool = False) -> None:
        self.sent.append((topic, body))


@pytest.mark.parametrize(
    ("topic", "suffix", "expected"),
    [
        (
            "store/v1/pos/pos-1/payment/request",
            "payment/status",
            "store/v1/pos/pos-1/payment/status",
        ),
        ("store/v1/pos/pos-1/sale", "sale/result", "store/v1/pos/pos-1/sale/result"),
        ("store/v1/lockers/A/load", "state", "store/v1/lockers/A/state"),
    ],
)
async def test_publish_goes_under_the_owner(topic: str, suffix: str, expected: str) -> None:
    bus = FakeBus()
    req = Request(topic, topic.split("/")[3], "r-1", f"{topic}/result", bus)  # type: ignore[arg-type]
    await req.publish(suffix, {"request_id": "r-1"})
    assert bus.sent == [(expected, {"request_id": "r-1"})]
