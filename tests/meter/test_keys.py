"""Key layout: every key of an account hashes to one Redis Cluster slot."""

from __future__ import annotations

import re

import pytest

from meter import keys

pytestmark = pytest.mark.unit


def crc16_xmodem(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def cluster_slot(key: str) -> int:
    """Redis Cluster's slot: CRC16 of the hash tag (first non-empty {...}) mod 16384."""
    m = re.search(r"\{([^}]+)\}", key)
    return crc16_xmodem((m.group(1) if m else key).encode()) % 16384


def test_crc16_reference_value() -> None:
    assert crc16_xmodem(b"123456789") == 0x31C3  # the check value Redis Cluster's spec gives


@pytest.mark.parametrize("account", ["u1", "user@example.com", "org:42.team-7_x", "z" * 128])
def test_all_keys_of_an_account_share_one_slot(account: str) -> None:
    k = keys.account_keys(account, "req-1")
    shard = keys.shard_of(account)
    slots = {cluster_slot(x) for x in (*k, keys.journal_key(shard), keys.sweep_key(shard))}
    assert len(slots) == 1
    assert k.journal == keys.journal_key(shard) and k.sweep == keys.sweep_key(shard)


def test_shards_spread_over_many_slots() -> None:
    slots = {cluster_slot(keys.journal_key(s)) for s in range(keys.DEFAULT_SHARDS)}
    assert len(slots) == keys.DEFAULT_SHARDS
    used = {keys.shard_of(f"user-{i}") for i in range(10_000)}
    assert used == set(range(keys.DEFAULT_SHARDS))


def test_only_meter_keys_spells_a_key() -> None:
    """No other module of the meter or persistence builds a key from the prefix (the flusher's
    dead-letter stream was the last: keys.dead_letter_key)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    spelled = re.compile(r"""f["'][^"']*\{(?:self\.)?prefix\}:|\{keyspace\.shard_tag\(|":a:""")
    offenders = [str(p.relative_to(root)) for d in ("meter", "persistence") for p in (root / d).rglob("*.py")
                 if p.name != "keys.py" and spelled.search(p.read_text("utf-8"))]
    assert offenders == []
    assert keys.dead_letter_key("tmx") == "tmx:deadletter" and keys.dead_letter_key() == "tm:deadletter"


@pytest.mark.parametrize("account", ["u1", "org:42:a:x", "z" * 128])
def test_account_of_key_inverts_account_keys(account: str) -> None:
    key = keys.account_keys(account, prefix="tmx").account
    assert keys.account_of_key(key) == account
    pattern = keys.account_key_pattern(keys.shard_of(account), "tmx")
    assert re.fullmatch(re.escape(pattern[:-1]) + ".*", key)
