-- wallet_load.lua: rehydration and verification. Loads the account from a ledger snapshot when
-- Redis lacks it, or when Redis is behind it (the snapshot's seq is newer than Redis's: Redis
-- came back from a crash without its last writes); otherwise keeps Redis's state, which is
-- then newer or equal, so a racing live write is never overwritten. Either way the account is
-- then marked verified (see mark_live in _wallet.lua).
-- Open holds come along as 'hold:<id>' fields (the record 'tokens:r:m:b:p:period:expires_ms')
-- and are restored when their tokens add up to what the snapshot shows as held; otherwise
-- (holds unknown or inconsistent) the held tokens are returned to the bonus bucket, journaled
-- as one 'release' entry, so the ledger still balances. Expired restored holds are released by
-- the next touch, as usual. A load over a state that was behind journals one 'adjustment'
-- entry (no deltas, a note naming the lost sequence numbers): the audit trail, and the account's
-- sequence moves past the ledger's last id. Idempotency records of the last 24 h come as
-- 'idem:<n>' fields, '<ttl_s>:<record>' for the key KEYS[n]; each is set unless one is there.
-- The daily counters (day, rq, ut) come in the snapshot; the next touch clears them if their
-- day is over.
-- KEYS: the six account keys, 7 the shard's verified set (optional), 8.. idempotency keys.
-- ARGV: common prefix; 7.. field, value pairs (the fields of wallet_balance.lua's reply,
--   'hold:<id>', record and 'idem:<n>', '<ttl_s>:<record>' pairs). No fields: verify only.
-- Reply: {'ok', 0} loaded into a missing account, {'replaced', n} loaded over a state n
--   entries behind, {'exists', 0} kept (Redis not behind), {'no_account'} (nothing to load).
-- Cost: O(fields + holds + idempotency records).

local fields, holds, idem = {}, {}, {}
for i = 7, #ARGV - 1, 2 do
  local f, v = ARGV[i], ARGV[i + 1]
  if string.sub(f, 1, 5) == 'hold:' then
    holds[string.sub(f, 6)] = v
  elseif string.sub(f, 1, 5) == 'idem:' then
    idem[#idem + 1] = {KEYS[tonumber(string.sub(f, 6))], v}
  else
    fields[#fields + 1] = f
    fields[#fields + 1] = v
    if f == 'seq' then fields.seq = tonumber(v) end
  end
end

local function restore_idempotency()
  for _, kv in ipairs(idem) do
    local sep = string.find(kv[2], ':', 1, true)
    redis.call('SET', kv[1], string.sub(kv[2], sep + 1), 'EX', string.sub(kv[2], 1, sep - 1), 'NX')
  end
end

local code, lost, from = 'ok', 0, 0
if redis.call('EXISTS', K_ACCT) == 1 then
  local seq = tonumber(redis.call('HGET', K_ACCT, 'seq') or '0') or 0
  if not fields.seq or fields.seq <= seq then
    mark_live()
    restore_idempotency()
    return {'exists', 0}
  end
  code, lost, from = 'replaced', fields.seq - seq, seq
  redis.call('DEL', K_ACCT, K_HOLDS, K_HEXP)
  redis.call('ZREM', K_SWEEP, ACCOUNT)
elseif not fields.seq then
  return {'no_account'}
end
local top = fields.seq
fields.seq = nil
redis.call('HSET', K_ACCT, unpack(fields))
local a = load_account()
if a.h > 0 then
  local held = 0
  for _, rec in pairs(holds) do held = held + parse_hold(rec).tokens end
  if held == a.h then
    for hid, rec in pairs(holds) do HOLD_SET[hid] = rec end
    HOLDS_CHANGED = true
  else
    local gone = a.h
    HOLDS_CHANGED = true  -- no hold left: out of the sweep index
    a.h = 0
    a.b = a.b + gone
    touch(a, 'h', 'b')
    journal(a, 'release', 0, 0, gone, 0, -gone, {'nt', 'hold lost with Redis data; returned as bonus'})
  end
end
if code == 'replaced' then
  journal(a, 'adjustment', 0, 0, 0, 0, 0, {'nt', 'redis lost entries ' .. fmt(from + 1) .. '-'
    .. fmt(top) .. '; state loaded from the ledger'})
end
commit(a)
mark_live()
restore_idempotency()
return {code, lost}
