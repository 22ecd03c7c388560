"""A rejected request changes nothing: Redis and the database compared around every 4xx."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from sqlalchemy import select

from persistence.models import Base
from tests.api.conftest import Api
from tests.api.no5xx.asgi import Req, _cut
from tests.api.no5xx.checks import Findings
from tests.api.no5xx.live import Live, live_app
from tests.api.no5xx.schema import auth_kind, labels, operations
from tests.api.no5xx.strategies import (
    FUZZ,
    QUIET_EXAMPLES,
    bad_credentials,
    budget,
    case_request,
    good_credentials,
    junk_request,
    payment_event,
    steer,
    with_headers,
)
from tests.conftest import DATABASES

pytestmark = [pytest.mark.redis, pytest.mark.slow]

QUIET_ACCOUNTS = ("quiet-1", "quiet-2")
FLUSHER_TABLES = {"token_transactions", "token_balances"}  # written later by the flusher, not by a request
# Deliberate consequences of a refusal, not changes to what the account holds: the counter of
# failed promo-code attempts (the limiter against guessing codes), and the registration and
# failed-login counters (the limiters against mass sign-ups and password guessing).
COUNTED_REFUSALS = (":promofail:", ":reg:", ":{login:")


async def state_of(api: Api) -> dict[str, Any]:
    """Everything a request can change: every key under the prefix (a stream by its last id, as
    the flusher trims it) and every row of the tables requests write."""
    redis = api.state.rt.redis
    keys = sorted([k async for k in redis.scan_iter(match=f"{api.settings.key_prefix}:*", count=10_000)
                   if not any(part in str(k) for part in COUNTED_REFUSALS)])
    async with redis.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.type(key)
        kinds = [k.decode() if isinstance(k, bytes) else k for k in await pipe.execute()]
    read = {"hash": "hgetall", "string": "get", "stream": "xinfo_stream"}
    async with redis.pipeline(transaction=False) as pipe:
        for key, kind in zip(keys, kinds, strict=True):
            if kind == "zset":
                pipe.zrange(key, 0, -1, withscores=True)
            elif kind in read:
                getattr(pipe, read[kind])(key)
            else:
                pipe.type(key)
        values = await pipe.execute()
    out: dict[str, Any] = {key: value["last-generated-id"] if kind == "stream" else value
                           for key, kind, value in zip(keys, kinds, values, strict=True)}
    # The flusher makes each shard's (empty) stream with its consumer group on its own schedule.
    out = {key: value for key, value in out.items() if value not in ("0-0", b"0-0")}
    async with api.state.rt.db.engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            if table.name not in FLUSHER_TABLES:
                out[f"db:{table.name}"] = sorted(map(repr, (await conn.execute(select(table))).all()))
    return out


def _diff(before: dict[str, Any], after: dict[str, Any]) -> str:
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return "; ".join(f"{k}: {_cut(repr(before.get(k)), 150)} -> {_cut(repr(after.get(k)), 150)}" for k in changed[:5])


@st.composite
def quiet_request(draw: st.DrawFn, live: Live) -> tuple[str, Req | None]:
    known = live.known
    assert known is not None
    label = draw(st.sampled_from(labels("mutating")), label="operation")
    source = draw(st.sampled_from(["positive", "negative", "junk"]), label="source")
    if label in labels("payment_ops") and known.sign is not None and source != "junk":
        return label, draw(payment_event(label, known))
    if source == "junk":
        return label, _no_short_holds(draw(junk_request(label, known)))
    mode = GenerationMode.POSITIVE if source == "positive" else GenerationMode.NEGATIVE
    case = draw(operations()[label].as_strategy(mode))
    steer(case, draw, live)
    req = case_request(case)
    if req is not None and auth_kind(label) != "public":
        bad = draw(st.integers(0, 9)) == 0
        req = with_headers(req, draw(bad_credentials(label, known) if bad else good_credentials(label, known)))
    return label, None if req is None else _no_short_holds(req)


def _no_short_holds(req: Req) -> Req:
    """A hold that expires mid-run changes state by itself (its tokens go back), which would blur
    the check: holds made here last past the run."""
    try:
        body = json.loads(req.body)
    except (ValueError, RecursionError):
        return req
    ttl = body.get("ttl_ms") if isinstance(body, dict) else None
    if isinstance(ttl, int) and not isinstance(ttl, bool) and 0 < ttl < 600_000:
        body["ttl_ms"] = 600_000
        return Req(req.method, req.url, req.headers, json.dumps(body).encode())
    return req


@pytest.mark.parametrize("database", DATABASES)
def test_rejected_requests_change_nothing(request: pytest.FixtureRequest, tmp_path: Any, database: str) -> None:
    """Any 4xx (bad input, unknown ids, conflicts, refusals) leaves Redis and the database as they
    were. Mixed with accepted requests, so the rejections meet a state that has history."""
    findings = Findings()
    with live_app(request, tmp_path, QUIET_ACCOUNTS, database) as live:
        assert live.api is not None
        api = live.api

        @settings(FUZZ, max_examples=budget(QUIET_EXAMPLES, database))
        @given(drawn=quiet_request(live))
        def run(drawn: tuple[str, Req | None]) -> None:
            label, req = drawn
            if req is None:
                return
            before = live.run(state_of(api))
            reply = live.call(req)
            if findings.check(label, req, reply) is None and reply.status is not None and 400 <= reply.status < 500:
                after = live.run(state_of(api))
                if after != before:
                    findings.add(label, f"{reply.status} changed state: {_diff(before, after)}", req, reply)

        run()
    findings.assert_none()


# -- regressions: one narrow test per fault the fuzzing found ---------------------------------------
