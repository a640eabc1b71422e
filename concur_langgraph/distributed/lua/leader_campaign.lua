-- KEYS: leader, epoch counter. ARGV: owner, ttl_ms. Returns the token we hold, or nil.
local cur = redis.call('GET', KEYS[1])
local mine = ARGV[1] .. '|'
if cur then
  if string.sub(cur, 1, #mine) == mine then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return cur
  end
  return false
end
local token = mine .. redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token, 'PX', ARGV[2])
return token
