"""Fencing: the resource itself refuses a holder whose lock has moved on.

A lock cannot stop a holder that paused (a GC pause, ``SIGSTOP``, a slow
disk) past its lease and then writes as if it still held the lock. Every
guard carries a fencing token strictly greater than the tokens of every
earlier holder of its key; a resource that remembers the highest token it
accepted, and refuses lower ones, is safe even then.

In SQL, keep the token of the last change in a column of the row the lock
protects and make every write conditional on it::

    with session.lock(f"coupon/{cid}") as g, db:
        if not distlock.fence.update(db.cursor(), "coupons", "state = ?", "id = ?",
                                     g.token, set_params=["frozen"], where_params=[cid]):
            raise distlock.Lost("the lock passed on")  # the transaction rolls back

``update`` and ``claim`` work with any DB-API 2.0 cursor whose ``rowcount``
counts the rows matched; give the driver's ``placeholder`` (``"?"`` for
sqlite3, ``"%s"`` for psycopg). PyMySQL and mysqlclient count the rows
*changed* unless the connection is made with
``client_flag=CLIENT.FOUND_ROWS``: without it, a claim that writes the token
already there reads as stale.
A service keeps a :class:`Fence` per key and sends every request through
:meth:`Fence.admit`, clients sending their token in :data:`HTTP_HEADER`.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

__all__ = ["HTTP_HEADER", "sql_update", "sql_claim", "update", "claim", "Fence", "Stale"]

#: The HTTP header a client sends its fencing token in.
HTTP_HEADER = "Distlock-Fencing-Token"

#: The largest token a signed 64-bit SQL column holds.
_SQL_MAX = 2**63 - 1


def sql_update(table: str, assignments: str, condition: str, column: str, token: str) -> str:
    """The fenced form of an SQL ``UPDATE``: it changes the row only if the
    row's ``column`` is not above the token, and records the token there.
    ``token`` is the placeholder the token is bound to; it appears twice.

    >>> sql_update("coupons", "state = 'frozen'", "id = ?", "fence", "?")
    "UPDATE coupons SET state = 'frozen', fence = ? WHERE (id = ?) AND fence <= ?"
    """
    return (
        f"UPDATE {table} SET {assignments}, {column} = {token} "
        f"WHERE ({condition}) AND {column} <= {token}"
    )


def sql_claim(table: str, condition: str, column: str, token: str) -> str:
    """The fenced claim a critical section starts with: it records the token
    in the row's ``column`` if no higher token is there, so that no older
    holder can write between this section's read and its write.

    >>> sql_claim("coupons", "id = ?", "fence", "?")
    'UPDATE coupons SET fence = ? WHERE (id = ?) AND fence <= ?'
    """
    return f"UPDATE {table} SET {column} = {token} WHERE ({condition}) AND {column} <= {token}"


def _sql_token(token: int) -> int:
    if not 0 <= token <= _SQL_MAX:
        raise ValueError(f"fencing token {token} does not fit a signed 64-bit SQL column")
    return token


def update(
    cursor: Any,
    table: str,
    assignments: str,
    condition: str,
    token: int,
    *,
    set_params: Sequence[Any] = (),
    where_params: Sequence[Any] = (),
    column: str = "fence",
    placeholder: str = "?",
) -> bool:
    """Runs the fenced ``UPDATE`` of :func:`sql_update` on a DB-API cursor;
    ``set_params`` fill the placeholders of ``assignments``, ``where_params``
    those of ``condition``. Whether a row changed: ``False`` means the token
    is stale (or the condition failed): roll back, as the lock has passed
    on."""
    token = _sql_token(token)
    sql = sql_update(table, assignments, condition, column, placeholder)
    cursor.execute(sql, (*set_params, token, *where_params, token))
    return cursor.rowcount > 0


def claim(
    cursor: Any,
    table: str,
    condition: str,
    token: int,
    *,
    where_params: Sequence[Any] = (),
    column: str = "fence",
    placeholder: str = "?",
) -> bool:
    """Runs the fenced claim of :func:`sql_claim`: whether the row is now
    this holder's (``False``: a later holder has written it)."""
    token = _sql_token(token)
    sql = sql_claim(table, condition, column, placeholder)
    cursor.execute(sql, (token, *where_params, token))
    return cursor.rowcount > 0


class Stale(Exception):
    """A token lower than one the resource already accepted."""

    def __init__(self, token: int, highest: int) -> None:
        super().__init__(
            f"fencing token {token} is stale: the resource has accepted {highest}; "
            "the lock has passed on"
        )
        self.token = token
        self.highest = highest


class Fence:
    """The highest token a resource has accepted, in memory; thread safe."""

    def __init__(self) -> None:
        self._highest = 0
        self._lock = threading.Lock()

    def admit(self, token: int) -> None:
        """Accepts ``token`` if it is no lower than every token accepted
        before; :class:`Stale` if it is."""
        with self._lock:
            if token < self._highest:
                raise Stale(token, self._highest)
            self._highest = token

    @property
    def highest(self) -> int:
        """The highest token accepted so far (0 if none)."""
        return self._highest
