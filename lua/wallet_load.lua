-- wallet_load.lua: load-if-absent, for rehydration. Writes the account hash from a snapshot
-- only when the account is missing, so a racing live write is never overwritten. Open holds
-- come along as 'hold:<id>' fields (the record 'tokens:r:m:b:p:period:expires_ms') and are
-- restored when their tokens add up to what the snapshot shows as held; otherwise (holds
-- unknown or inconsistent) the held tokens are returned to the bonus bucket, journaled as one
-- 'release' entry, so the ledger still balances. Expired restored holds are released by the
-- next touch, as usual.
-- KEYS: the six account keys (see _wallet.lua).
-- ARGV: common prefix; 7.. field, value pairs (the fields of wallet_balance.lua's reply, and
--   'hold:<id>', record pairs).
-- Reply: {'ok', 1} when loaded, {'exists', 0} when the account was already there.
-- Cost: O(fields + holds).

if redis.call('EXISTS', K_ACCT) == 1 then return {'exists', 0} end
local pairs_, holds = {}, {}
for i = 7, #ARGV - 1, 2 do
  if string.sub(ARGV[i], 1, 5) == 'hold:' then
    holds[string.sub(ARGV[i], 6)] = ARGV[i + 1]
  else
    pairs_[#pairs_ + 1] = ARGV[i]
    pairs_[#pairs_ + 1] = ARGV[i + 1]
  end
end
redis.call('HSET', K_ACCT, unpack(pairs_))
local a = load_account()
if a.h > 0 then
  local held = 0
  for _, rec in pairs(holds) do held = held + parse_hold(rec).tokens end
  if held == a.h then
    for hid, rec in pairs(holds) do HOLD_SET[hid] = rec end
    HOLDS_CHANGED = true
  else
    local lost = a.h
    a.h = 0
    a.b = a.b + lost
    touch(a, 'h', 'b')
    journal(a, 'release', 0, 0, lost, 0, -lost, {'nt', 'hold lost with Redis data; returned as bonus'})
  end
  commit(a)
end
return {'ok', 1}
