-- wallet_debit.lua: check-and-deduct. Admits a request of `tokens` if the per-request maximum,
-- the daily request cap, the per-minute limit and the balance all allow it; takes the tokens
-- in burn order (rollover, monthly, bonus, premium) and journals one 'usage' entry.
-- KEYS: the six account keys (see _wallet.lua).
-- ARGV: common prefix; 7 tokens, 8 agent, 9 model, 10 input tokens, 11 output tokens,
--   12 project id (optional ones '' when absent).
-- Reply: {code, seq, available, held, requests_today, tokens_used_today, retry_after_ms,
--   replayed, daily_limit, tokens, 0}; code: ok | insufficient | daily_cap | rate_limited |
--   over_max (x1 = the maximum) | no_account | conflict.
-- Cost: O(1): HMGET, GET, at most 8 expired holds, HSET, XADD, SET.

local tokens = tonumber(ARGV[7])
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
a.ut = a.ut + tokens
a.used = a.used + tokens
touch(a, 'ut', 'used')
local seq = journal(a, 'usage', -tr, -tm, -tb, -tp, 0,
  {'ag', ARGV[8], 'mo', ARGV[9], 'in', ARGV[10], 'ou', ARGV[11], 'pj', ARGV[12]})
local out = reply(a, 'ok', seq, 0, tokens)
commit(a, out)
return out
