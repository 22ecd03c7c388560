-- wallet_open.lua: open an account on a plan and grant the plan's allowance for this month
-- (the welcome transaction). Opening an existing account changes nothing and answers 'exists'.
-- KEYS: the six account keys, 7 (optional) the shard's verified set (see _wallet.lua).
-- ARGV: common prefix; 7 plan id, 8 monthly allowance, 9 daily request cap (0 = none),
--   10 requests per minute (0 = off), 11 max tokens per request, 12 rollover percent,
--   13 'probe' (optional): when the account is missing, answer {'no_account'} instead of
--   creating it, so the meter first asks the database (an account lost with Redis data is
--   rehydrated, never opened again from zero).
-- Reply: {'ok'|'exists', seq of the welcome entry, available, held, ...} (see _wallet.lua).
-- Cost: O(1): one HMGET, one HSET, one XADD.

local a = load_account()
if a then return reply(a, 'exists', a.seq, 0) end
if ARGV[13] == 'probe' then return {'no_account'} end
a = {plan = ARGV[7], allow = tonumber(ARGV[8]), dcap = tonumber(ARGV[9]),
     rpm = tonumber(ARGV[10]), maxreq = tonumber(ARGV[11]), rpct = tonumber(ARGV[12]),
     r = 0, m = 0, b = 0, p = 0, h = 0, per = MONTH, day = DAY, rq = 0, ut = 0, used = 0,
     treq = 0, tat = 0, seq = 0, created = NOW, np = '', dirty = {}}
a.mg = a.allow
for _, f in ipairs(FIELDS) do a.dirty[f] = true end
local seq = 0
if a.allow > 0 then
  a.m = a.allow
  seq = journal(a, 'allowance', 0, a.allow, 0, 0, 0, {'nt', 'welcome: ' .. a.plan .. ' plan allowance'})
end
commit(a)
mark_live()
return reply(a, 'ok', seq, 0)
