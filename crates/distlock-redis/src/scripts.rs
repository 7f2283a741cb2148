//! The Lua scripts, run with EVALSHA (loaded again on NOSCRIPT by the
//! `redis` crate). Every key a script touches is passed in `KEYS` and shares
//! the lock's hash tag, so one lock lives in one slot.
//!
//! A lock `K` is five keys, all `dl:{K}:…`:
//! - `h`, a sorted set of holders: member `SESSION|NONCE|DELAY_MS` (the
//!   nonce is the client's, one per grant, the same on every Redlock
//!   instance, where the counters may differ), score the time its lease
//!   ends (ms, by the Redis server's clock);
//! - `m`, the mode of the holders: `x`, `s`, or `pN` (a semaphore of N);
//! - `f`, the fencing counter, which never expires;
//! - `w`, a sorted set of the sessions waiting to write (writer preference),
//!   scored by when their wish lapses;
//! - `d`, set while the key is blocked by the lock-delay of a holder whose
//!   lease ran out.
//!
//! Releases are published on `dl:{K}:r`.

use std::sync::OnceLock;

use redis::Script;

/// The current time in ms, by the server's clock.
const NOW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"#;

/// Drops holders whose lease has ended, blocking the key for their
/// lock-delay. Needs `now`, KEYS[1] (h) and KEYS[5] (d).
const PRUNE: &str = r#"
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES')
for i = 1, #expired, 2 do
  local delay = tonumber(string.match(expired[i], '|(%d+)$')) or 0
  local blocked = tonumber(expired[i + 1]) + delay
  if blocked > now then
    local current = tonumber(redis.call('GET', KEYS[5]) or '0')
    if blocked > current then
      redis.call('SET', KEYS[5], blocked, 'PX', blocked - now)
    end
  end
end
if #expired > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZCARD', KEYS[1]) == 0 then redis.call('DEL', KEYS[2]) end
end
"#;

/// Makes `key` live at least `ms` more (a key without a TTL gets one).
const KEEP: &str = r#"
local function keep(key, ms)
  local left = redis.call('PTTL', key)
  if left == -1 or (left >= 0 and left < ms) then redis.call('PEXPIRE', key, ms) end
end
"#;

/// KEYS: h, m, f, w, d. ARGV: session, mode (`x`, `s`, `p`), permits,
/// ttl ms, lock-delay ms, wants to wait (`1`/`0`), member to add.
/// Returns `{1, token}` when granted, `{0, retry_ms, counter}` when busy
/// (the fencing counter as it stands, for Redlock's quorum read), and
/// `{-1, message}` when the request conflicts with how the key is held.
const ACQUIRE: &str = r#"
local session, mode, permits = ARGV[1], ARGV[2], tonumber(ARGV[3])
local ttl, delay, waits = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6] == '1'
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
local holders = redis.call('ZRANGE', KEYS[1], 0, -1)
local prefix = session .. '|'
for _, member in ipairs(holders) do
  if string.sub(member, 1, #prefix) == prefix then
    -- An earlier hold of this session, given up by the client but not yet
    -- run out here: busy until it does.
        local left = tonumber(redis.call('ZSCORE', KEYS[1], member)) - now
    return {0, math.max(left, 1), tonumber(redis.call('GET', KEYS[3]) or '0')}
  end
end
local held = redis.call('GET', KEYS[2])
local wanted = mode
if mode == 'p' then wanted = 'p' .. permits end
local blocked = tonumber(redis.call('GET', KEYS[5]) or '0')
local writers = redis.call('ZCARD', KEYS[4])
local writer_first = writers > 0 and redis.call('ZSCORE', KEYS[4], session) == false
local free
if blocked > now then
  free = false
elseif #holders == 0 then
  free = not (mode == 's' and writer_first)
elseif mode == 's' then
  free = held == 's' and not writer_first
elseif mode == 'p' then
  if held ~= nil and held ~= false and string.sub(held, 1, 1) == 'p' and held ~= wanted then
    return {-1, 'the semaphore is held with ' .. string.sub(held, 2) .. ' permits, not ' .. permits}
  end
  free = held == wanted and #holders < permits
else
  free = false
end
if free then
  local token = redis.call('INCR', KEYS[3])
    redis.call('ZADD', KEYS[1], now + ttl, ARGV[7])
    -- Set only when it changes: SET would drop the TTL other holders need.
  if held ~= wanted then redis.call('SET', KEYS[2], wanted) end
  keep(KEYS[1], ttl + delay + 1000)
  keep(KEYS[2], ttl + delay + 1000)
  redis.call('ZREM', KEYS[4], session)
  return {1, token}
end
if waits and mode == 'x' then
  redis.call('ZADD', KEYS[4], now + ttl, session)
  keep(KEYS[4], ttl + 1000)
end
local retry = ttl
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if first[2] then
  retry = math.min(retry, tonumber(first[2]) - now)
  if blocked > now then retry = math.max(retry, blocked - now) end
elseif blocked > now then
  retry = blocked - now
end
return {0, math.max(retry, 1), tonumber(redis.call('GET', KEYS[3]) or '0')}
"#;

/// KEYS: h, m. ARGV: member, release channel.
/// Returns 1 if the member held the key (and now does not), else 0.
const RELEASE: &str = r#"
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) <= now then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
if redis.call('ZCARD', KEYS[1]) == 0 then redis.call('DEL', KEYS[2]) end
redis.call('PUBLISH', ARGV[2], 'released')
return 1
"#;

/// KEYS: h, w. ARGV: session, release channel, `1` to publish the removal
/// of holds, then the members to remove. Takes back the holds one acquire
/// made (and only those), and the session's place among the waiting
/// writers: the clean-up of an acquire that failed or was dropped.
const ABANDON: &str = r#"
local gone = 0
for i = 4, #ARGV do
  gone = gone + redis.call('ZREM', KEYS[1], ARGV[i])
end
local writer = redis.call('ZREM', KEYS[2], ARGV[1])
if (gone > 0 and ARGV[3] == '1') or writer > 0 then
  redis.call('PUBLISH', ARGV[2], 'released')
end
return gone
"#;

/// KEYS: h1, m1, h2, m2, …. ARGV: ttl ms, then member1, delay1, member2,
/// delay2, …. Extends every lease still held; returns 1 or 0 per lock.
const RENEW: &str = r#"
local ttl = tonumber(ARGV[1])
local held = {}
for i = 1, #KEYS / 2 do
  local h, m = KEYS[2 * i - 1], KEYS[2 * i]
  local member, delay = ARGV[2 * i], tonumber(ARGV[2 * i + 1])
  local score = redis.call('ZSCORE', h, member)
  if score and tonumber(score) > now then
    redis.call('ZADD', h, 'XX', now + ttl, member)
    keep(h, ttl + delay + 1000)
    keep(m, ttl + delay + 1000)
    held[i] = 1
  else
    held[i] = 0
  end
end
return held
"#;

/// KEYS: f. ARGV: token. Raises the fencing counter to at least `token`
/// (the write half of Redlock's quorum register).
const RAISE: &str = r#"
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local token = tonumber(ARGV[1])
if current < token then redis.call('SET', KEYS[1], token) end
return 1
"#;

fn script(cell: &'static OnceLock<Script>, parts: &[&str]) -> &'static Script {
    cell.get_or_init(|| Script::new(&parts.concat()))
}

pub(crate) fn acquire() -> &'static Script {
    static CELL: OnceLock<Script> = OnceLock::new();
    script(&CELL, &[NOW, KEEP, PRUNE, ACQUIRE])
}

pub(crate) fn release() -> &'static Script {
    static CELL: OnceLock<Script> = OnceLock::new();
    script(&CELL, &[NOW, RELEASE])
}

pub(crate) fn abandon() -> &'static Script {
    static CELL: OnceLock<Script> = OnceLock::new();
    script(&CELL, &[ABANDON])
}

pub(crate) fn renew() -> &'static Script {
    static CELL: OnceLock<Script> = OnceLock::new();
    script(&CELL, &[NOW, KEEP, RENEW])
}

pub(crate) fn raise() -> &'static Script {
    static CELL: OnceLock<Script> = OnceLock::new();
    script(&CELL, &[RAISE])
}

/// The keys of lock `key`, in the order the scripts take them.
pub(crate) struct LockKeys {
    pub(crate) holders: String,
    pub(crate) mode: String,
    pub(crate) fence: String,
    pub(crate) writers: String,
    pub(crate) delay: String,
    pub(crate) channel: String,
}

impl LockKeys {
    pub(crate) fn new(prefix: &str, key: &str) -> Self {
        let base = format!("{prefix}{{{key}}}:");
        LockKeys {
            holders: format!("{base}h"),
            mode: format!("{base}m"),
            fence: format!("{base}f"),
            writers: format!("{base}w"),
            delay: format!("{base}d"),
            channel: format!("{base}r"),
        }
    }
}
