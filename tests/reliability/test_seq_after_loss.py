"""Finding 4: after Redis loses its last writes (`everysec` + a host crash), no transaction id
is reused and every acknowledged debit reaches the ledger. A private redis-server with
`appendfsync always`: debits, a flush, the AOF's size recorded; more debits, flushed to the
ledger; SIGKILL, the AOF cut back to the recorded size (the lost second), restart; more debits.
Judged by the books: one ledger row per acknowledged debit under the id its caller was given,
no dead letter, balances equal to the acknowledged charges, reconcile clean."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
from redis.asyncio import Redis

from meter import FakeClock, Meter, StoreUnavailable
from persistence.reconcile import reconcile
from tests.reliability._redis_loss import dead_letters, flusher, ledger_rows, loss_meter, private_redis_server

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

ACCOUNTS = ("a1", "a2", "a3")


async def _debit(meter: Meter, account: str, tokens: int, request_id: str) -> Any:
    for _ in range(100):  # Redis is coming back: bounded retries
        try:
            return await meter.debit(account, tokens, request_id=request_id)
        except StoreUnavailable:
            await asyncio.sleep(0.05)
    raise AssertionError("redis did not come back")


async def _rewrite_aof(server: Any) -> None:
    """BGREWRITEAOF, done: the verified sets are now in the AOF's base file (an RDB preamble)."""
    redis = Redis.from_url(server.url, decode_responses=True)
    try:
        await redis.bgrewriteaof()
        for _ in range(200):
            info = await redis.info("persistence")
            if not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]:
                try:
                    server.incr_aof()  # exactly one incremental file: the old ones are cleaned up
                    return
                except ValueError:
                    pass
            await asyncio.sleep(0.05)
        raise AssertionError("the AOF rewrite did not finish")
    finally:
        await redis.aclose()


@pytest.mark.parametrize("rewritten", [False, True], ids=["aof", "aof-rewritten"])
async def test_aof_tail_loss_reuses_no_id_and_loses_no_acknowledged_debit(tmp_path: Any, database: Any,
                                                                         clock: FakeClock, rewritten: bool) -> None:
    """`rewritten`: an AOF rewrite ran after every account was verified, so the restarted Redis
    loads the verified sets too; they belong to the old server process and must not count."""
    async with private_redis_server(str(tmp_path)) as server:
        meter = await loss_meter(server.url, database, clock)
        try:
            acked: dict[str, tuple[str, int, str]] = {}  # request id -> (account, tokens, transaction id)

            async def debits(phase: str, n: int) -> None:
                for i in range(n):
                    for k, account in enumerate(ACCOUNTS):
                        rid = f"{phase}-{account}-{i}"
                        d = await _debit(meter, account, 100 + 10 * k + i, rid)
                        assert d.allowed and not d.replayed
                        acked[rid] = (account, 100 + 10 * k + i, str(d.transaction_id))

            for account in ACCOUNTS:
                assert await meter.open_account(account, "pro")
            await debits("kept", 10)
            await flusher(meter, database).drain()
            if rewritten:
                await _rewrite_aof(server)
            cut = os.path.getsize(server.incr_aof())  # Redis will come back as of here
            await debits("lost", 15)  # acknowledged, flushed, then lost by Redis
            await flusher(meter, database).drain()
            ledger_top = {a: (await ledger_rows(database, a))[-1].seq for a in ACCOUNTS}
            assert ledger_top == {a: 26 for a in ACCOUNTS}

            server.kill()
            with open(server.incr_aof(), "r+b") as aof:
                aof.truncate(cut)
            server.start()
            fresh = Redis.from_url(server.url, decode_responses=True)
            assert int(await fresh.hget(meter._account_keys("a1").account, "seq")) == 11  # behind the ledger

            await debits("after", 10)
            retry = await _debit(meter, "a2", 100 + 10 + 3, "lost-a2-3")  # its stored answer was lost too
            await flusher(meter, database, fresh).drain()
            await fresh.aclose()

            assert await dead_letters(meter) == 0  # no entry refused as a reused id (a fork)
            assert retry.replayed and retry.transaction_id == acked["lost-a2-3"][2]
            for account in ACCOUNTS:
                rows = await ledger_rows(database, account)
                assert [r.seq for r in rows] == list(range(1, len(rows) + 1))
                by_request = [r.request_id for r in rows if r.transaction_type == "usage"]
                assert len(by_request) == len(set(by_request)) == 35  # no duplicate, none missing
                after = {r.transaction_id for r in rows if (r.request_id or "").startswith("after-")}
                assert min(int(t.split(":")[1]) for t in after) > ledger_top[account]  # past the ledger
                charged = sum(t for a, t, _ in acked.values() if a == account)
                assert sum(r.tokens_changed + r.held_changed for r in rows) == 250_000 - charged
                assert (await meter.balance(account)).remaining_tokens == 250_000 - charged
                stored = {r.request_id: (r.transaction_id, -r.tokens_changed) for r in rows if r.request_id}
                for rid, (a, tokens, tid) in acked.items():
                    if a == account:
                        assert stored[rid] == (tid, tokens), rid  # the id its caller was given
            checks = await reconcile(meter.store.redis, database, shards=meter.shards,  # type: ignore[attr-defined]
                                     prefix=meter.prefix)
            assert {c.account_id: c.status for c in checks} == dict.fromkeys(ACCOUNTS, "ok")
        finally:
            await meter.close()
