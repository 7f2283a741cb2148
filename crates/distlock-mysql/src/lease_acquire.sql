CREATE PROCEDURE /*NAME*/(
    IN k VARBINARY(1024),
    IN h VARCHAR(64),
    IN m VARCHAR(16),
    IN permits INT UNSIGNED,
    IN ttl_us BIGINT UNSIGNED,
    IN o VARCHAR(256) CHARACTER SET utf8mb4
)
MODIFIES SQL DATA
SQL SECURITY INVOKER
BEGIN
    -- One try in one transaction, one round trip: the key's row in
    -- distlock_keys locked first (so two acquires of a key take turns),
    -- lapsed holds removed, and a hold added if the key admits it.
    -- Answers (token, NULL) when granted, (NULL, a held mode) when busy.
    -- Made only if missing: a change to it needs a new name (_v2). Its
    -- body depends on where tokens come from, and so does its name.
    DECLARE kh BINARY(32) DEFAULT UNHEX(SHA2(k, 256));
    DECLARE n INT UNSIGNED;
    DECLARE lo, hi VARCHAR(16);
    DECLARE t BIGINT UNSIGNED;
    DECLARE EXIT HANDLER FOR SQLEXCEPTION
    BEGIN
        ROLLBACK;
        RESIGNAL;
    END;
    START TRANSACTION;
    -- Locks the key's row at once (an INSERT IGNORE then a SELECT … FOR
    -- UPDATE would take a shared lock first, and two acquires upgrading
    -- theirs deadlock).
    INSERT INTO distlock_keys (key_hash) VALUES (kh)
        ON DUPLICATE KEY UPDATE key_hash = key_hash;
    DELETE FROM distlock_leases WHERE key_hash = kh AND expires_at <= UTC_TIMESTAMP(6);
    SELECT COUNT(*), MIN(mode), MAX(mode) INTO n, lo, hi
        FROM distlock_leases WHERE key_hash = kh;
    IF n = 0
        OR (m = 's' AND lo = 's' AND hi = 's')
        OR (LEFT(m, 1) = 'p' AND lo = m AND hi = m AND n < permits)
    THEN
        -- The token first, so that the row keeps it; the key's row lock
        -- orders the grants of a key either way.
        /*TOKEN*/
        IF t IS NULL THEN
            SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'distlock: no token was drawn';
        END IF;
        INSERT INTO distlock_leases
            (key_hash, holder, mode, expires_at, lock_key, owner, token, granted_at)
            VALUES (kh, h, m, UTC_TIMESTAMP(6) + INTERVAL ttl_us MICROSECOND,
                    k, o, t, UTC_TIMESTAMP(6));
        COMMIT;
        SELECT t, CAST(NULL AS CHAR(16));
    ELSE
        ROLLBACK;
        SELECT CAST(NULL AS UNSIGNED), hi;
    END IF;
END
