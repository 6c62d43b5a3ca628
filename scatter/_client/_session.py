"""What this process has seen of the registry: read your writes, on any node.

Bayou's session guarantee, with the process as the session: a change made through one
node (a scatter, a set publish, a rollback, a vaporize) is seen by every later read of
every client in this process, through any node of the cluster. Each reply to a change
carries the node's registry clock after it (``Published.clock``, ``Moved.clock``); the
session keeps their merge. A read sends that clock to a node not known to hold all of
it, and the node answers once it does (it pulls what it lacks; ``_core/_node.py``, rule
8), or after its ``read_wait`` with what it holds. Calls go to workers, which cannot
wait: a ``CatchUp`` to the node goes first, once per node and per new clock.

Reads do not feed the clock (this is read your writes, not monotonic reads): a node
cut off from a change this process never made never makes its reads wait.

A forked child keeps its parent's clock (it has seen what its parent saw) and gets a
lock of its own (``_fork.py``). Processes started otherwise begin with an empty clock.
"""

from __future__ import annotations

import threading

from .._core._vclock import VectorClock

# Seconds a call lets a node catch up before it is sent: the node's own bound
# (NodeConfig.read_wait, 2 s by default) or half the call's timeout, whichever is less.
CATCH_UP_SHARE = 0.5


class Session:
    """The merge of every registry clock this process's changes were answered with.

    ``generation`` counts the times the clock grew: a connection to a node remembers the
    generation that node has been seen to hold, so the hot path compares two ints.
    ``state`` is ``(generation, clock)``, replaced whole (a read of it is atomic).
    """

    __slots__ = ("_lock", "generation", "state")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.generation = 0
        self.state: tuple[int, VectorClock] = (0, VectorClock())

    def saw(self, clock: VectorClock) -> None:
        """Merge the clock a reply to one of this process's changes carried."""
        with self._lock:
            generation, mine = self.state
            if mine.dominates(clock):
                return
            self.state = (generation + 1, mine.merge(clock))
            self.generation = generation + 1

    def after_fork_in_child(self) -> None:
        """A lock of the child's own; the clock stays (the child saw what its parent saw)."""
        self._lock = threading.Lock()


SESSION = Session()
