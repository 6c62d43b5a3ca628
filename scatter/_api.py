"""The module-level API over a default client: what the seed's notebook calls.

The default client is made on first use from ``SCATTER_ADDRESS`` (or the default
address) and may be replaced with :func:`connect`. Every function takes ``address=`` to
talk to another node without changing the default.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar, overload

import msgspec

from ._client import Client, RemoteFunction
from ._core._registry import FunctionInfo, VersionInfo

F = TypeVar("F", bound=Callable[..., Any])

_lock = threading.Lock()
_default: Client | None = None
_by_address: dict[str, Client] = {}  # {address: client} for calls with address=


def connect(address: str | None = None, *, autostart: bool | None = None) -> Client:
    """Point this process's default client at ``address`` and return it.

    Example::

        scatter.connect("tcp://127.0.0.1:5000")
    """
    global _default
    client = Client(address, autostart=autostart)
    with _lock:
        previous, _default = _default, client
    if previous is not None:
        previous.close()
    return client


def _client(address: str | None = None) -> Client:
    global _default
    with _lock:
        if address is not None:
            client = _by_address.get(address)
            if client is None:
                client = _by_address[address] = Client(address)
            return client
        if _default is None:
            _default = Client()
        return _default


@overload
def scatter(fn: F, /) -> F: ...
@overload
def scatter(
    *, name: str | None = None, address: str | None = None, timeout: float | None = None
) -> Callable[[F], F]: ...
def scatter(
    fn: Any = None,
    /,
    *,
    name: str | None = None,
    address: str | None = None,
    timeout: float | None = None,
) -> Any:
    """Ship a type-annotated function to a node: it becomes a new version there.

    The decorated function is returned unchanged and still works locally. Scattering a
    body identical to the current version changes nothing.

    Args:
        name: the name callers use (default: the function's ``__name__``).
        address: the node to ship to (default: the default client's).
        timeout: this function's call timeout in seconds (default: the node's).

    Raises:
        NotScatterable: the function lacks annotations, is a generator, ...

    Example::

        @scatter
        def add(a: int, b: int) -> int:
            return a + b
    """

    def ship(function: F) -> F:
        _client(address).publish(function, name=name, timeout=timeout)
        return function

    if fn is None:
        return ship
    return ship(fn)


def make_callable(
    name: str, version: int | None = None, *, address: str | None = None
) -> RemoteFunction:
    """A callable for the function ``name``, with its signature, name and docstring.

    Args:
        version: pin this version; default: follow the current one.

    Raises:
        FunctionNotFound, VersionNotFound: nothing to call by that name or version.
    """
    return _client(address).make_callable(name, version)


def current_version(name: str, *, address: str | None = None) -> int:
    """The version a call of ``name`` would run now."""
    return _client(address).current_version(name)


def rollback(name: str, to: int | None = None, *, address: str | None = None) -> int:
    """Make the previous (or the given) version current again; returns it."""
    return _client(address).rollback(name, to)


def vaporize(name: str, *, address: str | None = None) -> None:
    """Delete the function (or set) and all its versions. Its numbers are never reused."""
    _client(address).vaporize(name)


def versions(name: str, *, address: str | None = None) -> list[VersionInfo]:
    """The history of ``name``: number, content id, who, when, signature, current, conflicts."""
    return msgspec.convert(_client(address).versions(name), list[VersionInfo])


def functions(*, address: str | None = None) -> list[FunctionInfo]:
    """Every live function on the node, with its current version and signature."""
    return msgspec.convert(_client(address).functions(), list[FunctionInfo])
