"""The blocking API, on every store of the run."""

import signal
import threading
import time

import pytest

import distlock
from conftest import needs


def test_a_lock_excludes_other_sessions_and_its_token_rises(client, key):
    with client.session(ttl=10) as first, client.session(ttl=10) as second:
        with first.lock(key, wait=5) as held:
            assert held.is_held and held.key == key and held.mode == "exclusive"
            assert second.try_lock(key) is None
            with pytest.raises(distlock.Timeout) as timeout:
                second.lock(key, wait=0.2)
            assert isinstance(timeout.value, TimeoutError) and str(timeout.value)
        later = second.lock(key, wait=5)
        assert later.token > held.token
        assert not held.is_held and held.lost.is_set()
        later.release()


def test_a_release_twice_is_not_held(client, key):
    with client.session() as session:
        guard = session.lock(key)
        guard.release()
        with pytest.raises(distlock.NotHeld, match="already released"):
            guard.release()


def test_readers_share_and_a_writer_waits(client, key):
    needs(client, "shared")
    with client.session() as a, client.session() as b, client.session() as c:
        with a.read(key) as r1, b.read(key, wait=5) as r2:
            assert r1.mode == r2.mode == "read"
            assert c.try_write(key) is None
        with c.write(key, wait=5) as w:
            assert w.token > max(r1.token, r2.token)
            assert a.try_read(key) is None


def test_a_semaphore_admits_its_permits(client, key):
    needs(client, "semaphore")
    sessions = [client.session() for _ in range(3)]
    held = [s.semaphore(key, 2, wait=5) for s in sessions[:2]]
    assert sessions[2].try_semaphore(key, 2) is None
    held[0].release()
    third = sessions[2].semaphore(key, 2, wait=5)
    assert third.mode == "semaphore"
    for guard in [held[1], third]:
        guard.release()
    for session in sessions:
        session.close()


def test_lock_all_holds_every_key_with_its_own_token(client, key):
    keys = [f"{key}/a", f"{key}/b"]
    with client.session() as first, client.session() as second:
        with first.lock_all(keys, wait=5) as both:
            assert set(both.tokens) == set(keys)
            assert second.try_lock(keys[1]) is None
            assert second.try_lock_all(list(reversed(keys))) is None
        with second.lock_all([(keys[1], "exclusive"), keys[0]], wait=5) as again:
            for k in keys:
                assert again.token(k) > both.token(k)
    with pytest.raises(TypeError):
        first.lock_all(key)


def test_an_election_has_one_leader_and_observers_see_it(client, key):
    needs(client, "tells_leader")
    observed = client.observe(key, every=0.05)
    assert next(observed) is None
    with client.session() as a, client.session() as b:
        leading = a.elect(key, "node-a", wait=5)
        assert leading.is_leader and leading.value == "node-a"
        now = client.leader(key)
        assert (now.value, now.term) == ("node-a", leading.term)
        assert next(observed).term == leading.term
        with pytest.raises(distlock.Timeout):
            b.elect(key, "node-b", wait=0.2)
        leading.resign()
        assert leading.lost.is_set()
        following = b.elect(key, "node-b", wait=5)
        assert following.term > leading.term
        seen = next(observed)
        while seen is None or seen.value != "node-b":
            seen = next(observed)
        assert seen.term == following.term
        following.resign()


def test_threads_share_a_client_and_take_turns(client, key):
    counter = {"value": 0, "inside": 0, "overlaps": 0}

    def work():
        other = client.session()
        for _ in range(10):
            with other.lock(key, wait=30):
                counter["inside"] += 1
                counter["overlaps"] += counter["inside"] > 1
                time.sleep(0.002)  # a section long enough to overlap, if it could
                counter["value"] += 1
                counter["inside"] -= 1
        other.close()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counter == {"value": 40, "inside": 0, "overlaps": 0}


def test_a_closed_session_takes_nothing_more(client, key):
    session = client.session()
    guard = session.lock(key)
    session.close()
    assert not guard.is_held
    with pytest.raises(distlock.Error):
        session.lock(key, wait=1)


def test_a_thread_waiting_for_a_lock_lets_the_others_run(client, key):
    # The holder releases from the main thread while another thread waits:
    # a wait that kept the GIL would never let it.
    with client.session() as holder, client.session() as waiter:
        guard = holder.lock(key)
        started = threading.Event()
        got = []

        def wait():
            started.set()
            got.append(waiter.lock(key, wait=30))

        thread = threading.Thread(target=wait)
        thread.start()
        started.wait()
        assert not got
        guard.release()
        thread.join(30)
        assert got and got[0].token > guard.token
        got[0].release()


def test_max_hold_ends_a_hold_and_frees_the_key(client, key):
    with client.session(ttl=10, max_hold=0.5, lock_delay=0) as session:
        guard = session.lock(key)
        assert guard.lost.wait(10), "max_hold passed but lost did not fire"
        assert not guard.is_held
        with client.session() as other:
            later = other.lock(key, wait=10)
            assert later.token > guard.token
            later.release()


def test_the_chained_form_holds_while_the_guard_lives(url, key):
    with distlock.connect(url).session(ttl=15).lock(key, wait=5) as guard:
        assert guard.is_held
        assert distlock.connect(url).session().try_lock(key) is None
    assert not guard.is_held


def test_a_release_inside_with_is_not_an_error(client, key):
    with client.session() as session:
        with session.lock(key) as guard:
            guard.release()
        assert guard.lost.is_set()


def test_a_reentrant_hold_released_is_lost_to_its_own_waiters(client, key):
    with client.session() as session:
        first = session.lock(key)
        second = session.lock(key)
        assert second.token == first.token
        waiting = threading.Thread(target=first.lost.wait, args=(30,))
        waiting.start()
        first.release()
        waiting.join(10)
        assert not waiting.is_alive() and first.lost.wait(1)
        assert second.is_held and not second.lost.is_set()
        second.release()


def test_ctrl_c_ends_a_wait_and_leaves_no_waiter(client, key):
    with client.session() as holder, client.session() as waiter:
        guard = holder.lock(key)
        main = threading.main_thread().ident
        timer = threading.Timer(0.3, signal.pthread_kill, args=(main, signal.SIGINT))
        try:
            with pytest.raises(KeyboardInterrupt):
                timer.start()
                waiter.lock(key, wait=30)
        finally:
            timer.cancel()
        guard.release()
        with client.session() as third:
            taken = third.lock(key, wait=5)
            assert taken.token > guard.token
            taken.release()


def test_waits_beyond_a_billion_seconds_are_refused(client, key):
    with client.session() as session:
        with pytest.raises(ValueError, match="from 0 to 1e9"):
            session.lock(key, wait=1e19)
