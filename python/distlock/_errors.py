"""The exceptions of distlock, one per kind of error of the Rust core."""


class Error(Exception):
    """Every distlock error. The message says what happened and what to do."""


class InvalidKey(Error, ValueError):
    """A key is empty, longer than 1024 bytes, or otherwise unusable."""


class Timeout(Error, TimeoutError):
    """A bounded wait ran out before the lock could be had."""


class Lost(Error):
    """The session or the lock was lost (lease expired, store said so)."""


class NotHeld(Error):
    """A release or check named a lock this session does not hold."""


class Conflict(Error):
    """The session already holds the key in a mode the request conflicts with."""


class Unavailable(Error, ConnectionError):
    """The store cannot be reached or is not answering."""


class ConfigError(Error, ValueError):
    """A URL, option or setting is wrong."""


class Unsupported(Error):
    """The store does not support what was asked (see its capabilities)."""


class StoreError(Error):
    """The store answered with an error of its own."""


class Closed(Error):
    """The session was closed."""
