-- wallet_plan.lua: change the account's plan. 'now' (an upgrade) applies at once: the limits
-- change and the monthly bucket becomes the new allowance minus what this month already used
-- (granted this month - monthly, so a plan refunded and bought again is not granted twice); 'next' (a downgrade or cancel) is stored and applied by the first touch
-- of the next period, before that period's allowance is granted. Journals one entry either way.
-- KEYS: the six account keys (see _wallet.lua).
-- ARGV: common prefix; 7 plan id, 8 allowance, 9 daily cap, 10 per minute, 11 max per request,
--   12 rollover percent, 13 'now' | 'next', 14 note (who and why).
-- Reply: {code, seq, available, held, requests_today, tokens_used_today, 0, replayed,
--   daily_limit, monthly delta, 0}; code: ok | no_account | conflict.
-- Cost: O(1).

local a, early = begin()
if not a then return early end
load_cold(a)
local spec = table.concat({ARGV[7], ARGV[8], ARGV[9], ARGV[10], ARGV[11], ARGV[12]}, ':')
local seq, dm = 0, 0
if ARGV[13] == 'next' then
  a.np = spec
  touch(a, 'np')
  seq = journal(a, 'adjustment', 0, 0, 0, 0, 0, {'nt', 'plan ' .. ARGV[7] .. ' from next period: ' .. ARGV[14]})
else
  -- this month's use: what was granted this period (never less than the allowance; 0 = an
  -- account from before 'mg' existed) minus what is left
  local granted = math.max(a.mg, a.allow)
  local used = math.max(granted - a.m, 0)
  local new_m = math.max(tonumber(ARGV[8]) - used, 0)
  dm = new_m - a.m
  apply_plan(a, spec)
  a.np = ''
  a.m = new_m
  a.mg = granted + dm
  touch(a, 'm', 'np', 'mg')
  seq = journal(a, dm >= 0 and 'allowance' or 'adjustment', 0, dm, 0, 0, 0,
    {'nt', 'plan ' .. ARGV[7] .. ' now: ' .. ARGV[14]})
end
local out = reply(a, 'ok', seq, 0, dm)
commit(a, out)
return out
