"""docs/api/ holds the schemas the running gateway validates with; never stale."""

from __future__ import annotations

import json

from gateway.apischema import DOCS, generate


def test_published_api_schemas_are_current() -> None:
    for name, text in generate().items():
        path = DOCS / name
        assert path.exists(), f"docs/api/{name} missing; run: python -m gateway.apischema --write"
        assert path.read_text() == text, (
            f"docs/api/{name} is stale; run: python -m gateway.apischema --write"
        )


def test_every_route_and_command_is_documented() -> None:
    docs = {name: json.loads(text) for name, text in generate().items()}
    store = docs["store-api.schema.json"]["topics"]
    assert {"store/v1/pos/{terminal}/sale", "store/v1/pos/{terminal}/payment/request"} <= set(store)
    sale = store["store/v1/pos/{terminal}/sale"]["schema"]
    assert {"sale_id", "lines", "total_minor", "currency", "payments"} <= set(sale["properties"])
    commands = docs["cloud-commands.schema.json"]["topics"]
    assert "retail/v1/{store}/commands/events.replay" in commands
