-- ARGV: channel, limit_hint, ttl_ms, token, parked ('1'/'0'), grace_ms. Idempotent per token.
ensure(ARGV[2], ARGV[6])
local now = now_ms()
local freed = reap(now)
local tok = ARGV[4]
if not redis.call('ZSCORE', K_HOLD, tok) and not queued(tok) then
  local q = K_WN
  if ARGV[5] == '1' then q = K_WP end
  redis.call('ZADD', q, redis.call('INCR', K_QSEQ), tok)
end
redis.call('ZADD', K_LEASE, now + tonumber(ARGV[3]), tok)
local granted = grant()
local s
if freed or #granted > 0 then s = publish(granted) else s = snap(granted) end
s.me = tonumber(redis.call('ZSCORE', K_HOLD, tok) or '0')
return cjson.encode(s)
