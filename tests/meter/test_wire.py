"""The wire format (meter/_wire.py) against the Lua: the literal copies in lua/*.lua, read from
their text, and every script's reply and journal entries on fakeredis and the real Redis.
Plus the older forms still in a stream during an upgrade: the 9-field 'st', the expiry note."""

from __future__ import annotations

import re
from typing import Any

import pytest

from meter import JournalEntry, Meter
from meter import _wire as wire
from meter import keys as keyspace
from meter._scripts import lua_dir
from tests.conftest import MeterFactory

pytestmark = pytest.mark.redis


def _lua(name: str) -> str:
    return lua_dir().joinpath(name).read_text("utf-8")


def _strings(text: str) -> list[str]:
    return re.findall(r"'([^']*)'", text)


def test_lua_account_fields_are_the_modules() -> None:
    lib = _lua("_wallet.lua")
    fields = re.search(r"local FIELDS = \{(.*?)\}", lib, re.S)
    text = re.search(r"local TEXT = \{(.*?)\}", lib, re.S)
    assert fields and text
    assert tuple(_strings(fields.group(1))) == wire.ACCOUNT_FIELDS
    assert set(re.findall(r"(\w+) = true", text.group(1))) == wire.TEXT_FIELDS


def test_lua_hot_and_cold_fields_split_the_account_and_load_in_order() -> None:
    """Every call reads HOT (one HMGET, one constructor); COLD is read by load_cold. Together
    they are the account's fields, and each v[i] is read into the field of its position."""
    lib = _lua("_wallet.lua")
    hot = re.search(r"local HOT = \{(.*?)\}", lib, re.S)
    cold = re.search(r"local COLD = \{(.*?)\}", lib, re.S)
    assert hot and cold
    hot_f, cold_f = _strings(hot.group(1)), _strings(cold.group(1))
    assert sorted(hot_f + cold_f) == sorted(wire.ACCOUNT_FIELDS) and not set(hot_f) & set(cold_f)
    load = re.search(r"local function load_account\(\)(.*?)\nend\n", lib, re.S)
    assert load
    read = dict(re.findall(r"(\w+) = (?:num\()?v\[(\d+)\]", load.group(1)))
    assert {f: int(i) for f, i in read.items()} == {f: i + 1 for i, f in enumerate(hot_f)}
    cold_load = re.search(r"a\.allow, a\.rpct, a\.created, a\.np, a\.mg = (.*?)\n", lib)
    assert cold_load
    assert re.findall(r"v\[(\d+)\]", cold_load.group(1)) == [str(i + 1) for i in range(len(cold_f))]
    assert re.findall(r"a\.(\w+)", "a.allow, a.rpct, a.created, a.np, a.mg") == cold_f


def test_lua_state_field_order_is_the_modules() -> None:
    body = re.search(r"'st', (.*?)\}", _lua("_wallet.lua"), re.S)
    assert body
    assert tuple(re.findall(r"a\.(\w+)", body.group(1))) == wire.STATE_FIELDS


def test_lua_plan_spec_order_is_the_modules() -> None:
    body = re.search(r"local function apply_plan\(a, spec\)(.*?)touch\(a, (.*?)\)", _lua("_wallet.lua"), re.S)
    assert body
    assert tuple(re.findall(r"a\.(\w+)", body.group(1))) == wire.PLAN_SPEC_FIELDS
    assert tuple(_strings(body.group(2))) == wire.PLAN_SPEC_FIELDS
    assert wire.parse_plan_spec("pro:5:0:60:8192:25") == (
        "pro", {"allow": 5, "dcap": 0, "rpm": 60, "maxreq": 8192, "rpct": 25})
    assert (wire.pending_plan_id("free:1:2:3:4:5"), wire.pending_plan_id("")) == ("free", "")


def test_lua_reply_hold_record_and_ttl_are_the_modules() -> None:
    lib = _lua("_wallet.lua")
    reply = re.search(r"local function reply\(a, code, id, retry, x1, x2\)\n  return \{(.*?)\}\n", lib)
    assert reply
    assert len(reply.group(1).split(", ")) == len(wire.REPLY_SLOTS)
    assert f"out[{wire.REPLAYED + 1}] = 1" in lib  # replay marks the 'replayed' slot (Lua is 1-based)
    hold = re.search(r"return \{(tokens = v\[1\].*?)\}", lib)
    assert hold
    assert tuple(re.findall(r"(\w+) = v\[(\d+)\]", hold.group(1))) == tuple(
        (f, str(i + 1)) for i, f in enumerate(wire.HOLD_FIELDS))
    ttl = re.search(r"local IDEM_TTL_S = (\d+)", lib)
    assert ttl and int(ttl.group(1)) == wire.IDEMPOTENCY_TTL_S


def _calls(text: str, name: str) -> list[str]:
    """The argument text of every call of `name` in Lua source (balanced parentheses)."""
    out = []
    for m in re.finditer(rf"\b{name}\(", text):
        depth, i = 1, m.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        out.append(text[m.end():i - 1])
    return out


def test_every_journal_field_the_lua_writes_is_named() -> None:
    """Each key the scripts put into an entry (journal()/close_hold() extras, appended fields)
    is one of the module's journal fields."""
    spelled: set[str] = set()
    for f in lua_dir().iterdir():
        if not f.name.endswith(".lua"):
            continue
        text = re.sub(r"--[^\n]*", "", f.read_text("utf-8"))
        for args in _calls(text, "journal") + _calls(text, "close_hold"):
            spelled.update(re.findall(r"(?:\{|,\s*)'([a-z]{2})',", args))
        spelled.update(re.findall(r"\[#\w+ \+ 1\] = '([a-z]{2})'", text))
        spelled.update(re.findall(r"\{'(t)', kind, '(a)', ACCOUNT,", text)[0] if "'t', kind" in text else ())
    assert {"ag", "mo", "in", "ou", "pj", "hl", "nt", "rf", "hx", "rq", "ik", "t", "a"} <= spelled
    assert spelled <= set(wire.JOURNAL_FIELDS), spelled - set(wire.JOURNAL_FIELDS)


async def _record_replies(meter: Meter) -> list[tuple[str, list[Any]]]:
    seen: list[tuple[str, list[Any]]] = []
    call = meter.store.call

    async def recording(op: str, keys: Any, argv: Any) -> list[Any]:
        reply = await call(op, keys, argv)
        seen.append((op, list(reply)))
        return reply

    meter.store.call = recording  # type: ignore[method-assign]
    return seen


async def test_every_script_reply_decodes_through_the_slot_names(lua_backend: str,
                                                                 make_meter: MeterFactory) -> None:
    meter = await make_meter(lua_backend)
    seen = await _record_replies(meter)
    await meter.open_account("w1")
    d = await meter.debit("w1", 100, agent="code", model="sonnet", input_tokens=40, output_tokens=60,
                          project_id="p1", request_id="rq-1")
    again = await meter.debit("w1", 100, agent="code", model="sonnet", input_tokens=40, output_tokens=60,
                              project_id="p1", request_id="rq-1")
    h = await meter.reserve("w1", 500, ttl_ms=30_000, model="haiku")
    assert h.hold_id and h.expires_at_ms
    s = await meter.settle("w1", h.hold_id, 700, model="haiku")
    h2 = await meter.reserve("w1", 50)
    assert h2.hold_id
    await meter.release("w1", h2.hold_id)
    await meter.credit("w1", 1_000, bucket="premium", kind="purchase", note="n", reference="ref")
    await meter.adjust("w1", 10, bucket="premium", kind="refund", reference="ref")
    await meter.set_plan("w1", "pro", note="upgrade")
    u = await meter.record_usage("w1", 30, model="gpt-4o-mini", input_tokens=10, output_tokens=20)
    bal = await meter.balance("w1")
    await meter.sweep_account("w1")

    mutating = [(op, r) for op, r in seen if op not in ("balance", "sweep")]
    assert [op for op, _ in mutating] == ["open", "debit", "debit", "reserve", "settle", "reserve", "release",
                                          "credit", "adjust", "plan", "usage"]
    decoded = {i: wire.decode_reply(r) for i, (_, r) in enumerate(mutating)}
    assert all(r.code == "ok" for r in decoded.values())
    debit, replay, reserve, settle = decoded[1], decoded[2], decoded[3], decoded[4]
    assert (debit.id, debit.x1, debit.available, debit.replayed) == (d.transaction_id.split(":")[1], 100,
                                                                      d.remaining, False)
    assert replay.replayed and replay._replace(replayed=False) == debit and again.replayed
    assert (reserve.id, reserve.x1, reserve.x2, reserve.held) == (h.hold_id, 500, h.expires_at_ms, 500)
    assert (settle.x1, settle.x2, settle.held) == (s.charged, s.uncollected, 0) == (700, 0, 0)
    assert decoded[10].requests_today == bal.requests_today and decoded[10].daily_limit >= 0
    usage = decoded[10]
    assert (usage.x1, usage.x2, usage.id) == (u.charged, u.uncollected, u.transaction_id.split(":")[1])
    assert (u.charged, u.uncollected) == (30, 0)
    balance_reply = next(r for op, r in seen if op == "balance")
    assert tuple(balance_reply[1::2]) == wire.ACCOUNT_FIELDS
    assert next(r for op, r in seen if op == "sweep")[0] == "ok"

    # the hold record in Redis, and the journal entries, through the module
    redis = meter.store.redis  # type: ignore[attr-defined]
    k = keyspace.account_keys("w1", shards=meter.shards, prefix=meter.prefix)
    await meter.reserve("w1", 20, ttl_ms=5_000)
    (raw_hold,) = (await redis.hgetall(k.holds)).values()
    held = wire.Hold.parse(raw_hold)
    assert (held.tokens, held.exp, held.encode()) == (20, meter.clock.now_ms() + 5_000, raw_hold)
    entries = [f for _, f in await redis.xrange(k.journal) if f["a"] == "w1"]
    assert entries and all(set(f) <= set(wire.JOURNAL_FIELDS) for f in entries)
    assert all(len(f["st"].split(":")) == len(wire.STATE_FIELDS) for f in entries)
    hold_entry = next(f for f in entries if f["t"] == "hold")
    assert hold_entry["hx"] == str(h.expires_at_ms) and "nt" not in hold_entry  # the expiry has its own field
    assert JournalEntry.from_fields(hold_entry).hold_expires_ms == h.expires_at_ms


def test_entries_written_before_the_daily_counters_and_hx_still_parse() -> None:
    new = {"t": "hold", "a": "x", "n": "7:1000:0:-500:0:0:500", "st": "free:3:0:9500:0:0:500:0:2:20:2:0",
           "hx": "31000"}
    old = {"t": "hold", "a": "x", "n": "7:1000:0:-500:0:0:500", "st": "free:3:0:9500:0:0:500:0:2",
           "nt": "expires 31000"}
    e_new, e_old = JournalEntry.from_fields(new), JournalEntry.from_fields(old)
    assert (e_new.day, e_new.requests_today, e_new.hold_expires_ms) == (20, 2, 31000)
    assert (e_old.day, e_old.requests_today, e_old.tokens_used_today, e_old.hold_expires_ms) == (0, 0, 0, 31000)
    assert e_old.available_after == e_new.available_after == 9500
    assert wire.parse_state(old["st"]) == wire.parse_state(new["st"])._replace(day=0, rq=0, ut=0)
    assert wire.hold_expiry(None, "a note") is None and wire.hold_expiry(None, None) is None
    for bad in ("free:3:0:9500", "free:3:0:9500:0:0:500:0:2:20", "free:3:0:x:0:0:500:0:2"):
        with pytest.raises(ValueError):
            wire.parse_state(bad)
    with pytest.raises(ValueError):
        wire.decode_reply(["ok", "1"])
