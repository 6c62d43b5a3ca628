"""The module-level API over a default client: what the seed's notebook calls.

The default client is made on first use from ``SCATTER_ADDRESS`` (or the default
address) and may be replaced with :func:`connect`. Every function takes ``address=`` to
talk to another node without changing the default.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar, overload

import msgspec

from ._client import Client, RemoteFunction
from ._client._calls import UnpickledRemoteFunction
from ._core._registry import FunctionInfo, VersionInfo, check_name
from ._exceptions import ConfigError
from ._publish import without_output_capture

F = TypeVar("F", bound=Callable[..., Any])

_lock = threading.Lock()
_default: Client | None = None
_by_address: dict[str, Client] = {}  # {address: client} for calls with address=
_tcp_by_address: dict[str, Client] = {}  # for unpickled callables of transport="tcp" clients
# {(address, transport, name, version, content id): callable} rebuilt from pickles:
# multiprocessing unpickles the function once per task.
_unpickled: dict[tuple[str, str, str, int | None, str], RemoteFunction] = {}


def _new_lock_in_child() -> None:
    # A thread of the parent may have held it at the fork: the child would wait forever.
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_in_child)


def connect(
    address: str | Sequence[str] | None = None, *, autostart: bool | None = None
) -> Client:
    """Point this process's default client at ``address`` and return it.

    Several addresses (a list, or one string with commas) are members of one cluster: the
    client uses the first that answers and fails over to another live member when its
    node is unreachable (see ``Client``); it never auto-starts a node.

    Example::

        scatter.connect("tcp://127.0.0.1:5000")
        scatter.connect(["tcp://10.0.0.1:4242", "tcp://10.0.0.2:4242"])
    """
    global _default
    client = Client(address, autostart=autostart)
    with _lock:
        previous, _default = _default, client
    if previous is not None:
        previous.close()
    return client


def remote_function_by_reference(
    address: str,
    transport: Literal["auto", "tcp"],
    name: str,
    version: int | None,
    content_id: str,
) -> RemoteFunction:
    """A pickled ``RemoteFunction`` in this process (``RemoteFunction.__reduce__``).

    It talks to the same node through this process's own client (the default one when
    the address and transport are the same, else one per address), with this process's
    secret. It describes its version at first use, not here, so unpickling never fails.
    """
    global _default
    key = (address, transport, name, version, content_id)
    with _lock:
        found = _unpickled.get(key)
        if found is not None and not found._client.closed:
            return found
        if _default is None and address == Client.default_address():
            _default = Client()
        if (
            _default is not None
            and not _default.closed
            and _default.address == address
            and _default.transport == transport
        ):
            client = _default
        else:
            clients = _by_address if transport == "auto" else _tcp_by_address
            client = clients.get(address)  # type: ignore[assignment]
            if client is None or client.closed:
                client = clients[address] = Client(address, transport=transport)
        remote = _unpickled[key] = UnpickledRemoteFunction(
            client, name, version, content_id=content_id, lazy=True
        )
        return remote


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
    *,
    name: str | None = None,
    address: str | None = None,
    timeout: float | None = None,
    capture_output: bool = True,
) -> Callable[[F], F]: ...
def scatter(
    fn: Any = None,
    /,
    *,
    name: str | None = None,
    address: str | None = None,
    timeout: float | None = None,
    capture_output: bool = True,
) -> Any:
    """Ship a type-annotated function to a node: it becomes a new version there.

    The decorated function is returned unchanged and still works locally. Scattering a
    body identical to the current version changes nothing.

    Args:
        name: the name callers use (default: the function's ``__name__``). Function and
            set names are Python identifiers (not keywords) of 1 to 128 characters.
        address: the node to ship to (default: the default client's).
        timeout: this function's call timeout in seconds (default: the node's).
        capture_output: what a call prints (stdout, stderr, logging) is printed on its
            caller, each line behind ``(name pid=N)``; False drops it (never logged).

    Raises:
        NotScatterable: the function lacks annotations, is a generator not annotated Iterator[T], ...
        ConfigError: ``name`` breaks the name rule (``""`` included); TypeError if it is
            not a str. Both before anything is sent.

    Example::

        @scatter
        def add(a: int, b: int) -> int:
            return a + b
    """

    def ship(function: F) -> F:
        _client(address).publish(
            function, name=name, timeout=timeout, capture_output=capture_output
        )
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


class FunctionSet:
    """A named set of related functions, published, rolled back and removed as one.

    One ``publish()`` is one registry change, atomic on every node: no node ever serves a
    mix of old and new members. The set has its own version history; functions left out
    of a new set version stop answering by name (pinned callables keep working) until a
    rollback brings them back.

    Example::

        billing = scatter.FunctionSet("billing")

        @billing.function
        def charge(account: str, cents: int) -> str: ...

        @billing.function
        def refund(account: str, cents: int) -> str: ...

        billing.publish()          # version 1 of the set, both functions at once
        scatter.rollback("billing")
        scatter.vaporize("billing")
    """

    def __init__(self, name: str, *, address: str | None = None) -> None:
        self.name = check_name(name)  # refused here, not at the first publish()
        self.address = address
        # {member name: (function, explicit name or None, timeout)}, in the order added
        self._members: dict[str, tuple[Callable[..., Any], str | None, float | None]] = {}

    @overload
    def function(self, fn: F, /) -> F: ...
    @overload
    def function(
        self,
        /,
        *,
        name: str | None = None,
        timeout: float | None = None,
        capture_output: bool = True,
    ) -> Callable[[F], F]: ...
    def function(
        self,
        fn: Any = None,
        /,
        *,
        name: str | None = None,
        timeout: float | None = None,
        capture_output: bool = True,
    ) -> Any:
        """Add a member (not shipped until :meth:`publish`). Returns the function unchanged.

        Raises:
            ConfigError, TypeError: ``name`` breaks the name rule (see ``@scatter``).
        """
        if name is not None:
            check_name(name)  # "" is refused, never replaced by the function's name

        def add(member_function: F) -> F:
            # A default name that breaks the rule (a lambda's) is refused by publish(),
            # with the other reasons a function cannot be scattered.
            member = name if name is not None else str(getattr(member_function, "__name__", ""))
            shipped = member_function if capture_output else without_output_capture(member_function)
            self._members[member] = (shipped, name, timeout)
            return member_function

        return add if fn is None else add(fn)

    @property
    def members(self) -> list[str]:
        return list(self._members)

    def publish(self) -> int:
        """Ship every member as one new version of the set; returns the set's version.

        Publishing the same members again changes nothing and returns the current version.
        """
        if not self._members:
            raise ConfigError(f"function set {self.name!r} has no members; add some with @.function")
        members = list(self._members.values())
        return _client(self.address).publish_set(self.name, members).version
