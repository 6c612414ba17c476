"""The Lua scripts :mod:`chatd.cluster.link` runs in Redis: each is one atomic step, so two
nodes racing for a name, or two nodes reaping one dead node, never both succeed.

Every key a script touches is passed in ``KEYS`` and shares the room's hash tag, so a
room maps to one Redis Cluster slot. The names hash holds JSON objects whose ``node``
field says which node holds the name; the scripts decode them with Redis's own cjson.
"""

from __future__ import annotations

# KEYS: names. ARGV: name, node, info JSON, take_from ('' for none), strict ('1' or '0').
# Free -> this node's; this node's -> granted (info refreshed); held by take_from -> this
# node's. strict: with take_from, granted only if take_from holds it (session adoption).
# Returns {granted (1/0), holder ('' when free)}.
CLAIM = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local ok, value = pcall(cjson.decode, cur)
  local holder = ''
  if ok and type(value) == 'table' and type(value['node']) == 'string' then
    holder = value['node']
  end
  if holder ~= ARGV[2] and (ARGV[4] == '' or holder ~= ARGV[4]) then
    return {0, holder}
  end
elseif ARGV[4] ~= '' and ARGV[5] == '1' then
  return {0, ''}
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return {1, ARGV[2]}
"""

# KEYS: names. ARGV: name, node. Deletes the name only if this node holds it.
RELEASE = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local ok, value = pcall(cjson.decode, cur)
  if ok and type(value) == 'table' and value['node'] == ARGV[2] then
    redis.call('HDEL', KEYS[1], ARGV[1])
    return 1
  end
end
return 0
"""

# KEYS: alive key of this node, nodes. ARGV: node, ttl in ms, node entry JSON.
# Refreshes the heartbeat; returns 1 when the nodes entry was missing (first connect, or
# this node was reaped while it could not refresh in time) and has been written again.
HEARTBEAT = """
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2])
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
  return 1
end
return 0
"""

# KEYS: alive key of the dead node, nodes, names, stream.
# ARGV: dead node, reaping node, reaping node's incarnation, stream max length.
# Only if the node is still listed and its heartbeat is still missing: delete its names
# and its nodes entry and add one node_gone record. Returns the names' JSON list, or
# false when there was nothing to do (alive again, or another node reaped it first).
REAP = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then return false end
local held = {}
local all = redis.call('HGETALL', KEYS[3])
for i = 1, #all, 2 do
  local ok, value = pcall(cjson.decode, all[i + 1])
  if ok and type(value) == 'table' and value['node'] == ARGV[1] then
    held[#held + 1] = all[i]
  end
end
for _, name in ipairs(held) do redis.call('HDEL', KEYS[3], name) end
redis.call('HDEL', KEYS[2], ARGV[1])
local names = '[]'
if #held > 0 then names = cjson.encode(held) end
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[4], '*',
  'node', ARGV[2], 'kind', 'node_gone', 'inc', ARGV[3], 'seq', '0',
  'gone', ARGV[1], 'names', names)
return names
"""

# KEYS: alive key of this node, nodes, names. ARGV: node.
# A clean stop: this node's names, nodes entry and heartbeat go. Returns how many names.
LEAVE = """
local count = 0
local all = redis.call('HGETALL', KEYS[3])
for i = 1, #all, 2 do
  local ok, value = pcall(cjson.decode, all[i + 1])
  if ok and type(value) == 'table' and value['node'] == ARGV[1] then
    redis.call('HDEL', KEYS[3], all[i])
    count = count + 1
  end
end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[1])
return count
"""

# KEYS: names, stream. Every name held and the stream's last entry id ('0-0' when there
# is no stream yet), read in one step: records after that id follow the snapshot.
SNAPSHOT = """
local names = redis.call('HGETALL', KEYS[1])
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
local id = '0-0'
if #last > 0 then id = last[1][1] end
return {id, names}
"""
