"""No card number anywhere (issue 8): the PAN rule, and card numbers fed through every edge.

The rule lives in gateway/carddata.py; the scans below use the same helper, and a second,
stricter scan (any Luhn-valid 13-19 digit run, whatever its prefix, except the SKUs we sent)
proves that nothing else leaks. The payment path (ZVT simulator's unmasked BMP 22) is covered by
tests/test_payment_crash.py::test_no_card_number_in_database_wal_logs_or_mqtt.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog

from gateway.backend_sim import RecordingBackend
from gateway.carddata import card_number_field, find_pan, gtin_ok, luhn_ok, mask_pan, pans_in
from gateway.config import GatewayConfig
from gateway.logs import configure_logging
from tests.conftest import Broker
from tests.gwharness import running_gateway, wait_connected
from tests.pos_client import PosClient

ConfigFactory = Callable[..., GatewayConfig]

VISA = "4111111111111111"
MASTERCARD = "5413330089681234"
AMEX = "378282246310005"
VISA_19 = "4000000000000000006"
GROUPED = "4111 1111 1111 1111"
PANS = (VISA, MASTERCARD, AMEX, VISA_19)
# An EAN-13 whose GS1 check digit is right and which passes Luhn by chance: a SKU, not a card
EAN_LUHN = "4006381333924"
EAN_PLAIN = "4006381333931"  # the spec's example SKU (not Luhn-valid)


# --- the rule -----------------------------------------------------------------------------------


@pytest.mark.parametrize("pan", [*PANS, "2223000048400011", "6011111111111117", "3530111333300000"])
def test_card_numbers_are_found(pan: str) -> None:
    assert luhn_ok(pan)
    assert find_pan(pan)
    assert find_pan(f"ref-{pan}-x")
    assert list(pans_in(f"card {pan} end")) == [pan]


@pytest.mark.parametrize(
    ("text", "found"),
    [
        (GROUPED, True),
        ("4111-1111-1111-1111", True),
        (f"qty 2 {GROUPED}", True),  # a stray group before the number does not hide it
        ("4111111111111112", False),  # Luhn fails
        ("1234567890123452", False),  # Luhn-valid, no card prefix (an order number)
        ("41111111111111110", False),  # 17 digits, Luhn fails
        ("4111111111111111111111", False),  # 22 digits: not a PAN, taken whole
        ("411111111111", False),  # 12 digits
        ("2026-11-22T18:00:00.000Z", False),
        ("************1111", False),  # masked
    ],
)
def test_what_is_not_a_card_number(text: str, found: bool) -> None:
    assert find_pan(text) is found


def test_skus_are_exempt_only_when_they_are_gtins() -> None:
    assert gtin_ok(EAN_LUHN) and luhn_ok(EAN_LUHN) and find_pan(EAN_LUHN)
    line = {"sku": EAN_LUHN, "qty": 1}
    assert card_number_field({"lines": [line]}) is None  # a real article number
    assert card_number_field({"skus": [EAN_PLAIN, EAN_LUHN]}) is None
    assert card_number_field({"lines": [{"sku": VISA}]}) == "lines.0.sku"  # 16 digits: no GTIN
    assert card_number_field({"skus": ["a", AMEX]}) == "skus"
    # the same number outside a SKU field is refused
    assert card_number_field({"sale_id": EAN_LUHN}) == "sale_id"
    assert card_number_field({"payments": [{"payment_ref": f"x {GROUPED}"}]}) == (
        "payments.0.payment_ref"
    )
    assert card_number_field({"amount_minor": int(VISA)}) == "amount_minor"
    assert card_number_field({"flag": True, "n": 5, "t": "ok"}) is None


def test_mask_keeps_the_last_four_and_the_length() -> None:
    assert mask_pan(VISA) == "************1111"
    assert mask_pan(f"pan={MASTERCARD};") == "pan=************1234;"
    assert mask_pan(GROUPED) == "**** **** **** 1111"
    assert mask_pan("order 1234567890123452") == "order 1234567890123452"


def test_log_lines_mask_card_numbers() -> None:
    out = io.StringIO()
    configure_logging("debug", "json", stream=out)
    try:
        log = structlog.get_logger("t")
        log.warning("malformed ack ignored", payload=f'{{"x": "{VISA}"}}', amount=int(AMEX))
        log.info("stock", sku=EAN_LUHN)
        try:
            raise ValueError(f"bad input {MASTERCARD}")
        except ValueError:
            log.exception("boom")
    finally:
        structlog.reset_defaults()
    text = out.getvalue()
    assert scan(text.encode()) == []
    assert list(pans_in(text)) == [EAN_LUHN]
    assert "************1111" in text and "************1234" in text
    assert EAN_LUHN in text  # a GTIN SKU stays readable


# --- scanners -----------------------------------------------------------------------------------

_STRICT = re.compile(r"(?<![0-9A-Za-z])[0-9]{13,19}(?![0-9A-Za-z])")


def scan(data: bytes, skus: tuple[str, ...] = (EAN_LUHN,)) -> list[str]:
    """PAN-like numbers by the gateway's rule (GTIN SKUs sent are SKUs), plus every test PAN."""
    text = data.decode("latin-1")
    found = [pan for pan in pans_in(text) if pan not in skus]
    digits_only = re.sub(r"[ -]", "", text)
    return found + [pan for pan in PANS if pan in text or pan in digits_only]


def strict_scan(data: bytes, skus: tuple[str, ...]) -> list[str]:
    """Any Luhn-valid 13-19 digit run, whatever its prefix, except the SKUs that were sent."""
    text = data.decode("latin-1")
    return [m for m in _STRICT.findall(text) if luhn_ok(m) and m not in skus]


# --- through every inbound path -----------------------------------------------------------------


def sale(sale_id: str, sku: str = EAN_PLAIN, **extra: Any) -> dict[str, Any]:
    """A valid one-line sale; ``extra`` overrides fields."""
    body: dict[str, Any] = {
        "sale_id": sale_id,
        "lines": [{"sku": sku, "qty": 1, "unit_price_minor": 199}],
        "total_minor": 199,
        "currency": "EUR",
        "payments": [{"method": "card", "amount_minor": 199, "payment_ref": f"pay-{sale_id}"}],
        "completed_at": "2026-11-22T18:00:00.000Z",
    }
    return body | extra


@pytest.mark.broker
async def test_card_numbers_fed_everywhere_are_refused_and_never_stored_logged_or_sent(
    cloud_broker: Broker,
    store_broker: Broker,
    config_factory: ConfigFactory,
    tmp_path: Path,
    log_output: list[dict[str, Any]],
) -> None:
    cfg = config_factory(cloud_broker.url, store_broker.url, logging={"level": "debug"})
    db_path = cfg.storage.path
    async with (
        PosClient(cloud_broker.port, subscribe="#") as cloud_wire,
        PosClient(store_broker.port, subscribe="#") as till,
        running_gateway(cfg) as gw,
        RecordingBackend("127.0.0.1", cloud_broker.port, "store-0042") as be,
    ):
        await wait_connected(gw)

        async def answer(action: str, body: dict[str, Any], id_field: str) -> dict[str, Any]:
            rid = body[id_field]
            await till.send(body, action=action)

            def got() -> list[dict[str, Any]]:
                return [b for b in till.on(f"{action}/result") if b.get(id_field) == rid]

            await till.wait(lambda: bool(got()))
            return got()[0]

        async def unreadable(action: str, body: dict[str, Any]) -> dict[str, Any]:
            seen = len(till.topics("store/v1/errors"))
            await till.send(body, action=action)
            await till.wait(lambda: len(till.topics("store/v1/errors")) > seen)
            return [m.json() for m in till.messages if m.topic == "store/v1/errors"][-1]

        # POS: ids that are card numbers cannot even be answered by id
        for pan in (VISA, GROUPED):
            err = await unreadable("sale", sale(pan))
            assert err["error"]["code"] == "card-number-refused"
        err = await unreadable("stock", {"request_id": AMEX, "skus": [EAN_PLAIN]})
        assert err["error"]["code"] == "card-number-refused"
        # POS: card numbers in other fields are refused by name
        refused = {
            "payment_ref": sale("s-1", payments=[
                {"method": "card", "amount_minor": 199, "payment_ref": f"card {MASTERCARD}"}
            ]),
            "sku": sale("s-2", sku=VISA),
            "sku-19": sale("s-3", sku=VISA_19),
        }  # fmt: skip
        for why, body in refused.items():
            res = await answer("sale", body, "sale_id")
            assert (res["status"], res["error"]["code"]) == ("rejected", "card-number-refused"), why
            assert "lines" in res["error"]["message"] or "payments" in res["error"]["message"]
        ret = sale("r-1") | {"return_id": "r-1", "original_sale_id": GROUPED}
        del ret["sale_id"], ret["payments"]
        res = await answer("return", ret, "return_id")
        assert res["error"]["code"] == "card-number-refused"
        res = await answer("stock", {"request_id": "q-1", "skus": [EAN_PLAIN, VISA]}, "request_id")
        assert res["error"]["code"] == "card-number-refused"
        # a GTIN that passes Luhn by chance is a SKU: that sale goes through
        res = await answer("sale", sale("s-ok", sku=EAN_LUHN), "sale_id")
        assert res["status"] == "accepted"

        # Cloud commands
        cid = await be.send_command(
            "inventory.adjust",
            {"adjustment_id": "a-1", "sku": EAN_PLAIN, "delta": 1, "reason": f"card {VISA}"},
        )
        res = await be.wait_for_result(cid)
        assert res["reason"] == "invalid" and "data.reason" in res["detail"]
        snapshot = {"snapshot_id": "sn-1", "as_of_seq": 0, "part": 1, "parts": 1}
        cid = await be.send_command(
            "inventory.snapshot", snapshot | {"items": [{"sku": AMEX, "on_hand": 3}]}
        )
        res = await be.wait_for_result(cid)
        assert res["reason"] == "invalid" and "items.0.sku" in res["detail"]
        await be.send_command("events.replay", {"from_seq": 1}, command_id=MASTERCARD)
        await be.wait_until(lambda r: None in r.results())
        assert be.record.results()[None][0]["reason"] == "invalid"
        cid = await be.send_command("events.replay", {"from_seq": 1, "note": VISA})  # ignored
        assert (await be.wait_for_result(cid))["status"] == "ok"
        # the accepted sale's event reached the cloud: the scans below see real traffic
        await cloud_wire.wait(lambda: any(b"s-ok" in m.payload for m in cloud_wire.messages))

        files = await asyncio.to_thread(
            lambda: {p.name: p.read_bytes() for p in db_path.parent.iterdir()}
        )
        assert f"{db_path.name}-wal" in files

    after = {f"after stop: {p.name}": p.read_bytes() for p in db_path.parent.iterdir()}
    inbound = ("/sale", "/return", "/stock", "/commands/")  # what the test itself published
    wire = {
        "store bus": b"\n".join(
            m.payload for m in till.messages if not m.topic.endswith(inbound[:3])
        ),
        "cloud": b"\n".join(m.payload for m in cloud_wire.messages if inbound[3] not in m.topic),
        "logs": json.dumps(log_output, default=str, ensure_ascii=False).encode(),
    }
    everything = files | after | wire
    assert {k: scan(v) for k, v in everything.items() if scan(v)} == {}
    strict = {k: strict_scan(v, (EAN_LUHN,)) for k, v in everything.items()}
    assert {k: v for k, v in strict.items() if v} == {}
    # the scans are not blind: the accepted GTIN SKU is there, and the refusals were sent
    assert EAN_LUHN.encode() in wire["cloud"]
    assert b"card-number-refused" in wire["store bus"]
