-- wallet_release.lua: cancel a hold; every held token goes back to the bucket it came from
-- (rollover and monthly tokens held across a month end expire instead). Journals 'release'.
-- KEYS: the six account keys (see _wallet.lua).
-- ARGV: common prefix; 7 hold id.
-- Reply: {code, seq, available, held, requests_today, tokens_used_today, 0, replayed,
--   daily_limit, tokens returned, 0}; code: ok | no_hold | no_account | conflict.
-- Cost: O(1).

local hid = ARGV[7]
local a, early = begin()
if not a then return early end
local hold = get_hold(hid)
if not hold then
  commit(a)
  return reply(a, 'no_hold', 0, 0)
end
local before = available(a)
close_hold(a, hid, hold, 0, 'release', 0, {})
local out = reply(a, 'ok', a.seq, 0, available(a) - before)
commit(a, out)
return out
