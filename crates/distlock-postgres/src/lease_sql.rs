//! The lease table's schema and functions (`?mode=lease`), made at setup.

/// The table, and the functions that change it, each one statement. The
/// table is UNLOGGED: no change to it waits for a disk flush. PostgreSQL
/// empties it exactly when it resets the token sequence (crash recovery, a
/// standby's promotion); the grant that finds the sequence reset starts a
/// new epoch, which marks the reset, and no lease is granted until the
/// longest lease ever granted (`max_ttl_ms`, raised durably before a longer
/// one is granted) has run out since: every lease lost with the table has
/// ended by then.
pub(crate) const SETUP: &str = r#"
BEGIN;
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
-- (NOTIFY serializes every notifying commit of the server).
CREATE UNLOGGED TABLE IF NOT EXISTS distlock_waiters (
    key text NOT NULL,
    waiter text NOT NULL,
    until timestamptz NOT NULL,
    mode text,
    owner text,
    since timestamptz,
    PRIMARY KEY (key, waiter)
);
-- Who observes a key's holders, until when: grants and releases of the key
-- notify `distlock_changed` only while someone does.
CREATE UNLOGGED TABLE IF NOT EXISTS distlock_observers (
    key text NOT NULL,
    observer text NOT NULL,
    until timestamptz NOT NULL,
    PRIMARY KEY (key, observer)
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
            AND attname IN ('mode', 'owner', 'since') AND NOT attisdropped) < 3 THEN
        ALTER TABLE distlock_waiters ADD COLUMN IF NOT EXISTS mode text,
            ADD COLUMN IF NOT EXISTS owner text,
            ADD COLUMN IF NOT EXISTS since timestamptz;
    END IF;
END
$do$;
-- Index scans only: a bitmap scan never marks dead index entries, so with a
-- row inserted and deleted per grant every scan of a key would visit each
-- dead version of it until the next vacuum (half the throughput).
CREATE OR REPLACE FUNCTION distlock_acquire_v2(
    lock_key text, lock_holder text, lock_waiter text, lock_mode text, lock_permits int,
    ttl_ms bigint, wait_ms bigint, lock_owner text,
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
        IF EXISTS (SELECT 1 FROM distlock_observers WHERE key = lock_key
                AND until > clock_timestamp()) THEN
            PERFORM pg_notify('distlock_changed', lock_key);
        END IF;
        IF wait_ms > 0 THEN
            DELETE FROM distlock_waiters WHERE key = lock_key AND waiter = lock_waiter;
        END IF;
    ELSE
        retry_ms := greatest(1, least(ttl_ms,
            ceil(extract(epoch FROM (first_end - clock_timestamp())) * 1000)::bigint));
        -- Seen by every release that checks after this commit; one that
        -- checked just before it is caught by the waiter's early retry.
        IF wait_ms > 0 THEN
            INSERT INTO distlock_waiters (key, waiter, until, mode, owner, since)
                VALUES (lock_key, lock_waiter,
                        clock_timestamp() + wait_ms * interval '1 millisecond', lock_mode,
                        lock_owner, clock_timestamp())
                ON CONFLICT (key, waiter) DO UPDATE SET until = excluded.until;
        END IF;
    END IF;
END
$fn$;
CREATE OR REPLACE FUNCTION distlock_release_v2(lock_key text, lock_holder text)
RETURNS boolean LANGUAGE plpgsql AS $fn$
BEGIN
    DELETE FROM distlock_leases_v2
        WHERE key = lock_key AND holder = lock_holder AND expires_at > clock_timestamp();
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF EXISTS (SELECT 1 FROM distlock_observers WHERE key = lock_key
            AND until > clock_timestamp()) THEN
        PERFORM pg_notify('distlock_changed', lock_key);
    END IF;
    IF EXISTS (SELECT 1 FROM distlock_waiters WHERE key = lock_key) THEN
        DELETE FROM distlock_waiters WHERE key = lock_key AND until <= clock_timestamp();
        IF EXISTS (SELECT 1 FROM distlock_waiters WHERE key = lock_key) THEN
            PERFORM pg_notify('distlock_released', lock_key);
        END IF;
    END IF;
    RETURN true;
END
$fn$;
COMMIT;
"#;
