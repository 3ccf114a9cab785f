"""From a POS ``payment/request`` to the payment it asks for: the rules per kind, and for a
reversal the original it reverses. Every refusal is a RequestError naming the field."""

from __future__ import annotations

from devices.zvt import CURRENCIES, ZvtSettings
from gateway.config import GatewayConfig
from gateway.payment_book import PaymentBook
from gateway.payment_records import Payment, PaymentRequestBody
from gateway.storebus import RequestError


async def requested_payment(
    book: PaymentBook,
    config: GatewayConfig,
    till: str,
    settings: ZvtSettings,
    body: PaymentRequestBody,
) -> Payment:
    """The payment a valid request asks for; RequestError naming the field otherwise."""
    if body.kind == "purchase":
        if body.amount_minor is None:
            raise RequestError("invalid", "amount_minor: required for a purchase")
        if body.currency is None:
            raise RequestError("invalid", "currency: required for a purchase")
        if body.currency not in CURRENCIES or body.currency not in config.pos.currencies:
            raise RequestError("invalid", f"currency: {body.currency} is not accepted here")
        return Payment(
            body.request_id, till, settings.id, "purchase", body.amount_minor, body.currency
        )
    if body.reversal_of is None:
        raise RequestError("invalid", "reversal_of: required for a reversal")
    original = await book.get(body.reversal_of)
    receipt_no = (
        original.payment.receipt.receipt_no if original and original.payment.receipt else None
    )
    if (
        original is None
        or original.state != "approved"
        or original.payment.kind != "purchase"
        or receipt_no is None
    ):
        raise RequestError("unknown-original", "reversal_of: no approved purchase has this id")
    o = original.payment
    if o.device_id != settings.id:
        raise RequestError(
            "other-terminal",
            f"reversal_of: the purchase ran on payment terminal {o.device_id}; "
            "reverse it at a till of that terminal",
        )
    if await book.reversed_by(o.request_id) is not None:
        raise RequestError("already-reversed", "reversal_of: this purchase is already reversed")
    return Payment(body.request_id, till, settings.id, "reversal", o.amount_minor, o.currency,
                   o.request_id, receipt_no)  # fmt: skip
