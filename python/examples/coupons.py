"""The coupon system of crates/distlock-coupons, in short, in Python.

Workers in several processes issue coupons from limited batches, at most
one per user per batch. Each issue runs under the batch's lock:

1. take the lock, with a bounded wait;
2. claim the batch's row with the guard's token (``fence.claim``): no
   write of an older holder is accepted from then on;
3. read what the decision needs, and decide;
4. write in one transaction whose first statement is fenced
   (``fence.update``): a holder that paused past its lease finds its
   token stale and its write refused;
5. release.

Then an audit checks the history: never more issued than stock, no user
with two coupons of one batch, the counts agree.

    python coupons.py distlock://127.0.0.1:7890 --workers 4 --seconds 5
    python coupons.py distlock://127.0.0.1:7890 --no-lock   # the audit fails
"""

import argparse
import multiprocessing
import os
import random
import sqlite3
import sys
import tempfile
import time

import distlock
from distlock import fence

BATCHES = {"spring": 40, "summer": 25}


def open_db(path):
    db = sqlite3.connect(path, timeout=30, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    return db


def create(path):
    db = open_db(path)
    db.execute("CREATE TABLE batches (name TEXT PRIMARY KEY, stock INT, issued INT, fence INT)")
    db.execute("CREATE TABLE coupons (batch TEXT, user TEXT, token INT)")
    db.executemany("INSERT INTO batches VALUES (?, ?, 0, 0)", BATCHES.items())
    db.close()


def issue(session, db, batch, user):
    """Issues `user` a coupon of `batch` if there is one left and the user
    has none; whether it did."""
    with session.lock(f"coupons/batch/{batch}", wait=30) as guard:
        if not fence.claim(db.cursor(), "batches", "name = ?", guard.token,
                           where_params=[batch]):
            raise distlock.Lost("a later holder has claimed the batch")
        if not decide(db, batch, user):
            return False
        db.execute("BEGIN IMMEDIATE")
        try:
            if not fence.update(db.cursor(), "batches", "issued = issued + 1", "name = ?",
                                guard.token, where_params=[batch]):
                raise distlock.Lost("the lock passed on")
            db.execute("INSERT INTO coupons VALUES (?, ?, ?)", [batch, user, guard.token])
            db.execute("COMMIT")
            return True
        except BaseException:
            db.execute("ROLLBACK")
            raise


def issue_without_lock(db, batch, user):
    """The negative control: the same decision and write, unguarded."""
    if not decide(db, batch, user):
        return False
    db.execute("BEGIN IMMEDIATE")
    db.execute("UPDATE batches SET issued = issued + 1 WHERE name = ?", [batch])
    db.execute("INSERT INTO coupons VALUES (?, ?, 0)", [batch, user])
    db.execute("COMMIT")
    return True


def decide(db, batch, user):
    """Whether `user` may have a coupon of `batch`: read, then think a
    little, as a real service would."""
    (stock, issued), = db.execute("SELECT stock, issued FROM batches WHERE name = ?", [batch])
    (has,), = db.execute(
        "SELECT count(*) FROM coupons WHERE batch = ? AND user = ?", [batch, user])
    time.sleep(0.005)
    return issued < stock and not has


def work(url, path, start, seconds, users, seed, lock):
    rng = random.Random(seed)
    db = open_db(path)
    with distlock.connect(url).session(ttl=10) as session:
        # Every worker starts at once, so that they contend from the first.
        start.wait(60)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            batch, user = rng.choice(list(BATCHES)), f"user-{rng.randrange(users)}"
            if lock:
                issue(session, db, batch, user)
            else:
                issue_without_lock(db, batch, user)


def audit(path):
    """The problems in the history; none if it is right."""
    db = open_db(path)
    problems = []
    for name, stock, issued in db.execute("SELECT name, stock, issued FROM batches"):
        (count,), = db.execute("SELECT count(*) FROM coupons WHERE batch = ?", [name])
        if issued > stock:
            problems.append(f"{name}: {issued} issued of {stock}")
        if count != issued:
            problems.append(f"{name}: {count} coupons but {issued} counted")
    for batch, user, n in db.execute(
            "SELECT batch, user, count(*) FROM coupons GROUP BY batch, user HAVING count(*) > 1"):
        problems.append(f"{user} has {n} coupons of {batch}")
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", nargs="?", default=None, help="the store (default: $DISTLOCK_URL)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--users", type=int, default=30)
    parser.add_argument("--no-lock", action="store_true",
                        help="the negative control: no lock, no fence; the audit should fail")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "coupons.db")
        create(path)
        context = multiprocessing.get_context("spawn")
        start = context.Barrier(args.workers)
        workers = [
            context.Process(target=work, args=(args.url, path, start, args.seconds, args.users,
                                               seed, not args.no_lock))
            for seed in range(args.workers)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(args.seconds + 60)
            if worker.exitcode is None:
                worker.terminate()
        failed = [w.exitcode for w in workers if w.exitcode != 0]
        problems = audit(path)
        (issued,), = open_db(path).execute("SELECT count(*) FROM coupons")
        print(f"{issued} coupons issued by {args.workers} workers; "
              f"audit: {'; '.join(problems) or 'ok'}")
        if failed or problems:
            sys.exit(1)


if __name__ == "__main__":
    main()
