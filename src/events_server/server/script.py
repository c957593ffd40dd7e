"""The enqueue script: dedup check, append, then the dedup key, per event of a partition
(after the rate charge of a request written in one batch, when there is one).

A dedup hit writes the partition's barrier key: the WAIT / WAITAOF that follows the script
on its connection waits only for that connection's writes, and the duplicate's first copy
came from another one (a retry after a refused confirmation). Writing the barrier moves
this connection past that first copy, so the confirmation covers it too."""

from __future__ import annotations

from typing import Any

from events_server.queue.scripts import LuaScript
from events_server.server.limits import GCRA_FUNCTION

# KEYS[1]   partition stream
# KEYS[2]   partition barrier (keys.barrier), written once when any event is a duplicate
# KEYS[3..] dedup keys of the events that carry a deduplication_id, and the limiter key
#           of a charged batch
# ARGV[1]   dedup TTL, seconds
# ARGV[2]   index into KEYS of the limiter key to charge first ("0": no charge)
# ARGV[3..6] the charge: requests/s, events/s, burst seconds, events (see limits.Charge)
# ARGV[7..] per event: index into KEYS of its dedup key ("0": none), envelope bytes
# Returns a flat array: per event 1|0 (accepted|duplicate), then the entry id
# (the new one, or the one stored in the dedup key); or {-1, ms to wait} when the
# charge was refused, and nothing was written.
# Entries hold one field, 'e' (keys.ENVELOPE_FIELD): the Envelope bytes.
ENQUEUE_SCRIPT = (
    """#!lua
-- The shebang makes Redis check memory before the script starts (flagless
-- scripts are checked at their first write): a full Redis refuses the whole batch.
"""
    + GCRA_FUNCTION
    + """
local stream = KEYS[1]
-- Checked before any write: a script is not rolled back when a command fails,
-- so failing here keeps a batch all-or-nothing.
local kind = redis.call('TYPE', stream)['ok']
if kind ~= 'stream' and kind ~= 'none' then
  return redis.error_reply('WRONGTYPE ' .. stream .. ' holds a ' .. kind .. ', not a stream')
end
local limiter = tonumber(ARGV[2])
if limiter > 0 then
  local wait = gcra(KEYS[limiter], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
  if wait > 0 then
    return {-1, wait}
  end
end
local ttl = ARGV[1]
local out = {}
local hit = false
for i = 7, #ARGV, 2 do
  local k = tonumber(ARGV[i])
  local seen = false
  if k > 0 then
    seen = redis.call('GET', KEYS[k])
  end
  if seen then
    hit = true
    out[#out + 1] = 0
    out[#out + 1] = seen
  else
    local id = redis.call('XADD', stream, '*', 'e', ARGV[i + 1])
    if k > 0 then
      redis.call('SET', KEYS[k], id, 'EX', ttl)
    end
    out[#out + 1] = 1
    out[#out + 1] = id
  end
end
if hit then
  redis.call('SET', KEYS[2], '1')
end
return out
"""
)
ENQUEUE = LuaScript(ENQUEUE_SCRIPT)

REFUSED = -1
"""The first element of the reply of a batch whose charge was refused."""

NO_CHARGE = (0, 0, 0, 0, 0)
"""ARGV[2..6] of a batch that charges nothing."""

Call = tuple[int, list[Any]]
"""One script call: (partition, EVALSHA arguments after the SHA)."""
