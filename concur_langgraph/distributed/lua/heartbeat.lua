-- ARGV: channel, limit_hint, ttl_ms, expected_inc ('' = any), tok1, tok2, ...
-- Renews the tokens that still exist; st[i] = holder seq, 0 = waiting, -1 = gone.
local inc = redis.call('HGET', K_META, 'inc')
if ARGV[4] ~= '' and inc ~= ARGV[4] then return cjson.encode({reset = true}) end
ensure(ARGV[2], 0)
local now = now_ms()
local freed = reap(now)
local ttl = tonumber(ARGV[3])
local st = {}
for i = 5, #ARGV do
  local tok = ARGV[i]
  if redis.call('ZSCORE', K_LEASE, tok) then
    redis.call('ZADD', K_LEASE, now + ttl, tok)
    st[#st + 1] = tonumber(redis.call('ZSCORE', K_HOLD, tok) or '0')
  else
    st[#st + 1] = -1
  end
end
-- Always try to grant: this is also how grants resume after a recovery grace.
local granted = grant()
local s
if freed or #granted > 0 then s = publish(granted) else s = snap({}) end
s.st = st
return cjson.encode(s)
