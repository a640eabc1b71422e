-- ARGV: channel, limit_hint, ttl_ms, n_holders, holder tokens (old order)...,
--       then waiter (token, parked) pairs (old order). After an empty restart.
ensure(ARGV[2], ARGV[3])
local now = now_ms()
reap(now)
local ttl = tonumber(ARGV[3])
local nh = tonumber(ARGV[4])
local hs = {}
for i = 5, 4 + nh do
  local tok = ARGV[i]
  local seq = redis.call('ZSCORE', K_HOLD, tok)
  if not seq then
    seq = redis.call('INCR', K_SEQ)
    redis.call('ZADD', K_HOLD, seq, tok)
    redis.call('ZREM', K_WP, tok)
    redis.call('ZREM', K_WN, tok)
  end
  redis.call('ZADD', K_LEASE, now + ttl, tok)
  hs[#hs + 1] = tonumber(seq)
end
for i = 5 + nh, #ARGV, 2 do
  local tok = ARGV[i]
  if not redis.call('ZSCORE', K_HOLD, tok) and not queued(tok) then
    local q = K_WN
    if ARGV[i + 1] == '1' then q = K_WP end
    redis.call('ZADD', q, redis.call('INCR', K_QSEQ), tok)
  end
  redis.call('ZADD', K_LEASE, now + ttl, tok)
end
local s = publish(grant())
s.hs = hs
return cjson.encode(s)
