"""JSON at the edges: every way a payload can fail to parse becomes one typed error."""

from __future__ import annotations

import json
from typing import Any


class BadJson(ValueError):
    """The payload is not UTF-8 JSON (or nests too deep to parse)."""


def parse_json(payload: bytes | str) -> Any:
    """Parse inbound JSON; BadJson for invalid UTF-8, invalid JSON or pathological nesting."""
    try:
        return json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadJson(f"not JSON: {err}") from err
    except RecursionError as err:  # json.loads raises this, not JSONDecodeError, for "[[[[…"
        raise BadJson("not JSON: nested too deeply") from err
