"""The asyncio API, and cancellation."""

import asyncio

import pytest

import distlock


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 60))


async def _taken_within_5s(session, key):
    """`session`'s guard of `key` once it is free (a release in the
    background may still be on its way), or None after 5 s."""
    for _ in range(50):
        taken = await session.try_lock(key)
        if taken is not None:
            return taken
        await asyncio.sleep(0.1)
    return None


def test_async_with_holds_and_releases(url, key):
    async def main():
        client = await distlock.aconnect(url)
        async with client.session(ttl=10) as first:
            second = await client.session()
            async with first.lock(key, wait=5) as held:
                assert held.is_held and held.key == key
                assert await second.try_lock(key) is None
                with pytest.raises(distlock.Timeout):
                    await second.lock(key, wait=0.2)
            later = await second.lock(key, wait=5)
            assert later.token > held.token
            await held.lost  # set by the release
            lost = later.lost
            assert not lost.is_set()
            await later.release()
            await asyncio.wait_for(lost, 5)
            await second.close()

    run(main())


def test_a_cancelled_wait_leaves_no_holder_and_no_waiter(url, key):
    async def main():
        client = await distlock.aconnect(url)
        holder = await client.session()
        waiter = await client.session()
        third = await client.session()
        guard = await holder.lock(key)
        for round in range(10):
            task = asyncio.ensure_future(waiter.lock(key))
            await asyncio.sleep(0.01 * (round % 4))
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await guard.release()
        # A waiter left queued would be granted the key, or hold it.
        taken = await _taken_within_5s(third, key)
        assert taken is not None, "a cancelled wait left a holder or a waiter"
        await taken.release()
        for session in [holder, waiter, third]:
            await session.close()

    run(main())


def test_a_cancelled_wait_in_a_lock_all_leaves_no_key_held(url, key):
    async def main():
        client = await distlock.aconnect(url)
        holder = await client.session()
        waiter = await client.session()
        blocked = await holder.lock(f"{key}/b")
        task = asyncio.ensure_future(waiter.lock_all([f"{key}/a", f"{key}/b"]))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        free = await _taken_within_5s(holder, f"{key}/a")
        assert free is not None, "a cancelled lock_all kept a key"
        await free.release()
        await blocked.release()
        await holder.close()
        await waiter.close()

    run(main())


def test_async_elections_and_observers(url, key):
    async def main():
        client = await distlock.aconnect(url)
        if not client.capabilities["tells_leader"]:
            pytest.skip("the store cannot say who leads")
        observer = client.observe(key, every=0.05)
        assert await observer.__anext__() is None
        async with client.session() as session:
            async with session.elect(key, "async-node", wait=5) as leading:
                assert (await client.leader(key)).term == leading.term
                seen = await observer.__anext__()
                assert seen.value == "async-node"
            assert await observer.__anext__() is None
        await observer.aclose()

    run(main())


def test_a_pending_async_lost_wakes_on_a_release_from_another_thread(url, key):
    async def main():
        client = await distlock.aconnect(url)
        async with client.session() as session:
            guard = await session.lock(key)
            waiting = asyncio.ensure_future(_wait(guard.lost))
            await asyncio.sleep(0.2)
            assert not waiting.done()
            await asyncio.to_thread(lambda: asyncio.run(guard.release()))
            await asyncio.wait_for(waiting, 10)

    run(main())


async def _wait(lost):
    await lost
