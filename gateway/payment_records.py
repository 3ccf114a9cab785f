"""Card payments as data: inbound request models, the kept part of a 04 0F, the rules that turn a
terminal's answer into a status, and the bodies of results and events.

Only the masked PAN the terminal sends is ever kept; free text from the terminal passes
:func:`without_card_numbers` before it is stored, logged or sent. Nothing here does I/O.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from devices.zvt import CURRENCIES, TransactionResult
from devices.zvt_codec import StatusInfo

Kind = Literal["purchase", "reversal"]
Status = Literal["approved", "declined", "aborted", "failed", "in_doubt"]
State = Literal[
    "authorizing", "confirming", "approved", "declined", "aborted", "failed", "in_doubt"
]
Relation = Literal["same", "older", "newer", "unknown"]

OPEN_STATES: tuple[State, ...] = ("authorizing", "confirming")
MAX_AMOUNT_MINOR = 999_999_999_999  # BMP 04: 6 bytes BCD
RC_APPROVED = 0x00
RC_ABORTED = 0x6C  # customer timeout or abort key
_CURRENCY_BY_CODE = {code: alpha for alpha, code in CURRENCIES.items()}
_DIGIT_RUN = re.compile(r"\d{13,19}")


# --- inbound (the edge) -------------------------------------------------------------------------


class PaymentRequestBody(BaseModel):
    """``payment/request``; which fields a kind needs is checked by the service (named in errors)."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    request_id: str = Field(min_length=1, max_length=64)
    kind: Kind
    amount_minor: int | None = Field(default=None, gt=0, le=MAX_AMOUNT_MINOR)
    currency: str | None = Field(default=None, pattern=r"^[A-Z]{3}$")
    reversal_of: str | None = Field(default=None, min_length=1, max_length=64)


class PaymentAbortBody(BaseModel):
    """``payment/abort``."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    request_id: str = Field(min_length=1, max_length=64)


class EndOfDayData(BaseModel):
    """``data`` of the ``payment.end_of_day`` cloud command."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    device_id: str | None = Field(default=None, min_length=1, max_length=64)


# --- values inside ------------------------------------------------------------------------------


def without_card_numbers(text: str | None) -> str | None:
    """``text`` with every 13-19 digit run masked but its last four digits."""
    if text is None:
        return None
    return _DIGIT_RUN.sub(lambda m: "*" * (len(m.group()) - 4) + m.group()[-4:], text)


def currency_alpha(numeric: int | None) -> str | None:
    """ISO 4217 alpha code for a numeric one we know, else None."""
    return None if numeric is None else _CURRENCY_BY_CODE.get(numeric)


@dataclass(frozen=True, slots=True)
class Receipt:
    """The part of a Status-Information (04 0F) that is kept: no card data but the masked PAN."""

    result_code: int | None = None
    amount_minor: int | None = None
    trace_no: int | None = None
    receipt_no: int | None = None
    auth_code: str | None = None
    masked_pan: str | None = None
    card_brand: str | None = None
    terminal_tid: str | None = None

    @classmethod
    def of(cls, info: StatusInfo) -> Receipt:
        """Keep what the gateway needs from a decoded 04 0F (the codec already masked the PAN)."""
        return cls(
            result_code=info.result_code,
            amount_minor=info.amount_minor,
            trace_no=info.trace_no,
            receipt_no=info.receipt_no,
            auth_code=without_card_numbers(info.auth_attribute),
            masked_pan=info.masked_pan,
            card_brand=without_card_numbers(info.card_brand),
            terminal_tid=info.terminal_id,
        )

    def to_json(self) -> str:
        """The stored form (payments.receipt)."""
        return json.dumps({k: getattr(self, k) for k in self.__slots__}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | None) -> Receipt | None:
        """Inverse of :meth:`to_json`; None for a NULL column."""
        return None if text is None else cls(**json.loads(text))

    def relation(self, other: Receipt) -> Relation:
        """Where ``other`` (a repeated 04 0F) stands relative to this transaction."""
        if self.trace_no is not None and other.trace_no is not None:
            if other.trace_no == self.trace_no:
                same_receipt = other.receipt_no == self.receipt_no or None in (
                    other.receipt_no,
                    self.receipt_no,
                )
                return "same" if same_receipt else "unknown"
            return "older" if other.trace_no < self.trace_no else "newer"
        if self.receipt_no is not None and other.receipt_no is not None:
            if other.receipt_no == self.receipt_no:
                return "same"
            return "older" if other.receipt_no < self.receipt_no else "newer"
        return "unknown"


@dataclass(frozen=True, slots=True)
class Payment:
    """One payment request as admitted: where it runs and what it is for."""

    request_id: str
    till: str  # the POS terminal id from the topic
    device_id: str  # the payment terminal
    kind: Kind
    amount_minor: int
    currency: str
    reversal_of: str | None = None
    original_receipt_no: int | None = None
    receipt: Receipt | None = None  # set once its 04 0F was committed (state confirming)


@dataclass(frozen=True, slots=True)
class Problem:
    """A machine code and a human sentence (``error`` in results)."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Final:
    """How a payment ended (or that it could not be established: in_doubt)."""

    status: Status
    result_code: int | None = None
    receipt: Receipt | None = None  # the 04 0F that decided, when one did
    error: Problem | None = None
    recheck: bool = False  # in_doubt that asking the terminal again may still settle


# --- rules --------------------------------------------------------------------------------------


def status_of_result_code(code: int | None) -> Status:
    """The status a booked 04 0F's result code stands for."""
    if code is None:
        return "in_doubt"
    if code == RC_APPROVED:
        return "approved"
    return "aborted" if code == RC_ABORTED else "declined"


def final_of_receipt(receipt: Receipt) -> Final:
    """A 04 0F that was acknowledged (so booked): its result code decides."""
    status = status_of_result_code(receipt.result_code)
    problem = None
    if status == "in_doubt":
        problem = Problem("no-result-code", "the terminal's result carried no result code")
    return Final(status, receipt.result_code, receipt, problem, recheck=status == "in_doubt")


def final_of_transaction(result: TransactionResult) -> Final:
    """The status of a finished authorization or reversal (see devices.zvt.TransactionResult)."""
    if result.status_info is not None:
        return final_of_receipt(Receipt.of(result.status_info))
    if result.outcome == "aborted":
        code = result.abort_code
        return Final("aborted" if code in (None, RC_ABORTED) else "declined", code)
    return Final("failed", error=Problem("no-result", "the terminal ended without a result"))


def final_of_repeat(ours: Receipt, info: StatusInfo | None) -> Final:
    """Judge the 04 0F a Repeat Receipt returned against our recorded one (devices.md Recovery)."""
    if info is None:
        return Final(
            "in_doubt",
            error=Problem("no-repeat", "the terminal repeated no transaction"),
            recheck=True,
        )
    theirs = Receipt.of(info)
    relation = ours.relation(theirs)
    if relation == "same":
        return final_of_receipt(theirs)
    if relation == "older":
        return Final("failed", error=Problem("not-booked", "the terminal did not book it"))
    return Final(
        "in_doubt",
        error=Problem(
            "unplaced",
            "the terminal's last transaction is a later one"
            if relation == "newer"
            else "the terminal's last transaction cannot be matched",
        ),
        recheck=relation == "unknown",
    )


# --- outbound bodies ----------------------------------------------------------------------------


def _shown(payment: Payment, final: Final) -> Receipt | None:
    """The 04 0F reported with an outcome: the deciding one, or ours while in doubt."""
    return final.receipt or (payment.receipt if final.status == "in_doubt" else None)


def _receipt_fields(receipt: Receipt | None, result_code: int | None) -> dict[str, Any]:
    fields: dict[str, Any] = {"result_code": result_code}
    if receipt is not None:
        fields |= {
            "auth_code": receipt.auth_code,
            "masked_pan": receipt.masked_pan,
            "card_brand": receipt.card_brand,
            "receipt_no": receipt.receipt_no,
            "trace_no": receipt.trace_no,
        }
    return fields


def result_body(payment: Payment, final: Final) -> dict[str, Any]:
    """The ``payment/result`` message for a payment that ended (or is in doubt)."""
    receipt = _shown(payment, final)
    body: dict[str, Any] = {
        "request_id": payment.request_id,
        "status": final.status,
        "amount_minor": payment.amount_minor,
        "currency": payment.currency,
        **_receipt_fields(receipt, final.result_code),
    }
    if final.error is not None:
        body["error"] = {"code": final.error.code, "message": final.error.message}
    return {k: v for k, v in body.items() if v is not None}


def busy_body(request_id: str, amount_minor: int, currency: str) -> dict[str, Any]:
    """The ``payment/result`` for a request that was not started (terminal or request busy)."""
    return {
        "request_id": request_id,
        "status": "busy",
        "amount_minor": amount_minor,
        "currency": currency,
    }


def completed_data(payment: Payment, final: Final) -> dict[str, Any]:
    """``data`` of a ``payment.completed`` event."""
    receipt = _shown(payment, final)
    data: dict[str, Any] = {
        "request_id": payment.request_id,
        "terminal_id": payment.till,
        "device_id": payment.device_id,
        "kind": payment.kind,
        "status": final.status,
        "amount_minor": payment.amount_minor,
        "currency": payment.currency,
        **_receipt_fields(receipt, final.result_code),
        "terminal_tid": receipt.terminal_tid if receipt is not None else None,
        "reversal_of": payment.reversal_of,
    }
    return {k: v for k, v in data.items() if v is not None}


def resolved_data(payment: Payment, final: Final, resolved_by: str) -> dict[str, Any]:
    """``data`` of a ``payment.resolved`` event (``resolved_by``: ``terminal`` or ``uid:<n>``)."""
    data = {
        "request_id": payment.request_id,
        "status": final.status,
        **_receipt_fields(_shown(payment, final), final.result_code),
        "resolved_by": resolved_by,
    }
    return {k: v for k, v in data.items() if v is not None}


def end_of_day_data(
    device_id: str, at: str, info: StatusInfo | None, result_code: int | None, error: str | None
) -> dict[str, Any]:
    """``data`` of a ``payment.end_of_day`` event (``error`` only when the run failed)."""
    data: dict[str, Any] = {"device_id": device_id, "result_code": result_code}
    if info is not None:
        data |= {
            "total_minor": info.amount_minor,
            "currency": currency_alpha(info.currency_numeric),
            "trace_no": info.trace_no,
        }
    data["at"] = at
    if error is not None:
        data["error"] = error
    return {k: v for k, v in data.items() if v is not None or k == "result_code"}
