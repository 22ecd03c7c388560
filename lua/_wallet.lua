-- _wallet.lua: the wallet library. The script registry prepends this file to every account
-- script (open/debit/credit/reserve/settle/release/balance/sweep), so the semantics live here once.
--
-- KEYS (every account script, same order; all carry the shard's hash tag, so one slot):
--   1 account hash   2 holds hash   3 hold-expiry zset   4 shard sweep zset
--   5 shard journal stream          6 idempotency key (request id; unused when ARGV[5] == '')
--   7 (optional) the name of the shard's set of accounts verified against the ledger since this
--     Redis process started (the set itself is that name + ":" + run_id: see live_set). Given
--     when the meter can
--     rehydrate; an account not in it answers {'verify'} and is checked before any write, so
--     a Redis that came back behind the ledger never reuses a transaction id.
-- ARGV (common prefix): 1 account id, 2 now_ms, 3 month index, 4 day index,
--   5 request id ('' = none), 6 request fingerprint. Operation arguments start at ARGV[7].
-- Reply (mutating scripts): {code, id, available, held, requests_today, tokens_used_today,
--   retry_after_ms, replayed, daily_limit, x1, x2}; code 'ok' or a denial/error word.
--
-- The wire format (reply slots, FIELDS, the journal fields, the hold record) is stated once in
-- meter/_wire.py; this file keeps a literal copy, and tests/meter/test_wire.py keeps them equal.
--
-- Rules: all reads and checks come first; writes are queued and done by commit() at the end,
-- after which nothing can fail. Numbers are integers below 2^53 (checked before the script);
-- fmt() prints them with %d, since Lua's default %.14g would print large ones as 1e+15.

local K_ACCT, K_HOLDS, K_HEXP, K_SWEEP, K_JOURNAL, K_IDEM, K_LIVE =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local ACCOUNT = ARGV[1]
local NOW = tonumber(ARGV[2])
local MONTH = tonumber(ARGV[3])
local DAY = tonumber(ARGV[4])
local REQ = ARGV[5]
local FP = ARGV[6]

local DAY_MS = 86400000
local MINUTE_US = 60000000
local LAZY_HOLDS = 8          -- expired holds released per touch (keeps every call O(1))
local IDEM_TTL_S = 86400

local FIELDS = {'plan', 'allow', 'dcap', 'rpm', 'maxreq', 'rpct', 'r', 'm', 'b', 'p', 'h',
                'per', 'day', 'rq', 'ut', 'used', 'treq', 'tat', 'seq', 'created', 'np', 'mg'}
-- mg: monthly tokens granted this period (the allowance, moved by plan changes within it), so a
-- plan bought again in the same month grants only what its allowance has left (wallet_plan.lua)
local TEXT = {plan = true, np = true}  -- np: a plan change due at the next period, 'id:allow:dcap:rpm:max:pct'

local function fmt(n) return string.format('%d', n) end

-- queued writes
local JOURNAL = {}
local HOLD_SET = {}           -- hold id -> record (new holds)
local HOLD_DEL = {}           -- hold id -> true (settled, released or expired)
local HOLDS_CHANGED = false

-- The fields every call reads (one HMGET, turned into the account by one table constructor:
-- sized once, no loop), and those only a new period, a plan change or the balance reads
-- (load_cold). The v[i] follow HOT's order; tests/meter/test_wire.py checks both lists against
-- FIELDS. A cold field is never written unless loaded first (commit writes touched fields only).
local HOT = {'plan', 'dcap', 'rpm', 'maxreq', 'r', 'm', 'b', 'p', 'h', 'per', 'day', 'rq', 'ut', 'used',
             'treq', 'tat', 'seq'}
local COLD = {'allow', 'rpct', 'created', 'np', 'mg'}
local function num(x) return x and tonumber(x) or 0 end
local function load_account()
  local v = redis.call('HMGET', K_ACCT, unpack(HOT))
  if not v[1] then return nil end
  return {dirty = {}, plan = v[1], dcap = num(v[2]), rpm = num(v[3]), maxreq = num(v[4]), r = num(v[5]),
          m = num(v[6]), b = num(v[7]), p = num(v[8]), h = num(v[9]), per = num(v[10]), day = num(v[11]),
          rq = num(v[12]), ut = num(v[13]), used = num(v[14]), treq = num(v[15]), tat = num(v[16]),
          seq = num(v[17])}
end

local function load_cold(a)
  if a.np ~= nil then return a end
  local v = redis.call('HMGET', K_ACCT, unpack(COLD))
  a.allow, a.rpct, a.created, a.np, a.mg = num(v[1]), num(v[2]), num(v[3]), v[4] or '', num(v[5])
  return a
end

-- Mark fields for the HSET at commit (fixed arity: no vararg table per call on the hot path).
local function touch(a, f1, f2, f3, f4, f5, f6)
  local d = a.dirty
  d[f1] = true
  if f2 then d[f2] = true end
  if f3 then d[f3] = true end
  if f4 then d[f4] = true end
  if f5 then d[f5] = true end
  if f6 then d[f6] = true end
end

-- The verified set of this Redis *process*: K_LIVE with the server's run_id appended. The set
-- is an ordinary key, so an RDB file, a rewritten AOF or a replica's full sync does carry it
-- (REPL_NONE only keeps the SADDs out of the AOF and the replication stream); a restarted server
-- or a promoted replica has another run_id and so never reads a restored copy: every account is
-- checked again. (fakeredis has no INFO: '' there, whose data dies with the process anyway.)
-- Same hash tag as K_LIVE, so the same slot.
local LIVE_SET = nil
local function live_set()
  if LIVE_SET == nil then
    local info = redis.pcall('INFO', 'server')
    LIVE_SET = K_LIVE .. ':' .. (type(info) == 'string' and string.match(info, 'run_id:(%x+)') or '')
  end
  return LIVE_SET
end

-- True when the meter can rehydrate and this account was not verified against the ledger
-- since this Redis process started (the caller answers {'verify'}; the meter loads, then retries).
local function unverified()
  return K_LIVE ~= nil and redis.call('SISMEMBER', live_set(), ACCOUNT) == 0
end

-- Mark the account verified. Out of the AOF and the replication stream (REPL_NONE): the set
-- means something only to the process that wrote it. It expires a month after it was made
-- (then accounts are simply checked again), so sets of earlier processes do not pile up.
local function mark_live()
  if K_LIVE == nil then return end
  if redis.set_repl then redis.set_repl(redis.REPL_NONE) end
  if redis.call('SADD', live_set(), ACCOUNT) == 1 then redis.call('EXPIRE', live_set(), 2592000, 'NX') end
  if redis.set_repl then redis.set_repl(redis.REPL_ALL) end
end

local function available(a) return a.r + a.m + a.b + a.p end

-- Append one journal entry (written at commit). Call it after mutating the buckets and
-- counters: the state 'st' (plan:period:r:m:b:p:h:used:requests, what a snapshot needs, and
-- the available and held balances after this change) is the one after it.
-- Fields: 't' kind, 'a' account, 'n' = seq:ts_ms:rollover:monthly:bonus:premium:held (the
-- deltas), 'st' (..., then day:requests_today:tokens_used_today, so a snapshot keeps the daily
-- cap), then the optional ones (rq request id, ag, mo, in, ou, pj, hl, nt, rf, hx hold expiry; ik, the stored
-- idempotency record, on the call's last entry, so rehydration can restore it). Few
-- fields on purpose: every field is two strings for Redis to store and the flusher to parse.
local function journal(a, kind, dr, dm, db, dp, dh, extra)
  a.seq = a.seq + 1
  touch(a, 'seq')
  local e = {'t', kind, 'a', ACCOUNT,
             'n', string.format('%d:%d:%d:%d:%d:%d:%d', a.seq, NOW, dr, dm, db, dp, dh),
             'st', string.format('%s:%d:%d:%d:%d:%d:%d:%d:%d:%d:%d:%d', a.plan, a.per, a.r, a.m, a.b, a.p, a.h,
                                 a.used, a.treq, a.day, a.rq, a.ut)}
  if REQ ~= '' then e[#e + 1] = 'rq'; e[#e + 1] = REQ end
  if extra then
    for i = 1, #extra, 2 do
      local v = extra[i + 1]
      if v ~= nil and v ~= '' then e[#e + 1] = extra[i]; e[#e + 1] = v end
    end
  end
  JOURNAL[#JOURNAL + 1] = e
  return a.seq
end

-- floor(n * pct / 100) without leaving the exact-integer range of doubles
local function pct_of(n, pct)
  local q = math.floor(n / 100)
  return q * pct + math.floor((n - q * 100) * pct / 100)
end

-- Set the plan and its limits from 'id:allow:dcap:rpm:max:pct'.
local function apply_plan(a, spec)
  local v = {}
  for x in string.gmatch(spec, '[^:]+') do v[#v + 1] = x end
  a.plan = v[1]
  a.allow, a.dcap, a.rpm = tonumber(v[2]), tonumber(v[3]), tonumber(v[4])
  a.maxreq, a.rpct = tonumber(v[5]), tonumber(v[6])
  touch(a, 'plan', 'allow', 'dcap', 'rpm', 'maxreq', 'rpct')
end

-- Lazy calendar reset: the first touch in a new month expires the old rollover, rolls the
-- plan's share of the unused monthly tokens (only into the very next month) and grants the
-- allowance; the first touch in a new day clears the daily counters. Periods never go back.
local function roll_period(a)
  if MONTH > a.per then
    load_cold(a)
    local old_r, old_m = a.r, a.m
    local rolled = 0
    if MONTH == a.per + 1 then rolled = pct_of(old_m, a.rpct) end
    if old_r + old_m - rolled > 0 then
      a.r = 0; a.m = rolled
      journal(a, 'expiry', -old_r, rolled - old_m, 0, 0, 0, {'nt', 'period end'})
    end
    if rolled > 0 then
      a.m = 0; a.r = rolled
      journal(a, 'rollover', rolled, -rolled, 0, 0, 0)
    end
    a.r = rolled; a.m = 0
    if a.np ~= '' then  -- a downgrade or cancel waits for the period boundary
      apply_plan(a, a.np)
      a.np = ''
      touch(a, 'np')
    end
    if a.allow > 0 then
      a.m = a.allow
      journal(a, 'allowance', 0, a.allow, 0, 0, 0, {'nt', 'monthly allowance'})
    end
    a.per = MONTH
    a.mg = a.allow
    touch(a, 'r', 'm', 'per', 'mg')
  end
  if DAY > a.day then
    a.day = DAY; a.rq = 0; a.ut = 0
    touch(a, 'day', 'rq', 'ut')
  end
end

-- Take n (<= available) from the buckets in burn order: rollover, monthly, bonus, premium.
local function burn(a, n)
  local tr = math.min(a.r, n); n = n - tr
  local tm = math.min(a.m, n); n = n - tm
  local tb = math.min(a.b, n); n = n - tb
  local tp = math.min(a.p, n)
  local d = a.dirty  -- only the buckets taken from are written back
  if tr > 0 then a.r = a.r - tr; d.r = true end
  if tm > 0 then a.m = a.m - tm; d.m = true end
  if tb > 0 then a.b = a.b - tb; d.b = true end
  if tp > 0 then a.p = a.p - tp; d.p = true end
  return tr, tm, tb, tp
end

local function parse_hold(raw)
  local v = {}
  for x in string.gmatch(raw, '[^:]+') do v[#v + 1] = tonumber(x) end
  return {tokens = v[1], r = v[2], m = v[3], b = v[4], p = v[5], per = v[6], exp = v[7]}
end

local function get_hold(hid)
  if HOLD_DEL[hid] then return nil end
  local raw = redis.call('HGET', K_HOLDS, hid)
  if not raw then return nil end
  return parse_hold(raw)
end

-- Close a hold: charge up to `charge` tokens from it (burn order), give the rest back to the
-- buckets it came from. Rollover and monthly tokens held across a month end expire instead.
-- Journals an 'expiry' entry for those, then one entry of `kind` (release or settle).
-- `extra_take` is an overdraw taken from the buckets (settle beyond the hold).
-- Returns the tokens charged from the hold.
local function close_hold(a, hid, hold, charge, kind, extra_take, meta)
  local left = charge
  local cr = math.min(hold.r, left); left = left - cr
  local cm = math.min(hold.m, left); left = left - cm
  local cb = math.min(hold.b, left); left = left - cb
  local cp = math.min(hold.p, left)
  local rr, rm, rb, rp = hold.r - cr, hold.m - cm, hold.b - cb, hold.p - cp
  local gone = 0
  if hold.per < a.per and rr + rm > 0 then
    gone = rr + rm
    rr, rm = 0, 0
    a.h = a.h - gone
    touch(a, 'h')
    journal(a, 'expiry', 0, 0, 0, 0, -gone, {'hl', hid, 'nt', 'held across period end'})
  end
  local xr, xm, xb, xp = 0, 0, 0, 0
  if extra_take > 0 then xr, xm, xb, xp = burn(a, extra_take) end
  local from_hold = hold.tokens - gone
  a.r = a.r + rr; a.m = a.m + rm; a.b = a.b + rb; a.p = a.p + rp
  a.h = a.h - from_hold
  touch(a, 'r', 'm', 'b', 'p', 'h')
  local m = meta or {}
  m[#m + 1] = 'hl'; m[#m + 1] = hid
  journal(a, kind, rr - xr, rm - xm, rb - xb, rp - xp, -from_hold, m)
  HOLD_DEL[hid] = true
  HOLDS_CHANGED = true
  return cr + cm + cb + cp
end

-- Release expired holds (at most `limit`), oldest first.
local function expire_holds(a, limit)
  if a.h == 0 then return 0 end
  local ids = redis.call('ZRANGEBYSCORE', K_HEXP, '-inf', NOW, 'LIMIT', 0, limit)
  local n = 0
  for _, hid in ipairs(ids) do
    local hold = get_hold(hid)
    if hold then
      close_hold(a, hid, hold, 0, 'release', 0, {'nt', 'hold expired'})
      n = n + 1
    end
  end
  return n
end

-- Daily cap, then the per-minute GCRA limit. Reads only.
local function admit(a)
  if a.dcap > 0 and a.rq >= a.dcap then
    return 'daily_cap', (a.day + 1) * DAY_MS - NOW
  end
  if a.rpm > 0 then
    local interval = math.floor(MINUTE_US / a.rpm)
    local tolerance = MINUTE_US - interval
    local now_us = NOW * 1000
    local tat = math.max(a.tat, now_us)
    if tat - now_us > tolerance then
      return 'rate_limited', math.floor((tat - tolerance - now_us + 999) / 1000)
    end
  end
  return 'ok', 0
end

local function count_request(a)
  a.rq = a.rq + 1
  a.treq = a.treq + 1
  touch(a, 'rq', 'treq')
  if a.rpm > 0 then
    a.tat = math.max(a.tat, NOW * 1000) + math.floor(MINUTE_US / a.rpm)
    touch(a, 'tat')
  end
end

local function reply(a, code, id, retry, x1, x2)
  return {code, fmt(id), available(a), a.h, a.rq, a.ut, retry, 0, a.dcap, x1 or 0, x2 or 0}
end

-- Idempotency: the stored reply of an earlier call with this request id, marked replayed;
-- {'conflict'} when the id was used with other parameters; nil when new.
local function replay()
  if REQ == '' then return nil end
  local stored = redis.call('GET', K_IDEM)
  if not stored then return nil end
  local sep = string.find(stored, '\n', 1, true)
  local fp = string.sub(stored, 1, sep - 1)
  -- records written before fingerprints were cut to 16 characters carry 24 (this one's prefix)
  if fp ~= FP and not (#fp == 24 and string.sub(fp, 1, 16) == FP) then return {'conflict'} end
  local out = {}
  for v in string.gmatch(string.sub(stored, sep + 1), '[^\t]+') do out[#out + 1] = v end
  for i = 3, #out do out[i] = tonumber(out[i]) end
  out[8] = 1
  return out
end

-- The head of every mutating script: an earlier answer (replay or conflict), or the account
-- after its lazy month/day reset and hold expiry. `max_check` (tokens asked for) is checked
-- against the plan's per-request maximum before anything is written.
-- Returns the account, or nil and the reply to return.
local function begin(max_check)
  local prior = replay()
  if prior then return nil, prior end
  local a = load_account()
  if not a then return nil, {'no_account'} end
  if unverified() then return nil, {'verify'} end
  if max_check and max_check > a.maxreq then return nil, {'over_max', '0', 0, 0, 0, 0, 0, 0, 0, a.maxreq, 0} end
  roll_period(a)
  expire_holds(a, LAZY_HOLDS)
  return a
end

-- Do every queued write. `out`, when given, is remembered under the request id for 24 h.
local function commit(a, out)
  for hid, rec in pairs(HOLD_SET) do
    redis.call('HSET', K_HOLDS, hid, rec)
    redis.call('ZADD', K_HEXP, string.match(rec, '(%d+)$'), hid)
  end
  for hid in pairs(HOLD_DEL) do
    redis.call('HDEL', K_HOLDS, hid)
    redis.call('ZREM', K_HEXP, hid)
  end
  local pairs_ = {}
  for f in pairs(a.dirty) do
    pairs_[#pairs_ + 1] = f
    pairs_[#pairs_ + 1] = TEXT[f] and a[f] or fmt(a[f])
  end
  if #pairs_ > 0 then redis.call('HSET', K_ACCT, unpack(pairs_)) end
  local record
  if out and REQ ~= '' then
    local parts = {}
    for i, v in ipairs(out) do parts[i] = type(v) == 'number' and fmt(v) or v end
    record = FP .. '\n' .. table.concat(parts, '\t')
    local last = JOURNAL[#JOURNAL]
    if last then last[#last + 1] = 'ik'; last[#last + 1] = record end
  end
  for _, e in ipairs(JOURNAL) do redis.call('XADD', K_JOURNAL, '*', unpack(e)) end
  if record then redis.call('SET', K_IDEM, record, 'EX', IDEM_TTL_S) end
  if HOLDS_CHANGED then
    if a.h == 0 then
      redis.call('ZREM', K_SWEEP, ACCOUNT)
    else
      local first = redis.call('ZRANGE', K_HEXP, 0, 0, 'WITHSCORES')
      if first[2] then redis.call('ZADD', K_SWEEP, first[2], ACCOUNT) end
    end
  end
end
