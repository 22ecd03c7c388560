-- wallet_credit.lua: add tokens to the bonus or premium bucket (purchase, bonus, grant, refund,
-- adjustment). Journals one entry of that kind with the note and reference given.
-- KEYS: the six account keys (see _wallet.lua).
-- ARGV: common prefix; 7 bucket ('b' bonus | 'p' premium), 8 tokens, 9 kind, 10 note,
--   11 reference (purchase id, promo code, admin actor).
-- Reply: {code, seq, available, held, requests_today, tokens_used_today, 0, replayed,
--   daily_limit, tokens, 0}; code: ok | overflow (bucket would pass 2^53) | no_account | conflict.
-- Cost: O(1).

local bucket = ARGV[7]
local tokens = tonumber(ARGV[8])
local prior = replay()
if prior then return prior end
local a = load_account()
if not a then return {'no_account'} end
if unverified() then return {'verify'} end
if a[bucket] + tokens >= 9007199254740992 then return {'overflow'} end
roll_period(a)
expire_holds(a, LAZY_HOLDS)
a[bucket] = a[bucket] + tokens
touch(a, bucket)
local db, dp = 0, 0
if bucket == 'b' then db = tokens else dp = tokens end
local seq = journal(a, ARGV[9], 0, 0, db, dp, 0, {'nt', ARGV[10], 'rf', ARGV[11]})
local out = reply(a, 'ok', seq, 0, tokens)
commit(a, out)
return out
