"""`lost` fires when the session's lease runs out, before anyone else can
have the lock: the client is cut off its store by a proxy that stops
forwarding, so its renewals never arrive."""

import threading
import time

import pytest

import distlock
from conftest import needs


def test_lost_fires_when_the_lease_runs_out(url, proxied, key):
    proxy, through = proxied
    watcher = distlock.connect(url)
    needs(watcher, "lease_expiry")
    session = distlock.connect(through).session(ttl=3)
    guard = session.lock(key, wait=5)
    assert not guard.lost.wait(0.5)

    got = {}

    def take_over():
        with watcher.session(ttl=10) as other:
            later = other.lock(key, wait=30)
            got["at"] = time.monotonic()
            got["token"] = later.token
            later.release()

    proxy.pause()
    cut = time.monotonic()
    taker = threading.Thread(target=take_over)
    taker.start()
    assert guard.lost.wait(10), "the lease ran out but lost did not fire"
    lost_at = time.monotonic()
    assert guard.lost.is_set() and not guard.is_held
    assert lost_at - cut < 8
    taker.join(60)
    assert got, "no other session got the lock after the lease ran out"
    assert lost_at <= got["at"], "another session held the lock before lost fired"
    assert got["token"] > guard.token
    proxy.resume()
    with pytest.raises(distlock.NotHeld):
        guard.release()
    with pytest.raises(distlock.Lost):
        session.lock(key + "/after", wait=5)
