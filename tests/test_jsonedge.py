"""The one JSON parser at the edges: every failure is BadJson."""

from __future__ import annotations

import pytest

from gateway.jsonedge import BadJson, parse_json


@pytest.mark.parametrize(
    "payload", [b"[" * 100_000, b"{" * 50_000, b'{"a":' * 60_000, b"\xff\xfe", b"", b"{"]
)
def test_every_failure_is_bad_json(payload: bytes) -> None:
    with pytest.raises(BadJson, match="not JSON"):
        parse_json(payload)


def test_valid_json_passes() -> None:
    assert parse_json(b'{"x": [1, 2]}') == {"x": [1, 2]}
    assert parse_json("[" * 50 + "]" * 50) is not None
