"""The load/verify rules (lua/wallet_load.lua, wallet_open.lua's probe, the verified-set gate)
stated twice agree: the same Redis-loss story over the reference model and over Lua (in-process
and the real Redis) gives the same replies and the same journal, entry for entry."""

from __future__ import annotations

from typing import Any

import pytest

from meter import FakeClock, Meter, ReferenceStore
from meter import keys as keyspace
from tests.conftest import LUA_BACKENDS, MeterFactory, journal_of
from tests.reliability._redis_loss import forget_verified


class Ledger:
    """A loader over snapshots taken from the meter itself (what the database would hold)."""

    def __init__(self) -> None:
        self.snapshots: dict[str, dict[str, str | int]] = {}

    async def __call__(self, account_id: str) -> dict[str, str | int] | None:
        return self.snapshots.get(account_id)


async def _get_idem(meter: Meter, key: str) -> str | None:
    if isinstance(meter.store, ReferenceStore):
        return meter.store.idempotency.get(key)
    return await meter.store.redis.get(key)  # type: ignore[attr-defined, no-any-return]


async def _redis_restarts_behind(meter: Meter, account_id: str, older: dict[str, str], lost_idem: str) -> None:
    """Redis comes back without its last writes: the account as `older`, the verified set empty,
    the idempotency record of a lost call gone."""
    k = meter._account_keys(account_id)
    live = keyspace.live_key(keyspace.shard_of(account_id, meter.shards), meter.prefix)
    if isinstance(meter.store, ReferenceStore):
        meter.store.live.clear()
        meter.store.accounts[k.account] = {f: v if f in ("plan", "np") else int(v) for f, v in older.items()}
        meter.store.idempotency.pop(lost_idem)
        return
    redis = meter.store.redis  # type: ignore[attr-defined]
    await forget_verified(redis, live)
    await redis.delete(k.account, lost_idem)
    await redis.hset(k.account, mapping=older)


async def _story(meter: Meter, ledger: Ledger) -> list[Any]:
    out: list[Any] = [await meter.open_account("x", "basic")]  # unknown to the ledger: created
    out += [await meter.debit("x", 100 + i, request_id=f"r{i}") for i in range(3)]
    older = await meter.snapshot("x")
    out += [await meter.debit("x", 50, request_id="r-lost"), await meter.reserve("x", 70, ttl_ms=60_000)]
    newest = await meter.snapshot("x")
    idem_key = keyspace.idempotency_key("x", "r-lost", shards=meter.shards, prefix=meter.prefix)
    record = await _get_idem(meter, idem_key)
    assert record
    hold = out[-1].hold_id
    ledger.snapshots["x"] = {**newest, f"hold:{hold}": f"70:0:70:0:0:{newest['per']}:{out[-1].expires_at_ms}",
                             "idem:r-lost": f"3600:{record}"}
    await _redis_restarts_behind(meter, "x", older, idem_key)
    out.append(await meter.open_account("x", "basic"))  # exists: not opened again, not verified by it
    out.append(await meter.debit("x", 1, request_id="r-after"))  # verify: loaded over, then charged
    out.append(await meter.debit("x", 50, request_id="r-lost"))  # the lost call's answer is back
    out.append(await meter.settle("x", hold, 20))
    out.append(await meter.balance("x"))
    return out


@pytest.mark.parametrize("lua", LUA_BACKENDS)
async def test_load_and_verify_agree_between_reference_and_lua(make_meter: MeterFactory, clock: FakeClock,
                                                               lua: str) -> None:
    ref_ledger, lua_ledger = Ledger(), Ledger()
    ref = await make_meter("reference", loader=ref_ledger)
    other = await make_meter(lua, loader=lua_ledger)
    ref_out = await _story(ref, ref_ledger)
    lua_out = await _story(other, lua_ledger)
    assert ref_out == lua_out
    assert ref_out[7].transaction_id == "x:8"  # 5 entries, the hold (6), the repair entry (7): then 8
    assert ref_out[8].replayed and ref_out[8].transaction_id == ref_out[4].transaction_id
    assert await journal_of(ref, "x") == await journal_of(other, "x")
    repair = (await journal_of(ref, "x"))[6]
    assert (repair.kind, repair.delta, repair.note) == ("adjustment", 0,
                                                        "redis lost entries 5-6; state loaded from the ledger")
