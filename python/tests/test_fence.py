"""The fencing helpers on a DB-API connection (sqlite3), and the coupon
example end to end."""

import os
import sqlite3
import subprocess
import sys

import pytest

from distlock import fence

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "coupons.py")


def test_the_statements_match_the_rust_helpers():
    assert (
        fence.sql_update("coupons", "state = 'frozen'", "id = $1", "fence", "$2")
        == "UPDATE coupons SET state = 'frozen', fence = $2 WHERE (id = $1) AND fence <= $2"
    )
    assert (
        fence.sql_claim("coupons", "id = $1", "fence", "$2")
        == "UPDATE coupons SET fence = $2 WHERE (id = $1) AND fence <= $2"
    )


def test_a_fenced_update_refuses_a_stale_token():
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE rows (id INT, state TEXT, fence INT NOT NULL DEFAULT 0)")
    db.execute("INSERT INTO rows (id, state) VALUES (1, 'new')")
    cursor = db.cursor()
    assert fence.claim(cursor, "rows", "id = ?", 7, where_params=[1])
    assert fence.update(cursor, "rows", "state = ?", "id = ?", 7,
                        set_params=["held by 7"], where_params=[1])
    assert not fence.update(cursor, "rows", "state = ?", "id = ?", 5,
                            set_params=["held by 5"], where_params=[1])
    assert not fence.claim(cursor, "rows", "id = ?", 6, where_params=[1])
    assert db.execute("SELECT state, fence FROM rows").fetchall() == [("held by 7", 7)]
    with pytest.raises(ValueError, match="signed 64-bit"):
        fence.update(cursor, "rows", "state = ?", "id = ?", 2**63, set_params=["x"],
                     where_params=[1])


def test_a_fence_admits_rising_tokens_and_refuses_older_ones():
    guard = fence.Fence()
    guard.admit(5)
    guard.admit(5)
    guard.admit(9)
    with pytest.raises(fence.Stale, match="token 7 is stale: the resource has accepted 9"):
        guard.admit(7)
    assert guard.highest == 9


def _coupons(url, *flags):
    return subprocess.run(
        [sys.executable, EXAMPLE, url, "--workers", "3", "--seconds", "1.5", *flags],
        capture_output=True, text=True, timeout=120,
    )


def test_the_coupon_example_passes_its_audit(url):
    if url.startswith("memory://"):
        pytest.skip("memory:// is one process's")
    run = _coupons(url)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "audit: ok" in run.stdout, run.stdout


def test_without_the_lock_the_coupon_audit_fails(url):
    # The negative control: the audit can see what the lock prevents. Few
    # users make a double issue likely; three runs make a miss unlikely.
    if not url.startswith("distlock://"):
        pytest.skip("once is enough: the store is not used")
    runs = []
    for _ in range(3):
        runs.append(_coupons(url, "--no-lock", "--users", "4"))
        if runs[-1].returncode != 0:
            break
    failed = [run for run in runs if run.returncode != 0]
    assert failed, "\n".join(run.stdout for run in runs)
    assert "coupons of" in failed[0].stdout or "issued of" in failed[0].stdout, failed[0].stdout
