"""Pickup codes and the keypad lockout (cloud-api.md, order lifecycle).

A code is six random digits from :mod:`secrets`; the gateway keeps only a salted scrypt hash of it,
compares in constant time and forgets the hash once the code has been used. The code itself
is never stored or logged: it leaves the store once, in the ``order.updated in_locker`` event.

Hash cost: scrypt n=2**12, r=8, p=1 (4 MiB of memory) measured 23 ms per hash on one x86 server
vCPU (n=2**14 took 75 ms); a Raspberry Pi 4 core is two to three times slower. A code entered
at a kiosk is checked against every parcel at that bank (the code is the only key), so the
cost grows with the bank's occupied compartments; callers run it off the event loop.

Lockout: ``limit`` wrong codes at one bank within ``window_s`` lock its keypad for
``lockout_s``; the wrong code that reaches the limit is still answered ``invalid_code``, every
attempt during the lockout ``locked_out``. A successful pickup clears the bank's count. The
state is persisted (wall-clock times) so a restart does not lift a lockout.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from gateway.db import Statement

CODE_DIGITS = 6
_CODE_RE = re.compile(r"[0-9]{6}")
_SALT_BYTES = 16
_DIGEST_BYTES = 32

K = TypeVar("K")


@dataclass(frozen=True, slots=True)
class ScryptParams:
    """scrypt cost parameters (stored with every hash so they can change later)."""

    n: int = 2**12
    r: int = 8
    p: int = 1


DEFAULT_PARAMS = ScryptParams()


@dataclass(frozen=True, slots=True)
class CodeHash:
    """A salted scrypt hash of one pickup code."""

    params: ScryptParams
    salt: bytes
    digest: bytes

    def encode(self) -> str:
        """The text form stored in the database: ``scrypt$n$r$p$salt$digest`` (hex)."""
        p = self.params
        return f"scrypt${p.n}${p.r}${p.p}${self.salt.hex()}${self.digest.hex()}"

    @classmethod
    def decode(cls, text: str) -> CodeHash:
        """Parse :meth:`encode`'s form; ValueError when malformed."""
        parts = text.split("$")
        if len(parts) != 6 or parts[0] != "scrypt":
            raise ValueError("not a scrypt code hash")
        n, r, p = (int(x) for x in parts[1:4])
        return cls(ScryptParams(n, r, p), bytes.fromhex(parts[4]), bytes.fromhex(parts[5]))


def well_formed(code: str) -> bool:
    """True for exactly six ASCII digits."""
    return bool(_CODE_RE.fullmatch(code))


def new_code() -> str:
    """A fresh uniformly random six-digit code."""
    return f"{secrets.randbelow(10**CODE_DIGITS):0{CODE_DIGITS}d}"


def _derive(code: str, salt: bytes, params: ScryptParams) -> bytes:
    return hashlib.scrypt(
        code.encode("ascii"),
        salt=salt,
        n=params.n,
        r=params.r,
        p=params.p,
        maxmem=256 * params.n * params.r + (1 << 20),
        dklen=_DIGEST_BYTES,
    )


def hash_code(code: str, params: ScryptParams = DEFAULT_PARAMS) -> CodeHash:
    """Hash a code with a fresh random salt (blocking: call off the event loop)."""
    salt = secrets.token_bytes(_SALT_BYTES)
    return CodeHash(params, salt, _derive(code, salt, params))


def verify_code(code: str, stored: CodeHash) -> bool:
    """True when ``code`` hashes to ``stored`` (constant-time compare; blocking)."""
    if not well_formed(code):
        return False
    return hmac.compare_digest(_derive(code, stored.salt, stored.params), stored.digest)


def matching(code: str, candidates: Iterable[tuple[K, CodeHash]]) -> list[K]:
    """The keys whose hash matches ``code``; every candidate is checked (no early exit)."""
    return [key for key, stored in candidates if verify_code(code, stored)]


def unique_code(
    taken: Sequence[CodeHash], params: ScryptParams = DEFAULT_PARAMS
) -> tuple[str, CodeHash]:
    """A new code matching none of ``taken`` (codes at one bank must differ), with its hash."""
    while True:
        code = new_code()
        if not any(verify_code(code, stored) for stored in taken):
            return code, hash_code(code, params)


# --- keypad lockout ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LockoutRules:
    """How many wrong codes within which window lock a bank's keypad, and for how long."""

    limit: int = 5
    window_s: float = 600.0
    lockout_s: float = 300.0


@dataclass(frozen=True, slots=True)
class KeypadState:
    """One bank's wrong-code record: times (wall clock) of recent failures, lock end."""

    failures: tuple[float, ...] = ()
    locked_until: float = 0.0

    def retry_after_s(self, now: float) -> int | None:
        """Whole seconds until the keypad unlocks (at least 1), or None when not locked."""
        if now >= self.locked_until:
            return None
        return max(1, math.ceil(self.locked_until - now))

    def after_failure(self, rules: LockoutRules, now: float) -> tuple[KeypadState, bool]:
        """The state after one more wrong code, and whether this one started a lockout."""
        recent = (*(t for t in self.failures if now - t < rules.window_s), now)
        if len(recent) >= rules.limit:
            return KeypadState((), now + rules.lockout_s), True
        return KeypadState(recent, self.locked_until), False

    def to_json(self) -> str:
        """Compact JSON of the failure times (for the keypad table)."""
        return json.dumps(list(self.failures))


CLEAR = KeypadState()


def save_statement(bank: str, state: KeypadState) -> Statement:
    """The statement that persists ``state`` for ``bank``."""
    return (
        "INSERT OR REPLACE INTO locker_keypads(bank, failures, locked_until) VALUES (?, ?, ?)",
        (bank, state.to_json(), state.locked_until),
    )


def load_state(failures_json: str, locked_until: float) -> KeypadState:
    """A keypad state from its table row."""
    return KeypadState(tuple(float(t) for t in json.loads(failures_json)), float(locked_until))
