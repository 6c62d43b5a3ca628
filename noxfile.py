"""Nox sessions for Scatter. ``nox -s bench -- --quick`` for a short benchmark run."""

import nox


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Scatter vs raw pyzmq REQ/REP and zeroapi: a table, PASS/FAIL targets, bench-results.json.

    Not a default session: it takes minutes (under 90 s with ``-- --quick``).
    """
    # zeroapi is only a point of comparison: installed here, never a dependency of Scatter.
    session.install(".", "zeroapi==1.0.1")
    session.run("python", "cluster/bench.py", *session.posargs)
