"""``Client``: the node's operations, over its control requests and its call path."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Literal

import zmq

from .. import _wire
from .._config import resolve_client_config
from .._core._registry import check_name
from .._exceptions import ConfigError
from . import _callid, _fork
from ._calls import CallSender, RemoteFunction
from ._connections import DEFAULT_MAX_CONNECTIONS, ClientStatistics, ConnectionPool
from ._control import NodeControl
from ._routes import RouteMode, Routes


class Client:
    """A blocking client of one node, and through it of its cluster.

    Args:
        address: the node's address, such as ``tcp://127.0.0.1:4242``; default
            ``SCATTER_ADDRESS``, else this user's own (``tcp://127.0.0.1:4242`` for root,
            see ``default_address``). Several (a list, or one string with commas): members
            of one cluster, the first used first.
        autostart: start a detached local node when none answers (default: on, unless
            ``SCATTER_AUTOSTART=0``, the address is not on loopback, or several are given).

    A client that does not auto-start its node learns the member list from it (and
    refreshes it every few seconds of control requests). When its node is unreachable
    before a request was delivered (nothing listens, no handshake), it fails over to
    another live member, for control requests, leases and calls alike, and logs it once
    (logger ``scatter.client``). A request that may have reached the node gone is never
    sent again: a call raises (``WorkerCrashed``, ``Unreachable``), a change says it may
    have been made. Callables keep working across a failover. ``address_in_use`` and
    ``members()`` say which member the client uses.
        secret: the cluster secret, or a call-only one (``scatter secret call-only``);
            default ``SCATTER_SECRET``, else the secret this user's local nodes share.
        transport: ``"auto"`` (default) reaches a worker on the node's machine through
            its Unix socket, else its TCP endpoint (CURVE); ``"tcp"`` always takes TCP,
            for a client that shares the node's loopback but not its files (a
            container), or to measure what CURVE costs. A Unix socket this process
            cannot use (another container, another uid) falls back to TCP by itself.
        max_connections: worker connections this client keeps open at most (each holds
            a worker lease and three zmq sockets); calls beyond wait for one to come back.
        routes: how calls the node cannot run reach the member that can (``_routes.py``):
            ``"auto"`` (default) straight to the member's worker, or relayed by the
            node once that worker proved unreachable from here; ``"direct"`` never
            relayed; ``"relay"`` always relayed (a client that cannot reach members).

    Forking is safe: a forked child drops the parent's connections and opens its own.
    A callable made by a client pickles by reference (name, pinned version, address,
    transport; never the secret), so ``multiprocessing`` can send it to other processes.

    Example::

        client = scatter.Client("tcp://127.0.0.1:4242")
        add = client.make_callable("add")
        add(1, 2)
    """

    def __init__(
        self,
        address: str | Sequence[str] | None = None,
        *,
        autostart: bool | None = None,
        secret: str | None = None,
        transport: Literal["auto", "tcp"] = "auto",
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        routes: RouteMode = "auto",
    ) -> None:
        if transport not in ("auto", "tcp"):
            raise ConfigError(f"transport must be 'auto' or 'tcp', not {transport!r}")
        if not isinstance(max_connections, int) or isinstance(max_connections, bool) or max_connections < 1:
            raise ConfigError(
                f"max_connections must be a positive number of connections, not {max_connections!r}"
            )
        if routes not in ("auto", "direct", "relay"):
            raise ConfigError(f"routes must be 'auto', 'direct' or 'relay', not {routes!r}")
        config = resolve_client_config(address, secret=secret)
        if autostart is not None:
            # Several addresses are a cluster's: never a node started for them.
            config = dataclasses.replace(config, autostart=autostart and len(config.addresses) < 2)
        self.config = config
        # The addresses given, as one string (a callable pickles it, and its process makes
        # a client of the same members); the member in use: ``address_in_use``.
        self.address = ",".join(config.addresses) if config.addresses else config.address
        self.transport = transport
        self._context: zmq.Context[Any] = zmq.Context()
        ids = _callid.ids  # the process's: (caller id, id) names a call in the cluster
        self._control = NodeControl(config, self._context, ids)
        self._pool = ConnectionPool(self._control, self._context, transport, max_connections)
        self._sender = CallSender(self._pool, ids)
        self._ids = ids
        self._max_connections = max_connections
        self._routes = Routes(self._route_sender, routes)
        weakref.finalize(self, _release_all, self._pool, self._control, self._routes)
        _fork.track(self)

    def request(self, make: Callable[[int], Any], timeout: float | None = None) -> Any:
        """Send one control request (built by ``make(request_id)``) and return its reply."""
        return self._control.request(make, timeout)

    # -- the public operations --

    def publish(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        timeout: float | None = None,
        capture_output: bool = True,
    ) -> _wire.Published:
        from .._publish import prepare_publish, too_large_to_ship

        fields = prepare_publish(fn, name=name, timeout=timeout, capture_output=capture_output)
        published: _wire.Published = self._control.request(
            lambda i: _wire.Publish(id=i, **fields),
            too_large=lambda size: too_large_to_ship([fields], size),
        )
        return published

    def publish_set(
        self, name: str, members: list[tuple[Callable[..., Any], str | None, float | None]]
    ) -> _wire.Published:
        """Publish ``members`` (function, name, timeout) as the complete new version of a set."""
        from .._publish import prepare_publish, too_large_to_ship

        check_name(name)
        prepared = [
            prepare_publish(fn, name=member_name, timeout=timeout)
            for fn, member_name, timeout in members
        ]
        requests = [_wire.Publish(id=0, **fields) for fields in prepared]
        published: _wire.Published = self._control.request(
            lambda i: _wire.PublishSet(i, name, requests),
            too_large=lambda size: too_large_to_ship(prepared, size, set_name=name),
        )
        return published

    def describe(self, name: str, version: int | None = None, *, source: bool = False) -> _wire.Description:
        description: _wire.Description = self.request(
            lambda i: _wire.Describe(i, name, version or 0, source)
        )
        return description

    def current_version(self, name: str) -> int:
        moved: _wire.Moved = self.request(lambda i: _wire.CurrentVersion(i, name))
        return moved.version

    def rollback(self, name: str, to: int | None = None) -> int:
        moved: _wire.Moved = self.request(lambda i: _wire.Rollback(i, name, to))
        return moved.version

    def vaporize(self, name: str) -> None:
        self.request(lambda i: _wire.Vaporize(i, name))

    def versions(self, name: str) -> list[dict[str, Any]]:
        listing: _wire.Listing = self.request(lambda i: _wire.ListVersions(i, name))
        return listing.rows

    def functions(self) -> list[dict[str, Any]]:
        listing: _wire.Listing = self.request(lambda i: _wire.ListFunctions(i))
        return listing.rows

    def status(self) -> _wire.NodeStatus:
        status: _wire.NodeStatus = self.request(lambda i: _wire.Status(i))
        return status

    def leave(self) -> None:
        """Make the node leave its cluster for good, then stop: once a live member holds
        every change it holds, the members forget it. Raises if none takes them in time
        (the node then stays, as it was)."""
        # The node answers once a member holds its changes, or after 10 s + 2 s at most
        # (LEAVE_HANDOVER_TIMEOUT, LEAVE_GOODBYE_WAIT in _core/_node.py).
        self.request(lambda i: _wire.Leave(i), timeout=30.0)

    def forget(self, nodes: list[str]) -> None:
        """Make the node forget members (node ids) that crashed and whose data
        directories are gone, for good: a registry change every member applies. Refused
        (ConfigError, saying why) unless each is dead or left and every other member is
        alive here and applies forgets."""
        self.request(lambda i: _wire.Forget(i, list(nodes)))

    def members(self) -> list[dict[str, Any]]:
        """The members the node knows: node, address, state, incarnation, changes_behind,
        and ``in_use``: True for the member this client uses (the node that answered)."""
        status = self.status()
        return [dict(member, in_use=member["node"] == status.node_id) for member in status.members]

    @property
    def address_in_use(self) -> str:
        """The member this client talks to now: the first address given, until a
        failover (``failed_over_from`` then names the one it left)."""
        return self._control.address

    @property
    def failed_over_from(self) -> str:
        """The address of the member this client last failed over from ("" if none)."""
        return self._control.failed_over_from

    def shutdown(self) -> None:
        """Stop the node this client talks to."""
        self.request(lambda i: _wire.Shutdown(i))

    def make_callable(self, name: str, version: int | None = None) -> RemoteFunction:
        return RemoteFunction(self, name, version)

    def statistics(self) -> ClientStatistics:
        """Counters of this client's worker connections."""
        return self._pool.statistics()

    def _route_sender(self, lease: Callable[[int], _wire.Lease]) -> CallSender:
        """The sender of a route (``_routes.py``): its own pool, whose leases ask for a
        worker that can run one function."""
        pool = ConnectionPool(
            self._control, self._context, self.transport, self._max_connections, lease
        )
        return CallSender(pool, self._ids)

    @staticmethod
    def default_address() -> str:
        """The address a ``Client()`` given none talks to (``SCATTER_ADDRESS``, else this
        user's own)."""
        return resolve_client_config().address

    # -- lifecycle --

    @property
    def closed(self) -> bool:
        return self._control.closed

    def close(self) -> None:
        """Release leases and sockets (never starting a node to tell it). Callables made
        by this client stop working."""
        if self._control.closed:
            return
        self._pool.release_leases()
        for pool in self._routes.pools():
            pool.release_leases()
        _release_all(self._pool, self._control, self._routes)

    def forget_parent_connections(self) -> None:
        """In a forked child (``_fork.py`` calls it): a context and sockets of its own."""
        self._context = zmq.Context()
        self._control.forget_parent_connections(self._context)
        self._pool.forget_parent_connections(self._context)
        for pool in self._routes.pools():
            pool.forget_parent_connections(self._context)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _release_all(pool: ConnectionPool, control: NodeControl, routes: Routes) -> None:
    # Also the finalizer of a client nobody closed: it must not hold the client itself.
    # The context is the control's own (a forked child has made itself a new one).
    context = control.context
    control.close()  # first: a connection checked in from now on is closed, not kept
    pool.close()
    for route_pool in routes.pools():
        route_pool.close()
    context.destroy(linger=0)
