"""Ed25519 command signatures over canonical JSON (cloud-api.md, Signature)."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


def canonical_json(envelope: Mapping[str, Any]) -> bytes:
    """The signed bytes: the envelope without ``sig``, keys sorted, no whitespace, raw UTF-8."""
    body = {k: v for k, v in envelope.items() if k != "sig"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class Verifier:
    """Checks a signature against any of the configured public keys (several for rotation)."""

    def __init__(self, keys_b64: Iterable[str]) -> None:
        self._keys = [Ed25519PublicKey.from_public_bytes(base64.b64decode(k)) for k in keys_b64]

    @property
    def has_keys(self) -> bool:
        """True when at least one key is configured."""
        return bool(self._keys)

    def verify(self, envelope: Mapping[str, Any]) -> bool:
        """True when ``envelope['sig']`` is a valid signature by any key."""
        sig_b64 = envelope.get("sig")
        if not isinstance(sig_b64, str):
            return False
        try:
            sig = base64.b64decode(sig_b64, validate=True)
        except (binascii.Error, ValueError):
            return False
        if len(sig) != 64:
            return False
        message = canonical_json(envelope)
        for key in self._keys:
            try:
                key.verify(sig, message)
            except InvalidSignature:
                continue
            return True
        return False


def sign(envelope: Mapping[str, Any], private_key: Ed25519PrivateKey) -> str:
    """Base64 signature of an envelope (for the demo backend and tests)."""
    return base64.b64encode(private_key.sign(canonical_json(envelope))).decode()


def public_key_b64(private_key: Ed25519PrivateKey) -> str:
    """The config form of a key's public half: base64 of the raw 32 bytes."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    raw = private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return base64.b64encode(raw).decode()
