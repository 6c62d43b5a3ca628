"""Nox sessions for Scatter.

``nox -s tests`` and ``nox -s lint`` run by default; ``nox -s bench -- --quick`` is a short
benchmark run (the full one takes minutes); ``nox -s bench-cluster`` measures a 5-node cluster.
"""

import nox

nox.options.sessions = ["tests", "lint"]


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite: real node processes on loopback ports."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over everything, mypy over the package."""
    session.install("-e", ".[lint]")
    session.run("ruff", "check", "scatter", "cluster", "tests", "examples", "noxfile.py")
    session.run("mypy", "scatter")


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Scatter vs raw pyzmq REQ/REP and zeroapi: a table, PASS/FAIL targets, bench-results.json.

    Not a default session: it takes minutes (under 90 s with ``-- --quick``).
    """
    # zeroapi is only a point of comparison: installed here, never a dependency of Scatter.
    session.install(".", "zeroapi==1.0.1")
    session.run("python", "cluster/bench.py", *session.posargs)


@nox.session(name="bench-cluster", default=False)
def bench_cluster(session: nox.Session) -> None:
    """A 5-node loopback cluster: propagation, failure detection, idle digest bytes.

    Not a default session: about 3 minutes (``-- --trials 3 --updates 20`` for a short look).
    Writes a table, PASS/FAIL target lines and bench-results-cluster.json.
    """
    session.install(".")
    session.run("python", "cluster/bench_cluster.py", *session.posargs)
