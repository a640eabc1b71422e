-- ARGV: channel, limit, fence ('' = unfenced; else the leader key must hold exactly this),
--       grace_ms.
if ARGV[3] ~= '' and redis.call('GET', K_LEADER) ~= ARGV[3] then
  return cjson.encode({fenced = true})
end
ensure(ARGV[2], ARGV[4])
redis.call('SET', K_LIMIT, ARGV[2])
reap(now_ms())
return cjson.encode(publish(grant()))
