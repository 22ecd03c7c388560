-- wallet_settle.lua: close a hold with the actual usage. Charges `actual` from the hold (burn
-- order) and returns the rest to the buckets it came from; an actual above the hold is taken
-- from the balance while it lasts, and any shortfall is reported as uncollected (the balance
-- never goes negative). Journals one 'settle' entry (plus 'expiry' for held tokens whose month
-- ended). Not a new request: the daily cap was counted at reserve.
-- KEYS: the six account keys (see _wallet.lua).
-- ARGV: common prefix; 7 hold id, 8 actual tokens, 9 agent, 10 model, 11 input tokens,
--   12 output tokens, 13 project id.
-- Reply: {code, seq, available, held, requests_today, tokens_used_today, 0, replayed,
--   daily_limit, charged, uncollected}; code: ok | no_hold | no_account | conflict.
-- Cost: O(1).

local hid = ARGV[7]
local actual = tonumber(ARGV[8])
local a, early = begin()
if not a then return early end
local hold = get_hold(hid)
if not hold then
  commit(a)
  return reply(a, 'no_hold', 0, 0)
end
local extra = math.max(actual - hold.tokens, 0)
local take = math.min(extra, available(a))
local charged = math.min(actual, hold.tokens) + take
a.ut = a.ut + charged
a.used = a.used + charged
touch(a, 'ut', 'used')
close_hold(a, hid, hold, actual, 'settle', take,
  {'ag', ARGV[9], 'mo', ARGV[10], 'in', ARGV[11], 'ou', ARGV[12], 'pj', ARGV[13]})
local out = reply(a, 'ok', a.seq, 0, charged, extra - take)
commit(a, out)
return out
