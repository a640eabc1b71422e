-- Shared prelude of every script. KEYS: see _KEY_NAMES. ARGV[1]: events channel.
local K_LIMIT, K_SEQ, K_QSEQ, K_HOLD = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_WP, K_WN, K_LEASE, K_META, K_LEADER = KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local K_RECOVER = KEYS[10]
local CHANNEL = ARGV[1]

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- grace_ms > 0 when the caller knew an older incarnation: Redis lost the batch, so hold
-- grants until every live process has had the time to re-register its holders.
local function ensure(limit_hint, grace_ms)
  if not redis.call('HGET', K_META, 'inc') then
    local t = redis.call('TIME')
    redis.call('HSET', K_META, 'inc', t[1] .. '.' .. t[2])
    if tonumber(grace_ms) > 0 then redis.call('SET', K_RECOVER, '1', 'PX', grace_ms) end
  end
  if redis.call('EXISTS', K_LIMIT) == 0 then redis.call('SET', K_LIMIT, limit_hint) end
end

-- Drop expired leases; true when a held slot was freed.
local function reap(now)
  local dead = redis.call('ZRANGEBYSCORE', K_LEASE, '-inf', now, 'LIMIT', 0, 1000)
  local freed = false
  for _, tok in ipairs(dead) do
    redis.call('ZREM', K_LEASE, tok)
    if redis.call('ZREM', K_HOLD, tok) == 1 then freed = true end
    redis.call('ZREM', K_WP, tok)
    redis.call('ZREM', K_WN, tok)
  end
  return freed
end

local function queued(tok)
  return redis.call('ZSCORE', K_WP, tok) or redis.call('ZSCORE', K_WN, tok)
end

-- Grant from limit - holders (never new - old), parked queue first. Flat {tok, seq, ...}.
local function grant()
  local granted = {}
  if redis.call('EXISTS', K_RECOVER) == 1 then return granted end
  local limit = tonumber(redis.call('GET', K_LIMIT))
  local holders = redis.call('ZCARD', K_HOLD)
  while holders < limit do
    local q = K_WP
    local head = redis.call('ZRANGE', q, 0, 0)
    if #head == 0 then
      q = K_WN
      head = redis.call('ZRANGE', q, 0, 0)
    end
    if #head == 0 then break end
    local tok = head[1]
    redis.call('ZREM', q, tok)
    local seq = redis.call('INCR', K_SEQ)
    redis.call('ZADD', K_HOLD, seq, tok)
    redis.call('HINCRBY', K_META, 'admitted', 1)
    if q == K_WP then redis.call('HINCRBY', K_META, 'resumed', 1) end
    holders = holders + 1
    granted[#granted + 1] = tok
    granted[#granted + 1] = seq
  end
  return granted
end

local function snap(granted)
  local limit = tonumber(redis.call('GET', K_LIMIT) or '0')
  local holders = redis.call('ZCARD', K_HOLD)
  local victims = {}
  if holders > limit then
    local r = redis.call('ZREVRANGE', K_HOLD, 0, holders - limit - 1, 'WITHSCORES')
    for i = 2, #r, 2 do victims[#victims + 1] = tonumber(r[i]) end
  end
  local m = redis.call('HMGET', K_META, 'inc', 'ver', 'admitted', 'resumed')
  return {i = m[1] or '', v = tonumber(m[2] or '0'), l = limit, h = holders,
          wn = redis.call('ZCARD', K_WN), wp = redis.call('ZCARD', K_WP),
          a = tonumber(m[3] or '0'), r = tonumber(m[4] or '0'), x = victims, g = granted}
end

-- Bump the version, publish the snapshot, return it (as a table, for extra fields).
local function publish(granted)
  redis.call('HINCRBY', K_META, 'ver', 1)
  local s = snap(granted)
  redis.call('PUBLISH', CHANNEL, cjson.encode(s))
  return s
end
