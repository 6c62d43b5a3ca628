"""Nox sessions for Scatter.

``nox -s tests`` and ``nox -s lint`` run by default; ``nox -s bench -- --quick`` is a short
benchmark run (the full one takes minutes); ``nox -s fuzz -- --seconds 600`` fuzzes;
``nox -s bench-cluster`` measures a 5-node cluster; ``nox -s sim`` runs the simulators;
``nox -s chaos -- --minutes 10`` breaks a 5-node cluster on purpose and checks it.
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


@nox.session(default=False)
def sim(session: nox.Session) -> None:
    """The simulators: thousands of replication histories, and a 1,000-member cluster.

    ``-- --nodes N --seeds S --loss L`` are passed to ``python -m cluster.sim``.
    """
    session.install("-e", ".[test]")
    session.run(
        "python",
        "-m",
        "pytest",
        "tests/core/test_replication.py",
        "tests/core/test_read_your_writes.py",
        "tests/core/test_membership.py",
        "-q",
        env={"SCATTER_SIM_EXAMPLES": "3000"},
    )
    session.run(
        "python", "-m", "cluster.sim", *(session.posargs or ["--nodes", "1000", "--seeds", "3"])
    )


@nox.session(default=False)
def fuzz(session: nox.Session) -> None:
    """Coverage-guided fuzzing of decoders, node core, worker, registry and pool.

    ``nox -s fuzz -- --inputs 1000000`` or ``-- --seconds 600`` (``--target worker``,
    ``--workers 1``, ``--engine random``; see cluster/fuzz.py): one libFuzzer process per
    target, two at a time. Not a default session: without a bound it runs until told to
    stop. The test suite runs a short, bounded round of the same targets.
    """
    # atheris 3.1.0 has wheels for CPython 3.12+ only (no sdist); 3.0.0 is the last
    # release with a 3.11 wheel, and fuzzes the same way.
    session.install(
        "-e",
        ".",
        "atheris==3.0.0; python_version < '3.12'",
        "atheris==3.1.0; python_version >= '3.12'",
    )
    session.run("python", "-m", "cluster.fuzz", *session.posargs)


@nox.session(name="bench-cluster", default=False)
def bench_cluster(session: nox.Session) -> None:
    """A 5-node loopback cluster: propagation, failure detection, idle digest bytes.

    Not a default session: about 3 minutes (``-- --trials 3 --updates 20`` for a short look).
    Writes a table, PASS/FAIL target lines and bench-results-cluster.json.
    """
    session.install(".")
    session.run("python", "cluster/bench_cluster.py", *session.posargs)


@nox.session(default=False)
def chaos(session: nox.Session) -> None:
    """A 5-node cluster under faults, 3 writers and 3 callers, then a heal and a checker.

    ``-- --minutes M --seed S`` (see ``python -m cluster.chaos --help``). Network faults
    need root, nft and cgroup v2; without them only SIGKILL and SIGSTOP run; delay and
    reordering (a relay in the peers' path) need NAT in nftables and ``ss -K`` too. Clock
    jumps need libfaketime's bundled Linux library (installed here); elsewhere they are
    skipped.
    Not a default session: it runs for M minutes. Exits 1 on a violation; writes report.json.
    """
    # libfaketime: one node's wall clock moved at runtime (cluster/faketime.py)
    session.install("-e", ".", "libfaketime==3.0.1; sys_platform == 'linux'")
    session.run("python", "-m", "cluster.chaos", *session.posargs)
