-- Read committed whatever the connection's default (the connect refuses
-- another level, but a pooler may run this on another connection): two
-- first connects at once would otherwise fail to serialize.
BEGIN ISOLATION LEVEL READ COMMITTED;
-- A table lock that waits (a long reader, a client gone mid-transaction)
-- queues every acquire behind it: give up and say so instead.
SET LOCAL lock_timeout = '2s';
SELECT pg_advisory_xact_lock(-8081908180553460213);
CREATE UNLOGGED TABLE IF NOT EXISTS distlock_leases_v2 (
    key text NOT NULL,
    holder text NOT NULL,
    mode text NOT NULL,
    expires_at timestamptz NOT NULL,
    owner text,
    token bigint,
    granted_at timestamptz,
    PRIMARY KEY (key, holder)
);
CREATE INDEX IF NOT EXISTS distlock_leases_v2_holder ON distlock_leases_v2 (holder);
-- Who waits for a key, until when: a release notifies only if someone does
-- (NOTIFY serializes every notifying commit of the server). A waiter with
-- a channel (its store's) is woken alone, on it; `woken` says a release
-- did so and the waiter has not asked again since. Observers of a
-- key have rows here too, named 'observe|…', with no mode (so status, of
-- every version, leaves them out): a release notifies them as it does
-- waiters, and a grant notifies 'distlock_changed' when one is there.
CREATE UNLOGGED TABLE IF NOT EXISTS distlock_waiters (
    key text NOT NULL,
    waiter text NOT NULL,
    until timestamptz NOT NULL,
    mode text,
    owner text,
    since timestamptz,
    channel text,
    woken boolean,
    PRIMARY KEY (key, waiter)
);
-- Tables made by an older version get the columns status reads (NULL in
-- the rows older clients write). Looked up first: ALTER TABLE locks the
-- table even when there is nothing to add.
DO $do$
BEGIN
    IF (SELECT count(*) FROM pg_attribute WHERE attrelid = 'distlock_leases_v2'::regclass
            AND attname IN ('owner', 'token', 'granted_at') AND NOT attisdropped) < 3 THEN
        ALTER TABLE distlock_leases_v2 ADD COLUMN IF NOT EXISTS owner text,
            ADD COLUMN IF NOT EXISTS token bigint,
            ADD COLUMN IF NOT EXISTS granted_at timestamptz;
    END IF;
    IF (SELECT count(*) FROM pg_attribute WHERE attrelid = 'distlock_waiters'::regclass
            AND attname IN ('mode', 'owner', 'since', 'channel', 'woken')
            AND NOT attisdropped) < 5 THEN
        ALTER TABLE distlock_waiters ADD COLUMN IF NOT EXISTS mode text,
            ADD COLUMN IF NOT EXISTS owner text,
            ADD COLUMN IF NOT EXISTS since timestamptz,
            ADD COLUMN IF NOT EXISTS channel text,
            ADD COLUMN IF NOT EXISTS woken boolean;
    END IF;
END
$do$;
-- Index scans only: a bitmap scan never marks dead index entries, so with a
-- row inserted and deleted per grant every scan of a key would visit each
-- dead version of it until the next vacuum (half the throughput).
CREATE OR REPLACE FUNCTION distlock_acquire_v4(
    lock_key text, lock_holder text, lock_waiter text, lock_mode text, lock_permits int,
    ttl_ms bigint, wait_ms bigint, lock_owner text, lock_channel text,
    OUT granted boolean, OUT fence bigint, OUT retry_ms bigint, OUT conflict text)
LANGUAGE plpgsql SET enable_bitmapscan = off AS $fn$
DECLARE
    held_mode text;
    holders int;
    first_end timestamptz;
    closed_until timestamptz;
    longest bigint;
BEGIN
    -- Under a snapshot older than the lock below, a holder that just
    -- committed would go unseen.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'distlock lease mode needs read committed transactions, not %',
            current_setting('transaction_isolation')
            USING HINT = 'ALTER ROLE ... SET default_transaction_isolation = ''read committed''';
    END IF;
    PERFORM pg_advisory_xact_lock(hashtextextended('distlock:' || lock_key, 0));
    DELETE FROM distlock_leases_v2 WHERE key = lock_key AND expires_at <= clock_timestamp();
    SELECT min(l.mode), count(*), min(l.expires_at) INTO held_mode, holders, first_end
        FROM distlock_leases_v2 l WHERE l.key = lock_key;
    granted := false; fence := 0; retry_ms := ttl_ms; conflict := NULL;
    IF lock_mode LIKE 'p%' AND held_mode LIKE 'p%' AND held_mode <> lock_mode THEN
        conflict := 'the semaphore is held with ' || substr(held_mode, 2)
            || ' permits, not ' || substr(lock_mode, 2);
        RETURN;
    END IF;
    IF holders = 0
        OR (lock_mode = 's' AND held_mode = 's')
        OR (lock_mode LIKE 'p%' AND held_mode = lock_mode AND holders < lock_permits) THEN
        fence := nextval('distlock_token_seq');
        IF fence < 1099511627776 OR fence & 1099511627775 >= 1099511627776 - 1073741824 THEN
            RAISE EXCEPTION 'distlock: the token sequence needs a new epoch'
                USING ERRCODE = 'DL001';
        END IF;
        -- Read after the draw: a draw in a new epoch sees its reset mark.
        SELECT reset_at + max_ttl_ms * interval '1 millisecond', max_ttl_ms
            INTO closed_until, longest FROM distlock_epoch WHERE id = 1;
        IF ttl_ms > longest THEN
            RAISE EXCEPTION 'distlock: a lease of % ms is longer than any granted before', ttl_ms
                USING ERRCODE = 'DL002';
        END IF;
        IF closed_until > clock_timestamp() THEN
            fence := 0;
            retry_ms := greatest(1, ceil(extract(epoch FROM (closed_until - clock_timestamp()))
                * 1000)::bigint);
            RETURN;
        END IF;
        INSERT INTO distlock_leases_v2 (key, holder, mode, expires_at, owner, token, granted_at)
            VALUES (lock_key, lock_holder, lock_mode,
                    clock_timestamp() + ttl_ms * interval '1 millisecond', lock_owner, fence,
                    clock_timestamp());
        granted := true; retry_ms := 0;
        -- One index probe while the key is neither waited on nor observed
        -- (a waiting acquire used to make one to delete its record; one
        -- that does not wait makes one more than it used to).
        IF EXISTS (SELECT 1 FROM distlock_waiters WHERE key = lock_key) THEN
            IF wait_ms > 0 THEN
                DELETE FROM distlock_waiters WHERE key = lock_key AND waiter = lock_waiter;
            END IF;
            -- Observers' names sort after every waiter's (hex digits):
            -- the bound starts the index scan at them.
            IF EXISTS (SELECT 1 FROM distlock_waiters WHERE key = lock_key
                    AND waiter >= 'observe' AND waiter LIKE 'observe|%'
                    AND mode IS NULL AND until > clock_timestamp()) THEN
                PERFORM pg_notify('distlock_changed', lock_key);
            END IF;
        END IF;
    ELSE
        retry_ms := greatest(1, least(ttl_ms,
            ceil(extract(epoch FROM (first_end - clock_timestamp())) * 1000)::bigint));
        -- Seen by every release that checks after this commit; one that
        -- checked just before it is caught by the waiter's early retry.
        IF wait_ms > 0 THEN
            INSERT INTO distlock_waiters (key, waiter, until, mode, owner, since, channel)
                VALUES (lock_key, lock_waiter,
                        clock_timestamp() + wait_ms * interval '1 millisecond', lock_mode,
                        lock_owner, clock_timestamp(),
                        -- A channel a release could not notify would fail it.
                        CASE WHEN lock_channel ~ '^distlock_turn_[0-9a-f]{16}$'
                            THEN lock_channel END)
                ON CONFLICT (key, waiter) DO UPDATE SET until = excluded.until, woken = NULL,
                    channel = excluded.channel;
        END IF;
    END IF;
END
$fn$;
-- Wakes one waiter, on its store's channel, when the key is now free and
-- the earliest waiter not woken yet wants it alone: one grant is all it can
-- get. Otherwise (other holds remain, the next may share, all were woken,
-- or an observer's or an older client's record is there: they hear only
-- 'distlock_released'), every waiter of the key. The woken waiter's store
-- passes the turn on to everyone if that acquire has ended; a woken waiter
-- that never asks again is passed over by later releases.
CREATE OR REPLACE FUNCTION distlock_release_v3(lock_key text, lock_holder text)
RETURNS boolean LANGUAGE plpgsql AS $fn$
DECLARE
    next_waiter text;
    next_mode text;
    next_channel text;
BEGIN
    DELETE FROM distlock_leases_v2
        WHERE key = lock_key AND holder = lock_holder AND expires_at > clock_timestamp();
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF EXISTS (SELECT 1 FROM distlock_waiters WHERE key = lock_key) THEN
        DELETE FROM distlock_waiters WHERE key = lock_key AND until <= clock_timestamp();
        IF NOT EXISTS (SELECT 1 FROM distlock_waiters WHERE key = lock_key
                    AND channel IS NULL)
                AND NOT EXISTS (SELECT 1 FROM distlock_leases_v2 WHERE key = lock_key
                    AND expires_at > clock_timestamp()) THEN
            SELECT waiter, mode, channel INTO next_waiter, next_mode, next_channel
                FROM distlock_waiters WHERE key = lock_key AND woken IS NOT TRUE
                ORDER BY since, waiter LIMIT 1;
            IF next_mode = 'x' AND next_channel IS NOT NULL THEN
                UPDATE distlock_waiters SET woken = true
                    WHERE key = lock_key AND waiter = next_waiter AND woken IS NOT TRUE;
                -- Gone meanwhile (its acquire ended): everyone, below.
                IF FOUND THEN
                    PERFORM pg_notify(next_channel, next_waiter || ' ' || lock_key);
                    RETURN true;
                END IF;
            END IF;
        END IF;
        IF EXISTS (SELECT 1 FROM distlock_waiters WHERE key = lock_key) THEN
            PERFORM pg_notify('distlock_released', lock_key);
        END IF;
    END IF;
    RETURN true;
END
$fn$;
-- Records (or keeps) an observer of a key until `ttl_ms` from now; whether
-- its record was there and live (if not, changes may have gone unnotified).
-- Made after every grant and release of the key under way has committed
-- (the key's lock, its holds' rows, in the order of the primary key), so
-- that each later one sees the record.
CREATE OR REPLACE FUNCTION distlock_observe_v1(lock_key text, observer text, ttl_ms bigint)
RETURNS boolean LANGUAGE plpgsql SET enable_bitmapscan = off AS $fn$
DECLARE
    live boolean;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('distlock:' || lock_key, 0));
    PERFORM 1 FROM distlock_leases_v2 WHERE key = lock_key ORDER BY holder FOR KEY SHARE;
    -- Killed observers' records (and lapsed waits) go here too: a key
    -- whose holds are never released would keep them.
    DELETE FROM distlock_waiters WHERE key = lock_key AND until <= clock_timestamp();
    live := EXISTS (SELECT 1 FROM distlock_waiters WHERE key = lock_key AND waiter = observer);
    INSERT INTO distlock_waiters (key, waiter, until)
        VALUES (lock_key, observer, clock_timestamp() + ttl_ms * interval '1 millisecond')
        ON CONFLICT (key, waiter) DO UPDATE SET until = excluded.until;
    RETURN live;
END
$fn$;
COMMIT;
