"""Structured logging: structlog as a pipeline, JSON lines off a TTY, console on one."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from gateway.carddata import SKU_KEYS, mask_pan, sku_is_pan

_SECRET_FIELDS = frozenset({"password", "secret", "token", "code", "pickup_code", "pan", "key"})


def _redact_secrets(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Never let a secret-named field reach a log line."""
    for key in _SECRET_FIELDS.intersection(event):
        event[key] = "***"
    return event


def _mask_card_numbers(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Mask any PAN-like number in a text value (after exceptions are rendered to text).

    The edges refuse card numbers; this is the second line for text that reaches a log anyway
    (a malformed cloud message quoted in a warning, an exception quoting its input).
    """
    for key, value in event.items():
        text = value
        if isinstance(value, int) and not isinstance(value, bool) and value >= 10**12:
            text = str(value)  # an amount field holding a card number
        if not isinstance(text, str) or (key in SKU_KEYS and not sku_is_pan(text)):
            continue
        masked = mask_pan(text)
        if masked != text:
            event[key] = masked
    return event


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Configure structlog once for the process (idempotent)."""
    out = stream or sys.stdout
    json_lines = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_lines
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact_secrets,
            structlog.processors.format_exc_info,
            _mask_card_numbers,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
