"""Lua scripts of the Redis session store: each one multi-key update is atomic in Redis."""

from __future__ import annotations

# A rotated session (rt_version > 0) never recreates a deleted one: a logout during an
# exchange must stay a logout. Fencing: a holder of the refresh lock writes only while the lock
# is still its own, and nobody writes a session older (by refresh-token rotation) than the
# stored one. Atomic in one script.
# Each save also drops up to two members of each index whose session is gone, which keeps the
# sets near the number of live sessions (the script builds those keys from the prefix). In
# cluster mode the indexes live in other slots: the store passes no index keys and keeps them
# with INDEX_ADD instead (pruned by ``find``).
# KEYS: sess, tok, lock, idx...
# ARGV: ciphertext, idle deadline, ttl ms, id, token, rt_version, prefix
SAVE = """
if tonumber(ARGV[6]) > 0 and redis.call('EXISTS', KEYS[1]) == 0 then return -3 end
if ARGV[5] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[5] then return -1 end
local stored = redis.call('HGET', KEYS[1], 'rtv')
if stored and tonumber(stored) > tonumber(ARGV[6]) then return -2 end
redis.call('HSET', KEYS[1], 'd', ARGV[1], 'exp', ARGV[2], 'rtv', ARGV[6])
redis.call('HDEL', KEYS[1], 'seen')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
for i = 4, #KEYS do
  for _, member in ipairs(redis.call('SRANDMEMBER', KEYS[i], 2)) do
    if redis.call('EXISTS', ARGV[7] .. 'sess:' .. member) == 0 then
      redis.call('SREM', KEYS[i], member)
    end
  end
  redis.call('SADD', KEYS[i], ARGV[4])
  if redis.call('PTTL', KEYS[i]) < tonumber(ARGV[3]) then
    redis.call('PEXPIRE', KEYS[i], ARGV[3])
  end
end
return 1
"""

# KEYS: sess, tok, idx...  ARGV: now, idle deadline, ttl ms. Never revives an expired session.
TOUCH = """
local deadline = redis.call('HGET', KEYS[1], 'exp')
if not deadline or tonumber(deadline) <= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'exp', ARGV[2], 'seen', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
for i = 3, #KEYS do
  if redis.call('PTTL', KEYS[i]) < tonumber(ARGV[3]) then
    redis.call('PEXPIRE', KEYS[i], ARGV[3])
  end
end
return 1
"""

# KEYS: sess, tok  ARGV: field, ciphertext. Tokens live exactly as long as their session.
PUT_TOKEN = """
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -2 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
return 1
"""

# One index set (cluster mode: its own slot). KEYS: idx  ARGV: id, ttl ms
INDEX_ADD = """
redis.call('SADD', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
"""

# KEYS: login:<state>, logins  ARGV: state. Single use: a replayed state finds nothing.
POP_LOGIN = """
local blob = redis.call('GET', KEYS[1])
if blob then redis.call('DEL', KEYS[1]) end
redis.call('ZREM', KEYS[2], ARGV[1])
return blob
"""

RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# Pending logins are bounded (review item 6): anyone can start one, so past ``cap`` a new one
# is refused and the pending ones stay. ``logins`` is a sorted set of pending states scored by
# their expiry (the store's clock, in ms); expired members are dropped first.
# KEYS: login:<state>, logins  ARGV: ciphertext, ttl ms, now ms, expiry ms, cap, state
# Returns {1, 0} when stored, {0, expiry ms of the oldest pending login} when full.
PUT_LOGIN = """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[3])
local pending = redis.call('ZCARD', KEYS[2])
if pending >= tonumber(ARGV[5]) and not redis.call('ZSCORE', KEYS[2], ARGV[6]) then
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  return {0, oldest[2] or ARGV[4]}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[6])
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
return {1, 0}
"""
