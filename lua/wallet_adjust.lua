-- wallet_adjust.lua: take tokens back (a refund of a purchase, an admin adjustment): up to
-- `tokens` from one bucket ('b' bonus, 'p' premium) or from all in burn order ('*'). Never below
-- zero: what cannot be taken is reported as owed. Journals one entry of `kind` when any was taken.
-- KEYS: the six account keys (see _wallet.lua).
-- ARGV: common prefix; 7 bucket ('b' | 'p' | '*'), 8 tokens, 9 kind, 10 note, 11 reference.
-- Reply: {code, seq (0 when nothing was taken), available, held, requests_today,
--   tokens_used_today, 0, replayed, daily_limit, taken, owed}; code: ok | no_account | conflict.
-- Cost: O(1).

local bucket = ARGV[7]
local tokens = tonumber(ARGV[8])
local a, early = begin()
if not a then return early end
local tr, tm, tb, tp = 0, 0, 0, 0
if bucket == '*' then
  tr, tm, tb, tp = burn(a, math.min(tokens, available(a)))
elseif bucket == 'b' then
  tb = math.min(tokens, a.b); a.b = a.b - tb; touch(a, 'b')
else
  tp = math.min(tokens, a.p); a.p = a.p - tp; touch(a, 'p')
end
local taken = tr + tm + tb + tp
local seq = 0
if taken > 0 then
  seq = journal(a, ARGV[9], -tr, -tm, -tb, -tp, 0, {'nt', ARGV[10], 'rf', ARGV[11]})
end
local out = reply(a, 'ok', seq, 0, taken, tokens - taken)
commit(a, out)
return out
