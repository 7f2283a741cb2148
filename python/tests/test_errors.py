"""Bad input and dead servers: the exception of the error's kind, with the
Rust core's message saying what to do."""

import socket

import pytest

import distlock


def _dead_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_bad_url_is_a_config_error():
    with pytest.raises(distlock.ConfigError, match="unknown store URL scheme 'bogus://'") as err:
        distlock.connect("bogus://somewhere")
    assert isinstance(err.value, ValueError) and isinstance(err.value, distlock.Error)
    with pytest.raises(distlock.ConfigError):
        distlock.connect("redis://127.0.0.1:notaport")


@pytest.mark.parametrize("scheme", ["distlock", "redis", "postgres"])
def test_a_dead_server_is_unavailable(scheme):
    url = f"{scheme}://127.0.0.1:{_dead_port()}"
    if scheme == "postgres":
        url = f"postgres://postgres:pw@127.0.0.1:{_dead_port()}/postgres"
    with pytest.raises(distlock.Unavailable) as err:
        distlock.connect(url).session(ttl=5)
    assert isinstance(err.value, ConnectionError)
    assert "127.0.0.1" in str(err.value), str(err.value)


def test_an_over_long_or_empty_key_is_invalid(client):
    with client.session() as session:
        with pytest.raises(distlock.InvalidKey, match="1 to 1024 bytes"):
            session.lock("k" * 1025)
        with pytest.raises(distlock.InvalidKey):
            session.try_lock("")


def test_conflicting_modes_in_one_session_are_a_conflict(client, key):
    if not client.capabilities["shared"]:
        pytest.skip("no read/write locks")
    with client.session() as session:
        with session.read(key):
            with pytest.raises(distlock.Conflict):
                session.write(key, wait=1)


def test_bad_arguments_are_value_errors(client, key):
    with client.session() as session:
        with pytest.raises(ValueError, match="wait must be a number of seconds from 0"):
            session.lock(key, wait=-1)
        with pytest.raises(ValueError, match="ttl"):
            client.session(ttl=float("nan"))
    with pytest.raises(distlock.Error, match="empty|no keys|at least one"):
        client.session().lock_all([])
    with pytest.raises(distlock.Error, match="twice|more than once|duplicate"):
        client.session().lock_all([key, key])


def test_a_closed_session_says_so(client, key):
    session = client.session()
    session.close()
    with pytest.raises(distlock.Closed, match="closed"):
        session.lock(key)


def test_what_a_store_cannot_do_is_unsupported(client, key):
    if client.capabilities["semaphore"]:
        pytest.skip("the store has semaphores")
    with client.session() as session:
        with pytest.raises(distlock.Unsupported):
            session.semaphore(key, 2)
