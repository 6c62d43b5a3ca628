"""The client: control requests to a node, calls straight to the node's workers.

``Client`` is blocking and never starts an event loop, so it works the same from a
script, from threads and from inside a running loop (a Jupyter kernel). Async callers
use ``RemoteFunction.call_async``: under trio or asyncio the loop waits on the worker
connection's socket (its edge-triggered fd, EVENTS read first); only taking a new
connection from the node runs in a worker thread.

One job per module, as httpx keeps its client, transports and pool apart:

- ``_client.py``: ``Client``, the node's operations; it composes the three below.
- ``_control.py``: control requests to the node (one socket per thread, a wrong secret
  told apart from silence) and ``error_from_failure``.
- ``_connections.py``: ``WorkerConnection`` to a leased worker, and the bounded pool of them.
- ``_calls.py``: the call path: ``RemoteFunction`` and ``CallSender`` (sync, async, map),
  and a generator function's ``RemoteStream`` / ``AsyncRemoteStream``.
- ``_remote_errors.py``: a function's exception, as an instance of its own class.
- ``_routes.py``: calls a worker of the client's node refused unrun, sent through a
  route to a member that can run them (directly to its worker, or relayed by the node).
- ``_session.py``: the registry clock this process has seen (read your writes).
- ``_callid.py``: call ids unique in the cluster (at most once).
- ``_polling.py``: ``ReplyPolling``, whether a sync caller polls before it sleeps.
- ``_autostart.py``: a detached node for a client that finds none on loopback.
- ``_fork.py``: a forked child drops its parent's connections (an at-fork hook).

Sockets are never shared between threads at the same time: control requests use one
DEALER per thread; calls check a worker connection out of the pool and put it back.
"""

from ._autostart import start_background_node as start_background_node
from ._calls import (
    AsyncRemoteStream as AsyncRemoteStream,
    RemoteFunction as RemoteFunction,
    RemoteStream as RemoteStream,
)
from ._client import Client as Client
from ._connections import (
    _IDLE_CHECK_AFTER as _IDLE_CHECK_AFTER,
    ClientStatistics as ClientStatistics,
    WorkerConnection as WorkerConnection,
)
from ._control import error_from_failure as error_from_failure
from ._polling import ReplyPolling as ReplyPolling
