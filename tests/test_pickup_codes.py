"""Pickup codes: format, salted scrypt hashes, constant-time matching, keypad lockout rules."""

from __future__ import annotations

import pytest

from gateway import pickup_codes as codes

FAST = codes.ScryptParams(n=2**8, r=8, p=1)  # the real cost is measured in the module docstring


def test_codes_are_six_random_digits() -> None:
    drawn = [codes.new_code() for _ in range(300)]
    assert all(len(c) == 6 and c.isdigit() and codes.well_formed(c) for c in drawn)
    assert len(set(drawn)) > 290  # 300 draws from a million rarely collide
    assert {c[0] for c in drawn} >= {"0", "1", "9"}  # leading zeros kept


def test_hash_is_salted_and_verifies_only_its_code() -> None:
    first = codes.hash_code("482913", FAST)
    second = codes.hash_code("482913", FAST)
    assert first.salt != second.salt and first.digest != second.digest
    assert codes.verify_code("482913", first) and codes.verify_code("482913", second)
    assert not codes.verify_code("482914", first)
    assert not codes.verify_code("48291", first)
    assert not codes.verify_code("４８２９１３", first)  # non-ASCII digits are not digits here
    text = first.encode()
    assert "482913" not in text and text.startswith("scrypt$256$8$1$")
    assert codes.CodeHash.decode(text) == first
    with pytest.raises(ValueError, match="scrypt"):
        codes.CodeHash.decode("md5$abc")


def test_default_params_are_the_measured_ones() -> None:
    stored = codes.hash_code("000001")
    assert (stored.params.n, stored.params.r, stored.params.p) == (4096, 8, 1)
    assert codes.verify_code("000001", stored)


def test_matching_checks_every_candidate_and_unique_code_avoids_taken() -> None:
    hashes = {key: codes.hash_code(code, FAST) for key, code in (("a", "111111"), ("b", "222222"))}
    assert codes.matching("222222", hashes.items()) == ["b"]
    assert codes.matching("333333", hashes.items()) == []
    code, stored = codes.unique_code(list(hashes.values()), FAST)
    assert code not in {"111111", "222222"} and codes.verify_code(code, stored)


def test_lockout_on_the_limit_and_only_within_the_window() -> None:
    rules = codes.LockoutRules(limit=5, window_s=600, lockout_s=300)
    state = codes.CLEAR
    for i in range(4):
        state, locked = state.after_failure(rules, 1000.0 + i)
        assert not locked and state.retry_after_s(1000.0 + i) is None
    state, locked = state.after_failure(rules, 1010.0)  # the 5th wrong code locks
    assert locked and state.failures == ()
    assert state.retry_after_s(1010.0) == 300
    assert state.retry_after_s(1309.2) == 1
    assert state.retry_after_s(1310.0) is None
    # failures older than the window no longer count
    state = codes.CLEAR
    for t in (0.0, 1.0, 2.0, 3.0):
        state, _ = state.after_failure(rules, t)
    state, locked = state.after_failure(rules, 602.5)
    assert not locked and state.failures == (3.0, 602.5)


def test_keypad_state_round_trips_through_its_row() -> None:
    state = codes.KeypadState((1.5, 2.25), 99.0)
    _sql, params = codes.save_statement("A", state)
    assert codes.load_state(params[1], params[2]) == state
