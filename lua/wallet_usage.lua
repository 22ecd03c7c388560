-- wallet_usage.lua: record usage that already happened (a streamed call, a log shipper's event).
-- Never refused for the per-request maximum, the daily cap or the per-minute limit: those bound
-- what may be asked, not what was used. Takes min(tokens, available) in burn order, reports the
-- rest as uncollected (the balance never goes negative), counts the request and journals one
-- 'usage' entry (its note names the uncollected tokens, if any).
-- KEYS: the six account keys (see _wallet.lua).
-- ARGV: common prefix; 7 tokens (>= 0), 8 agent, 9 model, 10 input tokens, 11 output tokens,
--   12 project id (optional ones '' when absent).
-- Reply: {code, seq, available, held, requests_today, tokens_used_today, 0, replayed,
--   daily_limit, charged, uncollected}; code: ok | no_account | conflict.
-- Cost: O(1).

local tokens = tonumber(ARGV[7])
local a, early = begin()
if not a then return early end
local charged = math.min(tokens, available(a))
local tr, tm, tb, tp = burn(a, charged)
count_request(a)
a.ut = a.ut + charged
a.used = a.used + charged
touch(a, 'ut', 'used')
local note = ''
if tokens > charged then note = 'uncollected ' .. fmt(tokens - charged) end
local seq = journal(a, 'usage', -tr, -tm, -tb, -tp, 0,
  {'ag', ARGV[8], 'mo', ARGV[9], 'in', ARGV[10], 'ou', ARGV[11], 'pj', ARGV[12], 'nt', note})
local out = reply(a, 'ok', seq, 0, charged, tokens - charged)
commit(a, out)
return out
