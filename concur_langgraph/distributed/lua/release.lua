-- ARGV: channel, tok1, tok2, ... Removes the tokens wherever they are (holder or waiter).
local freed = reap(now_ms())
for i = 2, #ARGV do
  local tok = ARGV[i]
  redis.call('ZREM', K_LEASE, tok)
  if redis.call('ZREM', K_HOLD, tok) == 1 then freed = true end
  redis.call('ZREM', K_WP, tok)
  redis.call('ZREM', K_WN, tok)
end
if not redis.call('HGET', K_META, 'inc') or not redis.call('GET', K_LIMIT) then
  return cjson.encode({i = '', v = 0})
end
if freed then return cjson.encode(publish(grant())) end
return cjson.encode(snap({}))
