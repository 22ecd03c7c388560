-- wallet_sweep.lua: release up to `limit` expired holds of one account (the periodic sweeper
-- finds candidates in the shard's sweep zset and calls this per account).
-- KEYS: the six account keys (see _wallet.lua).
-- ARGV: common prefix; 7 limit.
-- Reply: {'ok', holds released} or {'no_account'}.
-- Cost: O(limit).

local a = load_account()
if not a then
  redis.call('ZREM', K_SWEEP, ACCOUNT)
  return {'no_account'}
end
if unverified() then return {'verify'} end
roll_period(a)
local n = expire_holds(a, tonumber(ARGV[7]))
HOLDS_CHANGED = true  -- recompute the sweep index entry even when nothing expired
commit(a)
return {'ok', n}
