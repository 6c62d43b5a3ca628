"""Fork safety: a forked child never touches its parent's zmq context or sockets.

pyzmq's rule is that a context must not cross ``fork``: the child has none of the
parent's I/O threads, so a parent socket used there waits forever. As urllib3's and
httpx's pools do, every client drops its connections in the child the moment it is
forked (``os.register_at_fork``), without closing them (pyzmq leaves another process's
sockets alone), so the child's next call opens fresh ones. The hot path pays nothing:
no ``os.getpid()`` per call, only the hook below, run once per fork.
"""

from __future__ import annotations

import os
import weakref
from typing import Protocol

from . import _callid
from ._session import SESSION


class _ForkAware(Protocol):
    def forget_parent_connections(self) -> None: ...


_clients: weakref.WeakSet[_ForkAware] = weakref.WeakSet()


def track(client: _ForkAware) -> None:
    """Have ``client`` drop its parent's connections in every forked child."""
    _clients.add(client)


def _after_fork_in_child() -> None:
    # The clock this process has seen stays (the child saw what its parent saw); its
    # lock may have been held by a parent thread that does not exist here.
    SESSION.after_fork_in_child()
    # The child continues its parent's call ids: a caller id of its own keeps them unique.
    _callid.after_fork_in_child()
    for client in list(_clients):
        client.forget_parent_connections()


os.register_at_fork(after_in_child=_after_fork_in_child)
