"""The stores the suite runs against, and a TCP proxy that can cut a
client off its store.

``DISTLOCK_TEST_URLS`` lists the stores' URLs, separated by spaces; the
Rust harness (``crates/distlock-cli/tests/python_package.rs``, run by
``./scripts/test``) starts a distlock server, Redis and PostgreSQL and
names them there. Without it the suite runs on ``memory://`` alone.
"""

import os
import socket
import threading
import time
import urllib.parse
import uuid

import pytest

import distlock

URLS = os.environ.get("DISTLOCK_TEST_URLS", "memory://pytest").split()


def _name(url):
    parsed = urllib.parse.urlsplit(url)
    return parsed.scheme + ("-lease" if "mode=lease" in parsed.query else "")


def pytest_generate_tests(metafunc):
    if "url" in metafunc.fixturenames:
        metafunc.parametrize("url", URLS, ids=[_name(url) for url in URLS])


@pytest.fixture
def key(request):
    """A key no other test uses."""
    return f"py/{request.node.name}/{uuid.uuid4().hex[:8]}"


@pytest.fixture
def client(url):
    return distlock.connect(url)


def needs(client, capability):
    if not client.capabilities[capability]:
        pytest.skip(f"{client.capabilities['name']} has no {capability}")


class Proxy:
    """Forwards a local port to ``target``; :meth:`pause` stops forwarding
    in both directions (the connections stay open, nothing gets through),
    as a network that stalls."""

    def __init__(self, host, port):
        self._target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._open = threading.Event()
        self._open.set()
        self._sockets = []
        threading.Thread(target=self._accept, daemon=True).start()

    def pause(self):
        self._open.clear()

    def resume(self):
        self._open.set()

    def close(self):
        self._open.set()
        for sock in [self._listener, *self._sockets]:
            try:
                sock.close()
            except OSError:
                pass

    def _accept(self):
        while True:
            try:
                near, _ = self._listener.accept()
            except OSError:
                return
            far = socket.create_connection(self._target)
            self._sockets += [near, far]
            for a, b in [(near, far), (far, near)]:
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source, sink):
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                data = b""
            while not self._open.is_set():
                time.sleep(0.01)
            try:
                if not data:
                    sink.shutdown(socket.SHUT_WR)
                    return
                sink.sendall(data)
            except OSError:
                return


@pytest.fixture
def proxied(url):
    """``url`` through a :class:`Proxy` (``None`` for a store of no TCP)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.port is None or "," in parsed.netloc:
        pytest.skip(f"{_name(url)} is not one TCP server")
    proxy = Proxy(parsed.hostname, parsed.port)
    netloc = parsed.netloc.rsplit("@", 1)
    netloc[-1] = f"127.0.0.1:{proxy.port}"
    yield proxy, urllib.parse.urlunsplit(parsed._replace(netloc="@".join(netloc)))
    proxy.close()
