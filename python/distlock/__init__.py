"""distlock: distributed locks with fencing tokens, over many stores.

One API whatever the store; the URL picks it (``distlock://``, ``redis://``,
``redlock://``, ``postgres://``, ``mysql://``, ``zk://``, ``nats://``,
``memory://``, ``file://``, and ``etcd://`` in a build with the ``etcd``
feature)::

    import distlock

    with distlock.connect("redis://127.0.0.1:6379").session(ttl=15) as s:
        with s.lock("coupons/batch-7", wait=5) as g:
            write(g.token)           # with every change the lock protects
            if g.lost.is_set():      # the lease ran out: stop
                raise distlock.Lost("lock lost")

and for asyncio::

    client = await distlock.aconnect(url)
    async with client.session() as s:
        async with s.lock("coupons/batch-7", wait=5) as g:
            await write(g.token)

Every call runs in the Rust core on a runtime of its own: blocking calls
release the GIL while they wait (and let Ctrl-C through), asyncio calls
return awaitables, and a cancelled asyncio task that waits for a lock
leaves no trace. Objects may be shared between threads. A child process
made by ``fork`` cannot use distlock once its parent has (the runtime's
threads do not survive a fork; it raises ``RuntimeError``): use the
``spawn`` start method of ``multiprocessing``, or fork before the parent's
first call.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator, Optional, Tuple, Union

from . import fence
from ._distlock import DEFAULT_URL, MAX_KEY_BYTES, Leader
from . import _distlock as _native
from ._errors import (
    Closed,
    ConfigError,
    Conflict,
    Error,
    InvalidKey,
    Lost,
    NotHeld,
    StoreError,
    Timeout,
    Unavailable,
    Unsupported,
)

__all__ = [
    "connect",
    "aconnect",
    "Client",
    "Session",
    "Guard",
    "MultiGuard",
    "Leadership",
    "Leader",
    "LostEvent",
    "AsyncClient",
    "AsyncSession",
    "AsyncGuard",
    "AsyncMultiGuard",
    "AsyncLeadership",
    "Error",
    "InvalidKey",
    "Timeout",
    "Lost",
    "NotHeld",
    "Conflict",
    "Unavailable",
    "ConfigError",
    "Unsupported",
    "StoreError",
    "Closed",
    "fence",
    "DEFAULT_URL",
    "MAX_KEY_BYTES",
]

#: A key of ``lock_all``: the key alone (exclusive), or ``(key, mode)``
#: with mode ``"exclusive"``, ``"write"`` or ``"read"``.
KeySpec = Union[str, Tuple[str, str]]


def _url(url: Optional[str]) -> str:
    if url is not None:
        return url
    return os.environ.get("DISTLOCK_URL", DEFAULT_URL)


def _keys(keys: Iterable[KeySpec]) -> list:
    if isinstance(keys, str):
        raise TypeError("lock_all takes a list of keys, not one key")
    return [(key, "exclusive") if isinstance(key, str) else tuple(key) for key in keys]


def connect(url: Optional[str] = None) -> "Client":
    """Connects to the store ``url`` names (``$DISTLOCK_URL``, else the
    local server at ``distlock://127.0.0.1:7890``)."""
    return Client(_native.connect(_url(url)))


async def aconnect(url: Optional[str] = None) -> "AsyncClient":
    """Connects to the store ``url`` names, for asyncio; see :func:`connect`."""
    return AsyncClient(await _native.connect_async(_url(url)))


class LostEvent:
    """The end of a hold, as a :class:`threading.Event` that only the
    store sets: set once the hold is lost (its lease ran out, the store
    said so, ``max_hold`` passed, the session ended) or released. It is set
    before the store could grant the key to anyone else.

    ``wait(timeout)`` blocks (with the GIL released); ``await lost`` waits
    in asyncio."""

    __slots__ = ("_hold",)

    def __init__(self, hold: _native.Hold) -> None:
        self._hold = hold

    def is_set(self) -> bool:
        """Whether the hold has ended."""
        return not self._hold.is_held

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Waits at most ``timeout`` seconds (``None``: for ever) for the
        hold to end; whether it has."""
        return self._hold.wait_lost(None if timeout is None else max(timeout, 0.0))

    def __await__(self):
        return self._hold.lost_async().__await__()

    def __repr__(self) -> str:
        return f"<LostEvent set={self.is_set()}>"


class _Held:
    """What every kind of hold has."""

    __slots__ = ("_hold",)

    def __init__(self, hold: _native.Hold) -> None:
        self._hold = hold

    @property
    def is_held(self) -> bool:
        """Whether it is still held: not lost, released, or past its lease."""
        return self._hold.is_held

    @property
    def expires_in(self) -> Optional[float]:
        """Seconds until it certainly ends unless renewed (renewal is
        automatic); ``None`` where the store has no lease."""
        return self._hold.expires_in

    @property
    def lost(self) -> LostEvent:
        """Set when the hold ends; see :class:`LostEvent`."""
        return LostEvent(self._hold)


class _One(_Held):
    __slots__ = ()

    @property
    def token(self) -> int:
        """The fencing token: strictly greater than the token of every
        earlier grant of this key. Write it with every change the lock
        protects (see :mod:`distlock.fence`)."""
        return self._hold.tokens[0][1]

    @property
    def key(self) -> str:
        return self._hold.tokens[0][0]

    @property
    def mode(self) -> str:
        """``"exclusive"``, ``"read"`` or ``"semaphore"``."""
        return self._hold.mode

    def __repr__(self) -> str:
        return f"<{type(self).__name__} key={self.key!r} token={self.token} held={self.is_held}>"


class _All(_Held):
    __slots__ = ()

    @property
    def tokens(self) -> dict:
        """Each key and its fencing token."""
        return dict(self._hold.tokens)

    def token(self, key: str) -> int:
        """The fencing token of ``key``."""
        return self.tokens[key]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} tokens={self.tokens} held={self.is_held}>"


class _Leading(_Held):
    __slots__ = ()

    @property
    def term(self) -> int:
        """The term: strictly greater than every earlier leader's. Write it
        with every act of the leader, as a fencing token."""
        return self._hold.tokens[0][1]

    @property
    def name(self) -> str:
        return self._hold.tokens[0][0]

    @property
    def value(self) -> str:
        """What this leader publishes."""
        return self._hold.value

    @property
    def is_leader(self) -> bool:
        return self._hold.is_held

    def __repr__(self) -> str:
        return f"<{type(self).__name__} name={self.name!r} term={self.term} leader={self.is_leader}>"


class _Releases:
    """Blocking release, and ``with``: released on the way out (unless
    released in the block). A hold lost inside a block that raised nothing
    raises :class:`NotHeld` there; a failed release never hides the block's
    own exception."""

    __slots__ = ()

    def release(self) -> None:
        """Gives the hold up. :class:`NotHeld` if it was lost first (then it
        was never released on anyone else's behalf)."""
        self._hold.release()

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if self._hold.released:
            return
        try:
            self.release()
        except Error:
            if kind is None:
                raise


class _AsyncReleases:
    """The asyncio form of :class:`_Releases`."""

    __slots__ = ()

    async def release(self) -> None:
        """Gives the hold up; see :meth:`Guard.release`."""
        await self._hold.release_async()

    async def __aenter__(self):
        return self

    async def __aexit__(self, kind, value, traceback) -> None:
        if self._hold.released:
            return
        try:
            await self.release()
        except Error:
            if kind is None:
                raise


class Guard(_Releases, _One):
    """A lock held: its :attr:`token`, :attr:`lost`, :meth:`release`.
    Dropped without a release, it is released in the background."""

    __slots__ = ()


class MultiGuard(_Releases, _All):
    """Several keys held at once (:meth:`Session.lock_all`)."""

    __slots__ = ()


class Leadership(_Releases, _Leading):
    """Leading an election (:meth:`Session.elect`)."""

    __slots__ = ()

    def resign(self) -> None:
        """Steps down at once: the next candidate is elected without waiting
        for a lease to run out."""
        self.release()


class AsyncGuard(_AsyncReleases, _One):
    """A lock held, in asyncio: see :class:`Guard`."""

    __slots__ = ()


class AsyncMultiGuard(_AsyncReleases, _All):
    """Several keys held at once, in asyncio: see :class:`MultiGuard`."""

    __slots__ = ()


class AsyncLeadership(_AsyncReleases, _Leading):
    """Leading an election, in asyncio: see :class:`Leadership`."""

    __slots__ = ()

    async def resign(self) -> None:
        """Steps down at once; see :meth:`Leadership.resign`."""
        await self.release()


class Client:
    """A connection to a store; cheap to share between threads."""

    __slots__ = ("_client",)

    def __init__(self, client: _native.Client) -> None:
        self._client = client

    def session(
        self,
        ttl: Optional[float] = None,
        *,
        lock_delay: Optional[float] = None,
        max_hold: Optional[float] = None,
        owner: Optional[str] = None,
        max_keys: Optional[int] = None,
    ) -> "Session":
        """Opens a session: the identity that owns locks, kept alive by one
        lease of ``ttl`` seconds (15 by default) renewed in the background.
        ``max_hold`` bounds every hold; ``lock_delay`` is how long a lost
        session's keys stay blocked where the store supports it; ``owner``
        is what status shows as the holder; ``max_keys`` bounds
        :meth:`Session.lock_all`."""
        return Session(self._client.open_session(ttl, lock_delay, max_hold, owner, max_keys))

    def leader(self, name: str) -> Optional[Leader]:
        """Who leads election ``name`` now (its value and term), or ``None``."""
        return self._client.leader(name)

    def observe(self, name: str, every: Optional[float] = None) -> Iterator[Optional[Leader]]:
        """Each change of election ``name``'s leader, in order (``None``:
        nobody leads); pushed where the store can push, else asked every
        ``every`` seconds. Never ends by itself."""
        observer = self._client.observe(name, every)
        while True:
            yield observer.next()

    @property
    def capabilities(self) -> dict:
        """What the store can do, as ``distlock stores`` prints it."""
        return self._client.capabilities()


class Session:
    """The identity that owns locks; ``with`` closes it on the way out,
    releasing whatever it still holds."""

    __slots__ = ("_session",)

    def __init__(self, session: _native.Session) -> None:
        self._session = session

    def _take(self, kind, key, mode, permits, wait, try_once):
        hold = self._session.acquire(key, mode, permits, wait, try_once)
        return None if hold is None else kind(hold)

    def lock(self, key: str, wait: Optional[float] = None) -> Guard:
        """Takes ``key`` exclusively, waiting at most ``wait`` seconds
        (``None``: for ever) before :class:`Timeout`."""
        return self._take(Guard, key, "exclusive", None, wait, False)

    def read(self, key: str, wait: Optional[float] = None) -> Guard:
        """Takes ``key`` shared with other readers (never with a writer)."""
        return self._take(Guard, key, "read", None, wait, False)

    def write(self, key: str, wait: Optional[float] = None) -> Guard:
        """Takes ``key`` exclusively, as the writer of a read/write lock."""
        return self._take(Guard, key, "write", None, wait, False)

    def semaphore(self, key: str, permits: int, wait: Optional[float] = None) -> Guard:
        """Takes one of ``permits`` places of ``key``."""
        return self._take(Guard, key, "semaphore", permits, wait, False)

    def try_lock(self, key: str) -> Optional[Guard]:
        """Takes ``key`` if it is free now; ``None`` if it is held."""
        return self._take(Guard, key, "exclusive", None, None, True)

    def try_read(self, key: str) -> Optional[Guard]:
        return self._take(Guard, key, "read", None, None, True)

    def try_write(self, key: str) -> Optional[Guard]:
        return self._take(Guard, key, "write", None, None, True)

    def try_semaphore(self, key: str, permits: int) -> Optional[Guard]:
        return self._take(Guard, key, "semaphore", permits, None, True)

    def lock_all(self, keys: Iterable[KeySpec], wait: Optional[float] = None) -> MultiGuard:
        """Takes every key or none, without deadlock whatever the order
        others ask in; each key has its own token."""
        return MultiGuard(self._session.acquire_all(_keys(keys), wait, False))

    def try_lock_all(self, keys: Iterable[KeySpec]) -> Optional[MultiGuard]:
        """Takes every key if all are free now; ``None`` (holding none) if not."""
        hold = self._session.acquire_all(_keys(keys), None, True)
        return None if hold is None else MultiGuard(hold)

    def elect(self, name: str, value: str, wait: Optional[float] = None) -> Leadership:
        """Campaigns in election ``name`` publishing ``value``; returns once
        this is the leader (or :class:`Timeout` after ``wait`` seconds)."""
        return Leadership(self._session.campaign(name, value, wait))

    def close(self) -> None:
        """Ends the session, releasing what it holds."""
        self._session.close()

    @property
    def ttl(self) -> float:
        """The lease, in seconds."""
        return self._session.ttl

    @property
    def is_lost(self) -> bool:
        """Whether the session was lost (its lease ran out unrenewed)."""
        return self._session.is_lost

    @property
    def expires_in(self) -> Optional[float]:
        """Seconds until the lease certainly runs out unless renewed
        (renewal is automatic); ``None`` where the store has no lease."""
        return self._session.expires_in

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        try:
            self.close()
        except Error:
            if kind is None:
                raise


class _Opening:
    """An asyncio request that is both awaitable (for the object) and an
    ``async with`` (entered: the object; left: released or closed)."""

    __slots__ = ("_start", "_held")

    def __init__(self, start) -> None:
        self._start = start
        self._held = None

    def __await__(self):
        return self._start().__await__()

    async def __aenter__(self):
        if self._held is not None:
            raise RuntimeError("this request was entered already: make one per async with")
        self._held = await self._start()
        return self._held

    async def __aexit__(self, kind, value, traceback) -> None:
        await self._held.__aexit__(kind, value, traceback)


class AsyncClient:
    """A connection to a store, for asyncio; see :class:`Client`."""

    __slots__ = ("_client",)

    def __init__(self, client: _native.Client) -> None:
        self._client = client

    def session(
        self,
        ttl: Optional[float] = None,
        *,
        lock_delay: Optional[float] = None,
        max_hold: Optional[float] = None,
        owner: Optional[str] = None,
        max_keys: Optional[int] = None,
    ) -> _Opening:
        """Opens a session (``await`` it, or ``async with`` it to close it
        on the way out); see :meth:`Client.session`."""

        async def start() -> AsyncSession:
            native = await self._client.open_session_async(
                ttl, lock_delay, max_hold, owner, max_keys
            )
            return AsyncSession(native)

        return _Opening(start)

    async def leader(self, name: str) -> Optional[Leader]:
        """Who leads election ``name`` now, or ``None``."""
        return await self._client.leader_async(name)

    async def observe(self, name: str, every: Optional[float] = None):
        """Each change of election ``name``'s leader, as an async iterator;
        see :meth:`Client.observe`."""
        observer = self._client.observe(name, every)
        while True:
            yield await observer.next_async()

    @property
    def capabilities(self) -> dict:
        return self._client.capabilities()


class AsyncSession:
    """A session, for asyncio; see :class:`Session`. The lock requests are
    awaitable (``g = await s.lock(k)``) and ``async with`` blocks."""

    __slots__ = ("_session",)

    def __init__(self, session: _native.Session) -> None:
        self._session = session

    def _request(self, key, mode, permits, wait) -> _Opening:
        async def start() -> AsyncGuard:
            return AsyncGuard(await self._session.acquire_async(key, mode, permits, wait, False))

        return _Opening(start)

    async def _try(self, key, mode, permits) -> Optional[AsyncGuard]:
        hold = await self._session.acquire_async(key, mode, permits, None, True)
        return None if hold is None else AsyncGuard(hold)

    def lock(self, key: str, wait: Optional[float] = None) -> _Opening:
        """Takes ``key`` exclusively; see :meth:`Session.lock`."""
        return self._request(key, "exclusive", None, wait)

    def read(self, key: str, wait: Optional[float] = None) -> _Opening:
        return self._request(key, "read", None, wait)

    def write(self, key: str, wait: Optional[float] = None) -> _Opening:
        return self._request(key, "write", None, wait)

    def semaphore(self, key: str, permits: int, wait: Optional[float] = None) -> _Opening:
        return self._request(key, "semaphore", permits, wait)

    async def try_lock(self, key: str) -> Optional[AsyncGuard]:
        return await self._try(key, "exclusive", None)

    async def try_read(self, key: str) -> Optional[AsyncGuard]:
        return await self._try(key, "read", None)

    async def try_write(self, key: str) -> Optional[AsyncGuard]:
        return await self._try(key, "write", None)

    async def try_semaphore(self, key: str, permits: int) -> Optional[AsyncGuard]:
        return await self._try(key, "semaphore", permits)

    def lock_all(self, keys: Iterable[KeySpec], wait: Optional[float] = None) -> _Opening:
        """Takes every key or none; see :meth:`Session.lock_all`."""
        keys = _keys(keys)

        async def start() -> AsyncMultiGuard:
            return AsyncMultiGuard(await self._session.acquire_all_async(keys, wait, False))

        return _Opening(start)

    async def try_lock_all(self, keys: Iterable[KeySpec]) -> Optional[AsyncMultiGuard]:
        hold = await self._session.acquire_all_async(_keys(keys), None, True)
        return None if hold is None else AsyncMultiGuard(hold)

    def elect(self, name: str, value: str, wait: Optional[float] = None) -> _Opening:
        """Campaigns in election ``name``; see :meth:`Session.elect`."""

        async def start() -> AsyncLeadership:
            return AsyncLeadership(await self._session.campaign_async(name, value, wait))

        return _Opening(start)

    async def close(self) -> None:
        """Ends the session, releasing what it holds."""
        await self._session.close_async()

    @property
    def ttl(self) -> float:
        return self._session.ttl

    @property
    def is_lost(self) -> bool:
        return self._session.is_lost

    @property
    def expires_in(self) -> Optional[float]:
        return self._session.expires_in

    async def __aenter__(self) -> "AsyncSession":
        return self

    async def __aexit__(self, kind, value, traceback) -> None:
        try:
            await self.close()
        except Error:
            if kind is None:
                raise

