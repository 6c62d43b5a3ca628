"""Call ids unique in the cluster (at most once): this process's caller id and counter.

A call is named by ``(caller, id)``: ``caller`` is 8 random bytes drawn when this module
is imported and again in every forked child (a child continues its parent's counter, so
its own caller id keeps the pair unique), ``id`` the process's counter, shared by every
client of the process (their control requests draw from it too). Workers and relays
remember the pairs they saw lately and never run one twice (``_node/_worker.py``
``AtMostOnce``). 64 random bits: two processes of a cluster share a caller id with odds
of about n^2 / 2^65 for n processes.
"""

from __future__ import annotations

import itertools
import os

# This process's caller id; replaced in a forked child (``_fork.py``). Read it through
# the module (``_callid.caller``), never bind it: a child's must be its own.
caller: bytes = os.urandom(8)
# The process's ids: calls and control requests of every client draw from it.
ids = itertools.count(1)


def after_fork_in_child() -> None:
    global caller
    caller = os.urandom(8)
