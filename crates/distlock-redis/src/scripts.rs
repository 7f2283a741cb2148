//! The Lua scripts, run with EVALSHA (loaded again on NOSCRIPT by the
//! `redis` crate), and the one transaction of the fast path. Every
//! key a script touches is passed in `KEYS` and shares the lock's hash tag,
//! so one lock lives in one slot.
//!
//! A lock `K` is at most five keys, all `dl:{K}…`, in one of two states:
//!
//! - **Fast**: one exclusive holder and nobody waiting. The main key
//!   `dl:{K}` holds the holder's member (`SESSION|NONCE|DELAY_MS`), and its
//!   TTL is the hold's lease plus its lock-delay: the lease ends when the
//!   TTL falls to the delay, and the key blocks grants until it is gone. It
//!   is taken with `SET NX PX` beside `INCR` of the fencing counter, and
//!   given back by a compare-and-delete: the plain Redis lock, with a token.
//! - **Queued**: anything else (shared or semaphore holders, waiters, a
//!   lock-delay left by a holder that vanished). The main key holds
//!   `*MODE[/BLOCKED]`: the holders' mode (empty, `x`, `s` or `pN`) and the
//!   end of a lock-delay (ms, by the Redis server's clock). Beside it:
//!   `dl:{K}:h`, the holders scored by when their lease ends; `dl:{K}:q`,
//!   the waiters in arrival order; `dl:{K}:i`, a hash of each waiter's
//!   record (`w` + member: `DEADLINE|MODE|PERMITS|GEN|CHANNEL`, which
//!   becomes `H|TOKEN|GEN|CHANNEL` when the key is handed to it) and the
//!   queue's next number (`n`).
//!
//! The fencing counter `dl:{K}:f` never expires. The main key exists
//! whenever anything holds or waits, so the fast path's `SET NX` can never
//! jump a queue. Whatever frees a queued lock (a release, an expiry found
//! by any script, a waiter giving up) hands it at once to the waiters at
//! the head of the queue that fit, skipping those whose session ran out,
//! and publishes `TOKEN GEN MEMBER` on each one's channel: one message per
//! hand-over, to its waiter only. A queued lock left empty becomes fast
//! again. A forced release ends every live hold and frees the lock the
//! same way; each ended holder's next renewal finds its member gone. It
//! publishes `ended MEMBER` to each hand-over it ends (its waiter may still
//! be counting it), and marks the hand-overs it makes `forced TOKEN GEN
//! MEMBER`: on Redlock either one makes the waiter ask every instance
//! again before it counts a majority (see `session/queue.rs`).
//!
//! Each script's fast case comes before the helpers, so that it does not
//! pay for defining them.

use std::sync::OnceLock;

use redis::Script;

/// The clock, the helpers of the queued state, and their invariants.
const HELPERS: &str = r#"
-- The lock's keys: main, f, h, q, i (a renewal points it at each lock).
local K = KEYS
local now = 0
local function clock()
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function delay_of(member)
  return tonumber(string.match(member, '|(%d+)$')) or 0
end

-- The holders' mode and the end of a lock-delay, from the main key.
local function parse(v)
  local held, until_ = string.match(v or '*', '^%*([^/]*)/?(%d*)$')
  return held or '', tonumber(until_) or 0
end

-- Keeps the queued state at least `ms` more. Only the main key's TTL
-- matters for safety (while it lives, no fast grant can happen); the other
-- keys get the same TTL at the same moment, or none, so they never go
-- before it. A key made after the last extension has none until the next;
-- if every client of the lock stops before that, it stays until the lock
-- is queued again and emptied (its entries are all past and ignored).
local function keep(ms)
  if redis.call('PTTL', K[1]) >= ms then return end
  for _, key in ipairs({K[1], K[3], K[4], K[5]}) do
    redis.call('PEXPIRE', key, 2 * ms)
  end
end

-- When a lock-delay ends (0 if none), as `promote` last found it.
local blocked = 0

-- Set by a forced release: the hand-overs `promote` makes are marked so.
local forced = false

-- Whether a request in `mode` fits beside `count` holders in `held`.
local function fits(held, count, mode, permits)
  if count == 0 then return true end
  if mode == 's' then return held == 's' end
  if mode == 'p' then return held == 'p' .. permits and count < permits end
  return false
end

-- Drops holders whose lease has ended (blocking the key for their
-- lock-delay), then hands the key to the waiters at the head of the queue
-- that fit, in order, dropping those whose session ran out. Each is told
-- on its channel, except `caller`, whose token is returned. `v` is the
-- main key's value if the caller has it; `empty` says the caller knows
-- that nobody holds the key (it just released the one exclusive hold).
-- Returns the caller's token (or nil) and how many hold the key now.
local function promote(caller, v, empty)
  local held
  held, blocked = parse(v or redis.call('GET', K[1]))
  local changed = false
  local count = 0
  if not empty then
    local expired = redis.call('ZRANGEBYSCORE', K[3], '-inf', now, 'WITHSCORES')
    if #expired > 0 then
      for i = 1, #expired, 2 do
        blocked = math.max(blocked, tonumber(expired[i + 1]) + delay_of(expired[i]))
        redis.call('HDEL', K[5], 'w' .. expired[i])
      end
      redis.call('ZREMRANGEBYSCORE', K[3], '-inf', now)
      changed = true
    end
    count = redis.call('ZCARD', K[3])
  end
  local was = held
  if count == 0 then held = '' end
  local mine = nil
  while blocked <= now and not (count > 0 and held == 'x') do
    local head = redis.call('ZRANGE', K[4], 0, 0)[1]
    if not head then break end
    local record = redis.call('HGET', K[5], 'w' .. head) or ''
    local deadline, mode, permits, gen, channel =
      string.match(record, '^(%d+)|(%a)|(%d+)|(%d+)|(.*)$')
    deadline, permits = tonumber(deadline), tonumber(permits)
    local live = deadline and deadline > now
    if live and not fits(held, count, mode, permits) then break end
    redis.call('ZREM', K[4], head)
    if live then
      local token = redis.call('INCR', K[2])
      -- The hold lasts as long as the waiter's last refresh promised.
      redis.call('HSET', K[5], 'w' .. head, 'H|' .. token .. '|' .. gen .. '|' .. channel)
      redis.call('ZADD', K[3], deadline, head)
      if mode == 'p' then held = 'p' .. permits else held = mode end
      count = count + 1
      if head == caller then
        mine = token
      else
        local mark = ''
        if forced then mark = 'forced ' end
        redis.call('PUBLISH', channel, mark .. token .. ' ' .. gen .. ' ' .. head)
      end
    else
      redis.call('HDEL', K[5], 'w' .. head)
    end
  end
  if blocked <= now then blocked = 0 end
  if changed or held ~= was then
    local value = '*' .. held
    if blocked > 0 then value = value .. '/' .. blocked end
    redis.call('SET', K[1], value, 'KEEPTTL')
  end
  return mine, count
end

-- A queued lock with no holder and nobody waiting becomes fast again (or a
-- bare block for what is left of a lock-delay).
local function tidy(count)
  if count > 0 or redis.call('ZCARD', K[4]) > 0 then return end
  redis.call('DEL', K[1], K[3], K[4], K[5])
  if blocked > now then
    redis.call('SET', K[1], '*/' .. blocked, 'PX', blocked - now)
  end
end

-- Puts the lock in the queued state; `v` is the main key's value. A fast
-- holder becomes the first queued holder (its token stays with its
-- client); a fast hold past its lease leaves its lock-delay. Returns the
-- main key's new value.
local function to_queued(v)
  if v and string.sub(v, 1, 1) == '*' then return v end
  local queued = '*'
  if v then
    local left = redis.call('PTTL', K[1])
    local lease_left = left - delay_of(v)
    if lease_left > 0 then
      redis.call('ZADD', K[3], now + lease_left, v)
      queued = '*x'
    elseif left > 0 then
      queued = '*/' .. (now + left)
    end
    redis.call('SET', K[1], queued, 'KEEPTTL')
  else
    redis.call('SET', K[1], queued)
  end
  return queued
end
"#;

/// KEYS: main, f, h, q, i. ARGV: member, mode (`x`, `s`, `p`), permits,
/// ttl ms, waits (`1`/`0`), generation, channel.
///
/// Returns `{1, token, gen}` when the member holds the key (granted now,
/// or handed it since its generation `gen` refreshed its place), `{0,
/// retry_ms, holder}` when busy (queued if it waits; `holder` is the first
/// live holder, or empty), `{-1, message}` when the request conflicts with
/// how the key is held.
const ACQUIRE_FAST: &str = r#"
local v = redis.call('GET', KEYS[1])
if not v and ARGV[2] == 'x' then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[4]) + tonumber(string.match(ARGV[1], '|(%d+)$')))
  return {1, redis.call('INCR', KEYS[2]), ARGV[6]}
end
"#;

const ACQUIRE: &str = r#"
local member, mode, permits = ARGV[1], ARGV[2], tonumber(ARGV[3])
local ttl, waits, gen, channel = tonumber(ARGV[4]), ARGV[5] == '1', ARGV[6], ARGV[7]
local delay = delay_of(member)
clock()
local session = string.sub(member, 1, 33)
if v and string.sub(v, 1, 1) ~= '*' then
  -- Held fast by another acquire (an earlier hold of this session, given
  -- up by the client but not yet run out here, is busy too): a try needs
  -- no queue.
  if not waits or string.sub(v, 1, #session) == session then
    -- Until its lease ends, or past it until its lock-delay does.
    local left = redis.call('PTTL', K[1])
    local lease_left = left - delay_of(v)
    if lease_left <= 0 then return {0, math.max(left, 1), ''} end
    return {0, lease_left, v}
  end
end
v = to_queued(v)
-- Handed the key since the last ask?
local mine = redis.call('HGET', K[5], 'w' .. member)
if mine and string.sub(mine, 1, 2) == 'H|' then
  local score = redis.call('ZSCORE', K[3], member)
  local token = string.match(mine, '^H|(%d+)|')
  if score and tonumber(score) > now then
    -- Held: the ask renews it, from this generation (a Redlock waiter
    -- holding a minority keeps it while it waits for the rest).
    redis.call('ZADD', K[3], 'XX', now + ttl, member)
    redis.call('HSET', K[5], 'w' .. member, 'H|' .. token .. '|' .. gen .. '|' .. channel)
    keep(ttl + delay + 1000)
    return {1, tonumber(token), gen}
  end
  -- A hand-over whose lease ran out unseen: it ends here (with its
  -- lock-delay), and the member joins again at the tail.
  promote('', v, false)
  v = redis.call('GET', K[1]) or to_queued(nil)
  mine = nil
end
-- Who holds it: the first holder (every holder for shared and semaphore
-- requests, which must not be a second hold of this session).
local last = 0
if mode ~= 'x' then last = -1 end
local holders = redis.call('ZRANGE', K[3], 0, last, 'WITHSCORES')
local retry, live, first = ttl, false, ''
for i = 1, #holders, 2 do
  local holder, ends = holders[i], tonumber(holders[i + 1])
  if ends > now then
    if string.sub(holder, 1, #session) == session then
      return {0, math.max(ends - now, 1), holder}
    end
    retry = math.min(retry, ends - now)
    if not live then first = holder end
    live = true
  end
end
redis.call('HSET', K[5], 'w' .. member, (now + ttl) .. '|' .. mode .. '|' .. permits .. '|' .. gen .. '|' .. channel)
local joined = not mine
if joined then
  redis.call('ZADD', K[4], redis.call('HINCRBY', K[5], 'n', 1), member)
end
local held
held, blocked = parse(v)
local token, count = nil, 1
-- Behind a live exclusive holder nobody can be let in.
if not (held == 'x' and live) then token, count = promote(member, v, false) end
if not token and joined and mode == 'p' then
  held = parse(redis.call('GET', K[1]))
  if count > 0 and string.sub(held, 1, 1) == 'p' and held ~= 'p' .. permits then
    redis.call('ZREM', K[4], member)
    redis.call('HDEL', K[5], 'w' .. member)
    tidy(count)
    return {-1, 'the semaphore is held with ' .. string.sub(held, 2) .. ' permits, not ' .. permits}
  end
end
if blocked > now then
  if live then retry = math.min(retry, blocked - now) else retry = blocked - now end
end
if not token and not waits then
  redis.call('ZREM', K[4], member)
  redis.call('HDEL', K[5], 'w' .. member)
  -- Leaving may let the waiters behind in (readers behind a writer).
  local _
  _, count = promote('', nil, false)
  tidy(count)
  return {0, math.max(retry, 1), first}
end
keep(ttl + delay + 1000)
if token then return {1, token, gen} end
return {0, math.max(retry, 1), first}
"#;

/// KEYS: main, f, h, q, i. ARGV: member, its lock-delay in ms. Returns 1
/// if the member held the key (and now does not), else 0; hands the key
/// on. Only a live hold is given back: one past its lease is left to stand
/// for its lock-delay (so this is also the take-back of a hold that a
/// renewal found lost, which must not erase that delay).
const RELEASE_FAST: &str = r#"
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  if ARGV[2] == '0' or redis.call('PTTL', KEYS[1]) > tonumber(ARGV[2]) then
    redis.call('DEL', KEYS[1])
    return 1
  end
  return 0
end
if not v or string.sub(v, 1, 1) ~= '*' then return 0 end
"#;

const RELEASE: &str = r#"
clock()
local score = redis.call('ZSCORE', K[3], ARGV[1])
local held = score and tonumber(score) > now
if held then
  redis.call('ZREM', K[3], ARGV[1])
-- A place still queued (a Redlock instance that had not handed the key
-- over yet) goes too, so that it is never granted to a finished holder.
elseif redis.call('ZREM', K[4], ARGV[1]) == 0 then
  return 0
end
redis.call('HDEL', K[5], 'w' .. ARGV[1])
-- The one live exclusive hold is gone: nobody else holds the key.
local _, count = promote('', v, held and parse(v) == 'x')
tidy(count)
if held then return 1 end
return 0
"#;

/// KEYS: main, f, h, q, i. ARGV: the members of one acquire. Takes back
/// whatever that acquire made (a hold whose answer never came, a place in
/// the queue), and only that, handing the key on: the clean-up of an
/// acquire that failed, gave up or was dropped. Never for a hold that was
/// used: it erases what stands for a lock-delay (RELEASE does not).
const ABANDON_FAST: &str = r#"
local v = redis.call('GET', KEYS[1])
for _, member in ipairs(ARGV) do
  if v == member then
    redis.call('DEL', KEYS[1])
    return 1
  end
end
if not v or string.sub(v, 1, 1) ~= '*' then return 0 end
"#;

const ABANDON: &str = r#"
clock()
local gone = 0
for _, member in ipairs(ARGV) do
  gone = gone + redis.call('ZREM', K[3], member)
  redis.call('ZREM', K[4], member)
  redis.call('HDEL', K[5], 'w' .. member)
end
local _, count = promote('', nil, false)
tidy(count)
return gone
"#;

/// KEYS: main, f, h, q, i of each lock, one lock after the other. ARGV:
/// ttl ms, then member1, delay1, member2, delay2, …. Extends every lease
/// still held; 1 or 0 per lock.
const RENEW: &str = r#"
clock()
local ttl = tonumber(ARGV[1])
local held = {}
for n = 1, #KEYS / 5 do
  K = {KEYS[5 * n - 4], KEYS[5 * n - 3], KEYS[5 * n - 2], KEYS[5 * n - 1], KEYS[5 * n]}
  local member, delay = ARGV[2 * n], tonumber(ARGV[2 * n + 1])
  local v = redis.call('GET', K[1])
  held[n] = 0
  if v == member then
    if redis.call('PTTL', K[1]) > delay then
      redis.call('PEXPIRE', K[1], ttl + delay)
      held[n] = 1
    end
  elseif v and string.sub(v, 1, 1) == '*' then
    local score = redis.call('ZSCORE', K[3], member)
    if score and tonumber(score) > now then
      redis.call('ZADD', K[3], 'XX', now + ttl, member)
      keep(ttl + delay + 1000)
      held[n] = 1
    end
  end
end
return held
"#;

/// KEYS: main, f, h, q, i. No ARGV. Ends every live hold on the lock,
/// whoever holds it (an operator's forced release), and hands the key on
/// as a release does; returns each ended hold as `{member, mode, token
/// ('' where Redis keeps none), lease_left_ms}`. A vanished holder's
/// lock-delay is no hold: it stays, and no ended hold leaves one. Each
/// ended hand-over's waiter is told `ended MEMBER`; each waiter handed the
/// key is told `forced TOKEN GEN MEMBER`.
const FORCE_FAST: &str = r#"
local v = redis.call('GET', KEYS[1])
if not v then return {} end
if string.sub(v, 1, 1) ~= '*' then
  local lease_left = redis.call('PTTL', KEYS[1]) - (tonumber(string.match(v, '|(%d+)$')) or 0)
  if lease_left <= 0 then return {} end
  -- Nobody waits on a fast lock: deleting it frees it for the next SET NX,
  -- whose INCR, in one transaction with it, follows the ended hold's.
  redis.call('DEL', KEYS[1])
  return {{v, 'x', '', lease_left}}
end
"#;

const FORCE: &str = r#"
clock()
local held = parse(v)
local live = redis.call('ZRANGEBYSCORE', K[3], '(' .. now, '+inf', 'WITHSCORES')
if #live == 0 then return {} end
local ended = {}
for i = 1, #live, 2 do
  local member = live[i]
  local record = redis.call('HGET', K[5], 'w' .. member) or ''
  local token, channel = string.match(record, '^H|(%d+)|%d+|(.+)$')
  ended[#ended + 1] = {member, held, token or string.match(record, '^H|(%d+)|') or '', tonumber(live[i + 1]) - now}
  redis.call('HDEL', K[5], 'w' .. member)
  -- A waiter may be counting this hand-over toward a majority (Redlock).
  if channel then redis.call('PUBLISH', channel, 'ended ' .. member) end
end
redis.call('ZREMRANGEBYSCORE', K[3], '(' .. now, '+inf')
-- Holds past their lease are left to `promote`, which keeps their
-- lock-delay; the waiters that fit are then handed the key, each told.
forced = true
local _, count = promote('', v, false)
tidy(count)
return ended
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
    script(&CELL, &[ACQUIRE_FAST, HELPERS, ACQUIRE])
}

pub(crate) fn release() -> &'static Script {
    static CELL: OnceLock<Script> = OnceLock::new();
    script(&CELL, &[RELEASE_FAST, HELPERS, RELEASE])
}

pub(crate) fn abandon() -> &'static Script {
    static CELL: OnceLock<Script> = OnceLock::new();
    script(&CELL, &[ABANDON_FAST, HELPERS, ABANDON])
}

pub(crate) fn renew() -> &'static Script {
    static CELL: OnceLock<Script> = OnceLock::new();
    script(&CELL, &[HELPERS, RENEW])
}

pub(crate) fn force() -> &'static Script {
    static CELL: OnceLock<Script> = OnceLock::new();
    script(&CELL, &[FORCE_FAST, HELPERS, FORCE])
}

pub(crate) fn raise() -> &'static Script {
    static CELL: OnceLock<Script> = OnceLock::new();
    script(&CELL, &[RAISE])
}

/// The keys of lock `key`, in the order the scripts take them.
#[derive(Debug)]
pub(crate) struct LockKeys {
    /// The lock's key, as the user named it.
    pub(crate) key: String,
    pub(crate) main: String,
    pub(crate) fence: String,
    pub(crate) holders: String,
    pub(crate) queue: String,
    pub(crate) info: String,
}

impl LockKeys {
    pub(crate) fn new(prefix: &str, key: &str) -> Self {
        let main = format!("{prefix}{{{key}}}");
        LockKeys {
            key: key.to_owned(),
            fence: format!("{main}:f"),
            holders: format!("{main}:h"),
            queue: format!("{main}:q"),
            info: format!("{main}:i"),
            main,
        }
    }

    /// All five, in the scripts' order.
    pub(crate) fn all(&self) -> [&str; 5] {
        [
            &self.main,
            &self.fence,
            &self.holders,
            &self.queue,
            &self.info,
        ]
    }
}
