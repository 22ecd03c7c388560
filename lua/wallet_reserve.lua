-- wallet_reserve.lua: hold `tokens` for a call whose cost is known only afterwards. Same checks
-- as a debit (it counts as a request); the tokens leave the buckets in burn order into a hold
-- that expires after ttl_ms (then released lazily). The hold id is the 'hold' entry's sequence;
-- the entry's 'hx' field is the expiry (ms), so rehydration can restore the hold.
-- KEYS: the six account keys (see _wallet.lua).
-- ARGV: common prefix; 7 tokens, 8 ttl_ms, 9 agent, 10 model, 11 project id.
-- Reply: {code, hold id, available, held, requests_today, tokens_used_today, retry_after_ms,
--   replayed, daily_limit, tokens, expires_at_ms}; codes as wallet_debit.lua.
-- Cost: O(1) (plus O(log n) in the holds of the account).

local tokens = tonumber(ARGV[7])
local ttl = tonumber(ARGV[8])
local a, early = begin(tokens)
if not a then return early end
local code, retry = admit(a)
if code == 'ok' and available(a) < tokens then code = 'insufficient' end
if code ~= 'ok' then
  commit(a)
  return reply(a, code, 0, retry, tokens)
end
local tr, tm, tb, tp = burn(a, tokens)
count_request(a)
a.h = a.h + tokens
touch(a, 'h')
local expires = NOW + ttl
local seq = journal(a, 'hold', -tr, -tm, -tb, -tp, tokens,
  {'ag', ARGV[9], 'mo', ARGV[10], 'pj', ARGV[11], 'hx', fmt(expires)})
local hid = fmt(seq)
HOLD_SET[hid] = table.concat({fmt(tokens), fmt(tr), fmt(tm), fmt(tb), fmt(tp), fmt(a.per),
                              fmt(expires)}, ':')
HOLDS_CHANGED = true
local out = reply(a, 'ok', seq, 0, tokens, expires)
commit(a, out)
return out
