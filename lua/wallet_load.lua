-- wallet_load.lua: load-if-absent, for rehydration. Writes the account hash from a snapshot
-- only when the account is missing, so a racing live write is never overwritten. Holds do not
-- survive the loss of Redis data: tokens the snapshot shows as held are returned to the bonus
-- bucket, journaled as one 'release' entry, so the ledger still balances.
-- KEYS: the six account keys (see _wallet.lua).
-- ARGV: common prefix; 7.. field, value pairs (the fields of wallet_balance.lua's reply).
-- Reply: {'ok', 1} when loaded, {'exists', 0} when the account was already there.
-- Cost: O(fields).

if redis.call('EXISTS', K_ACCT) == 1 then return {'exists', 0} end
local pairs_ = {}
for i = 7, #ARGV do pairs_[#pairs_ + 1] = ARGV[i] end
redis.call('HSET', K_ACCT, unpack(pairs_))
local a = load_account()
if a.h > 0 then
  local lost = a.h
  a.h = 0
  a.b = a.b + lost
  touch(a, 'h', 'b')
  journal(a, 'release', 0, 0, lost, 0, -lost, {'nt', 'hold lost with Redis data; returned as bonus'})
  commit(a)
end
return {'ok', 1}
