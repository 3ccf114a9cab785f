"""What counts as a card number (PAN), in one place: the edge checks, the log filter, the tests.

A *PAN-like* number is a run of 13 to 19 digits (written plain or in groups joined by one space
or dash, as people type card numbers) that passes the Luhn check and starts with a card-network
prefix: 3 (Amex, Diners, JCB), 4 (Visa), 5 (Mastercard, Maestro), 6 (Discover, Maestro,
UnionPay), 2221-2720 (Mastercard 2-series) or 2200-2204 (Mir). A run of digits is taken whole:
a 20-digit number is not a PAN with one digit too many.

SKUs are the exception: EAN-13/GTIN-14 article numbers start with 4 in Germany and one in ten
passes Luhn by chance. A SKU field (``sku``, ``skus``) is PAN-like only when the number is *not*
a valid GTIN (GS1 mod-10 check digit, lengths 13 and 14). So a 15-19 digit card number is never
taken for a SKU, and a 13 or 14 digit card number that also happens to carry a valid GS1 check
digit (one in ten of those rare lengths) is. docs/SECURITY.md explains the trade-off.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

MIN_DIGITS = 13
MAX_DIGITS = 19
SKU_KEYS = frozenset({"sku", "skus"})
REFUSED = "card-number-refused"

# Digit groups joined by single spaces or dashes; the groups are combined below.
_GROUPED = re.compile(r"(?<![0-9])[0-9]+(?:[ -][0-9]+)*(?![0-9])")
_SEPARATOR = re.compile(r"[ -]")


def luhn_ok(digits: str) -> bool:
    """The Luhn (mod 10) check of a string of digits."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = (ord(ch) - 48) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def gtin_ok(digits: str) -> bool:
    """The GS1 check digit of an EAN-13 / GTIN-14 (weights 3,1 from the right)."""
    if len(digits) not in (13, 14):
        return False
    body, check = digits[:-1], ord(digits[-1]) - 48
    total = sum((ord(ch) - 48) * (3 if i % 2 == 0 else 1) for i, ch in enumerate(reversed(body)))
    return (10 - total % 10) % 10 == check


def card_prefix(digits: str) -> bool:
    """True when ``digits`` starts like a number of a card network."""
    if digits[0] in "3456":
        return True
    head = int(digits[:4])
    return 2221 <= head <= 2720 or 2200 <= head <= 2204


def is_pan(digits: str) -> bool:
    """True for a bare digit string that is PAN-like (length, prefix, Luhn)."""
    return (
        MIN_DIGITS <= len(digits) <= MAX_DIGITS
        and digits.isascii()
        and digits.isdigit()
        and card_prefix(digits)
        and luhn_ok(digits)
    )


def _windows(groups: list[str]) -> Iterator[tuple[int, int]]:
    """(first, last+1) group indexes of consecutive groups that form a PAN-like number."""
    for start in range(len(groups)):
        digits = ""
        for stop in range(start, len(groups)):
            digits += groups[stop]
            if len(digits) > MAX_DIGITS:
                break
            if is_pan(digits):
                yield start, stop + 1


def pans_in(text: str) -> Iterator[str]:
    """Every PAN-like number in ``text`` (digits only, separators removed)."""
    for match in _GROUPED.finditer(text):
        groups = _SEPARATOR.split(match.group())
        # any consecutive groups may form the number: "qty 2 4111 1111 1111 1111"
        for start, stop in _windows(groups):
            yield "".join(groups[start:stop])


def find_pan(text: str) -> bool:
    """True when ``text`` contains a PAN-like number."""
    return next(pans_in(text), None) is not None


def sku_is_pan(sku: str) -> bool:
    """True when a SKU is a PAN-like number that is not also a valid GTIN."""
    return any(not gtin_ok(pan) for pan in pans_in(sku))


def mask_pan(text: str) -> str:
    """``text`` with every PAN-like number masked but its last four digits (length kept)."""

    def _mask(match: re.Match[str]) -> str:
        groups = _SEPARATOR.split(match.group())
        hidden: set[int] = set()  # indexes into the run's digits
        offsets = [0]
        for group in groups:
            offsets.append(offsets[-1] + len(group))
        for start, stop in _windows(groups):
            hidden.update(range(offsets[start], offsets[stop] - 4))
        if not hidden:
            return match.group()
        out, n = [], 0
        for ch in match.group():
            if ch.isdigit():
                out.append("*" if n in hidden else ch)
                n += 1
            else:
                out.append(ch)
        return "".join(out)

    return _GROUPED.sub(_mask, text)


def card_number_field(value: Any, path: str = "") -> str | None:
    """The dotted path of the first field in plain JSON data holding a PAN-like number, or None.

    Strings and integers are checked; values under a SKU key only when they are not GTINs.
    """
    if isinstance(value, Mapping):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if str(key) in SKU_KEYS:
                if _sku_values_hold_pan(item):
                    return where
                continue
            found = card_number_field(item, where)
            if found is not None:
                return found
        return None
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found = card_number_field(item, f"{path}.{i}" if path else str(i))
            if found is not None:
                return found
        return None
    if isinstance(value, bool):
        return None
    if isinstance(value, str | int) and find_pan(str(value)):
        return path or "value"
    return None


def _sku_values_hold_pan(value: Any) -> bool:
    items = value if isinstance(value, list | tuple) else [value]
    return any(sku_is_pan(str(v)) for v in items if isinstance(v, str | int))
