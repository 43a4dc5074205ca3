"""Trimming what every consumer group has acknowledged, in one Lua script per call, never what is still needed.

The streams' consumers (broker/streams.py) acknowledge through `ack_and_trim`; `safe_trim` is the same script
without an ack, for operators and the fault suite.
"""

from __future__ import annotations

import logging

import redis

log = logging.getLogger(__name__)

ROLE_KEEP_ACKED = 0
"""Acknowledged entries a role leaves in the stream it consumes: none, each ack trims them. Trimming as the acks
come keeps a run's Redis memory flat and lets the server reuse the freed entries' memory instead of faulting in
fresh pages for every new one (bench/broker.py). Pending and unread entries, what `rlq peek` is for when a run is
stuck, always stay. Keeping acknowledged ones costs: finding the boundary reads them (see `ack_and_trim`)."""

# One script, so nothing can move between finding the floor and trimming to it (a group created, an entry
# claimed): every group's oldest pending entry and first unread entry stay, and `keep_acked` acked ones below.
# Returns {acknowledged, trimmed}.
_ACK_AND_TRIM_LUA = """
local acked = 0
for i = 3, #ARGV, 1000 do
  acked = acked + redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
local keep = tonumber(ARGV[2])
if keep < 0 or redis.call('EXISTS', KEYS[1]) == 0 then return {acked, 0} end
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
if #groups == 0 then return {acked, 0} end
local floor_ms, floor_seq
local function lower(ms, seq)
  if floor_ms == nil or ms < floor_ms or (ms == floor_ms and seq < floor_seq) then floor_ms, floor_seq = ms, seq end
end
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
for _, group in ipairs(groups) do
  local info = {}
  for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
  local ms, seq = parse(info['last-delivered-id'])
  lower(ms, seq + 1)
  if info['pending'] > 0 then
    lower(parse(redis.call('XPENDING', KEYS[1], info['name'])[2]))
  end
end
local minid = string.format('%d-%d', floor_ms, floor_seq)
if keep > 0 then
  local rows = redis.call('XREVRANGE', KEYS[1], '(' .. minid, '-', 'COUNT', keep)
  if #rows < keep then return {acked, 0} end
  minid = rows[#rows][1]
end
return {acked, redis.call('XTRIM', KEYS[1], 'MINID', minid)}
"""


def ack_and_trim(r: redis.Redis, stream: str, group: str, entry_ids: list[str], keep_acked: int | None) -> int:
    """XACK `entry_ids` for `group`, then (unless `keep_acked` is None) trim like `safe_trim`; one round trip.

    Returns how many of the ids were still pending. `keep_acked` > 0 makes the server read the kept entries to
    find the boundary (XREVRANGE): cheap for small messages, ~10 us per kept 130 KB entry on every call.
    """
    keep = -1 if keep_acked is None else keep_acked
    acked, trimmed = r.register_script(_ACK_AND_TRIM_LUA)(keys=[stream], args=[group, keep, *entry_ids])
    if trimmed:
        log.debug("trimmed %d acknowledged entries of %s", trimmed, stream)
    return int(acked)


def safe_trim(r: redis.Redis, stream: str, *, keep_acked: int = 0) -> int:
    """Drop entries every group has acknowledged, keeping the newest `keep_acked` of them; returns how many.

    Uses XTRIM MINID at the oldest id any group still needs (pending, or not yet delivered), never MAXLEN,
    which would silently drop un-acknowledged entries. A stream without groups keeps everything.
    """
    if keep_acked < 0:
        raise ValueError(f"keep_acked must be >= 0, got {keep_acked}")
    _, trimmed = r.register_script(_ACK_AND_TRIM_LUA)(keys=[stream], args=["", keep_acked])
    if trimmed:
        log.info("trimmed %d acknowledged entries of %s", trimmed, stream)
    return int(trimmed)
