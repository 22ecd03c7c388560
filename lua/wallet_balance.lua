-- wallet_balance.lua: the account's state, after the lazy month/day reset and hold expiry
-- (a read that may write those, since it touches the account).
-- KEYS: the six account keys (see _wallet.lua).
-- ARGV: common prefix (request id and fingerprint unused).
-- Reply: {'ok', field, value, ...} with every account field, or {'no_account'}.
-- Cost: O(1).

local a = load_account()
if not a then return {'no_account'} end
if unverified() then return {'verify'} end
load_cold(a)
roll_period(a)
expire_holds(a, LAZY_HOLDS)
commit(a)
local out = {'ok'}
for _, f in ipairs(FIELDS) do
  out[#out + 1] = f
  out[#out + 1] = TEXT[f] and a[f] or fmt(a[f])
end
return out
