"""A short round of cluster/fuzz.py's targets: a few thousand inputs, a few seconds.

Inputs are real frames (cluster/fuzz_corpus.py) with a few edits each, or raw bytes;
hypothesis picks the edits and shrinks a failure to the fewest. The harness raises on
anything that escapes a target, on a broken oracle (``Finding``), on an input slower than
``SECONDS_PER_INPUT`` and on one that allocates more than ``TRACED_PER_INPUT`` (traced
here with tracemalloc). The long, coverage-guided run is ``nox -s fuzz``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from cluster import fuzz, fuzz_corpus
from scatter._core._node import NodeCore, PersistViews
from scatter._core._registry import Registry
from scatter._exceptions import ProtocolError

SEEDS = fuzz_corpus.seeds()

# Inputs per target: about 10 s in all on a loaded 2-core machine, tracemalloc included.
EXAMPLES = {"decode": 1500, "node": 500, "worker": 800, "registry": 400, "pool": 800}


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[fuzz.Harness]:
    built = fuzz.Harness(tmp_path_factory.mktemp("fuzz"), traced=True)
    try:
        yield built
    finally:
        built.close()


def edit(data: bytes, edits: list[tuple[int, int, int, int]]) -> bytes:
    """Apply explicit edits (kind, position, byte, length): shrinkable, unlike a seed."""
    out = bytearray(data)
    for kind, position, value, length in edits:
        at = 1 + position % len(out) if len(out) > 1 else len(out)  # keep the target byte
        if kind == 0:
            out[at:at] = bytes([value]) * length
        elif kind == 1:
            del out[at : at + length]
        elif kind == 2 and at < len(out):
            out[at] = value
        elif kind == 3 and at < len(out):
            out[at] ^= 1 << (value % 8)
        elif kind == 4:
            out[at:at] = bytes([fuzz.INTERESTING[value % len(fuzz.INTERESTING)]])
        elif kind == 5:
            out[at:at] = out[at : at + length] * (1 + value % 8)
    return bytes(out[: fuzz.MAX_INPUT_BYTES])


def inputs(target: str) -> st.SearchStrategy[bytes]:
    index = fuzz.TARGETS.index(target)
    seeds = [s for s in SEEDS if s[0] % len(fuzz.TARGETS) == index]
    edits = st.lists(
        st.tuples(
            st.integers(0, 5), st.integers(0, 1 << 16), st.integers(0, 255), st.integers(1, 64)
        ),
        max_size=6,
    )
    mutated = st.builds(edit, st.sampled_from(seeds), edits)
    raw = st.binary(max_size=256).map(lambda data: bytes([index]) + data)
    return st.one_of(mutated, mutated, mutated, raw)


def _run(harness: fuzz.Harness, target: str) -> None:
    @settings(
        max_examples=EXAMPLES[target],
        deadline=None,  # the harness bounds each input itself
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(inputs(target))
    def one(data: bytes) -> None:
        harness.check(data)

    one()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("target", fuzz.TARGETS)
def test_a_short_fuzz_round_finds_nothing(harness: fuzz.Harness, target: str) -> None:
    _run(harness, target)


@pytest.mark.timeout(60)
def test_every_seed_passes_every_oracle(harness: fuzz.Harness) -> None:
    for data in SEEDS:
        harness.check(data)


@pytest.mark.parametrize(
    ("lying_call", "applies", "found"),
    [(2, True, True), (3, True, True), (3, False, False)],
    ids=["first batch changes, says refused", "second changes, says refused", "honest refusal"],
)
def test_the_registry_target_compares_each_refused_batch_with_the_state_before_it(
    harness: fuzz.Harness,
    monkeypatch: pytest.MonkeyPatch,
    lying_call: int,
    applies: bool,
    found: bool,
) -> None:
    """The states compared are kept from the batch before (and the history's, taken once),
    not taken again: they must still be the registry's state just before each batch."""
    _, other = fuzz_corpus.changes()
    data = fuzz_corpus.seed("registry", 0, [fuzz_corpus.encode(c) for c in other[:2]])
    real = Registry.apply_many
    calls: list[int] = []

    def apply_many(self: Registry, changes: Any) -> Any:  # call 1 builds the history
        calls.append(1)
        if len(calls) != lying_call:
            return real(self, changes)
        if applies:
            real(self, changes)
        raise ProtocolError("refused")

    monkeypatch.setattr(Registry, "apply_many", apply_many)
    if found:
        with pytest.raises(fuzz.Finding, match="a refused batch changed the registry"):
            harness.check(data)
    else:
        harness.check(data)
    assert len(calls) >= lying_call


@pytest.mark.parametrize("planted", ["changes its registry quietly", "stores a stale view"])
def test_the_node_target_checks_the_views_after_a_frame_that_could_change_them(
    harness: fuzz.Harness, monkeypatch: pytest.MonkeyPatch, planted: str
) -> None:
    """The views check skips frames that neither store anything nor touch the registry;
    a bug planted in the third frame (the first two pass) must still be found there,
    whether the registry changed without its clock moving or a stored view went stale."""
    lease = fuzz_corpus.control_requests()[8]
    data = fuzz_corpus.seed("node", 0, [lease, lease, lease])
    stale = msgspec.structs.replace(fuzz_corpus.base_disk().views["m1"], current=9)
    real = NodeCore.receive
    frames: list[int] = []

    def receive(self: NodeCore, peer: bytes, payload: bytes, **kwargs: Any) -> Any:
        effects = real(self, peer, payload, **kwargs)
        frames.append(1)
        if len(frames) == 3 and planted == "changes its registry quietly":
            self.registry._functions.pop("m1")  # no change applied: the clock stays
        elif len(frames) == 3:  # without a look at the registry
            effects.append(PersistViews(999, {"m1": stale}, frozenset()))
        return effects

    monkeypatch.setattr(NodeCore, "receive", receive)
    with pytest.raises(fuzz.Finding, match=r"view of 'm1' is not|bodies missing"):
        harness.check(data)
    assert len(frames) == 3  # found in the third frame, not at the end


# -- the launcher: one libFuzzer process per target, counted together ------------------

# Stands in for the instrumented child (fuzz._CHILD): speaks libFuzzer's stderr. A target
# named in FAKE_CRASH fails after its first status line; the others run their -runs, or
# until SIGTERM when given none, and print libFuzzer's final stats either way.
FAKE_CHILD = r"""
import os, signal, sys, time
args = sys.argv[1:]
target = args[args.index("--target") + 1] if "--target" in args else "all"
runs = next((int(a[6:]) for a in args if a.startswith("-runs=")), -1)
done = 0
def stats(*_):
    print(f"stat::number_of_executed_units: {done}", file=sys.stderr, flush=True)
    print("stat::peak_rss_mb:              7", file=sys.stderr, flush=True)
    sys.exit(72 if _ else 0)
signal.signal(signal.SIGTERM, stats)
print("#0\tINITED cov: 10 ft: 20 corp: 3/9b exec/s: 0 rss: 7Mb", file=sys.stderr, flush=True)
if target in os.environ.get("FAKE_CRASH", "").split(","):
    print("==1== ERROR: libFuzzer: deadly signal", file=sys.stderr)
    print(f"Test unit written to {target}-crash-0", file=sys.stderr, flush=True)
    sys.exit(1)
with open(os.path.join(os.environ["FAKE_LOG"], target), "w") as log:
    log.write(str(runs))
while runs < 0 or done < runs:
    done += 1
    if runs < 0:
        time.sleep(0.01)
stats()
"""


@pytest.fixture
def fake_child(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setattr(fuzz, "_CHILD", FAKE_CHILD)
    monkeypatch.setenv("FAKE_LOG", str(tmp_path))
    return tmp_path


def _launch(tmp_path: Path, *options: str) -> int:
    corpus, crashes = tmp_path / "corpus", tmp_path / "crashes"
    return fuzz.run_atheris(
        fuzz._arguments(["--corpus", str(corpus), "--crashes", str(crashes), *options])
    )


@pytest.mark.timeout(60)
def test_the_inputs_are_shared_by_the_targets_and_counted_in_all(
    fake_child: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _launch(fake_child, "--inputs", "1003", "--workers", "2") == 0
    out = capsys.readouterr().out
    runs = {target: int((fake_child / target).read_text()) for target in fuzz.TARGETS}
    assert sorted(runs.values()) == [200, 200, 201, 201, 201]
    assert "fuzz: 1003 inputs," in out
    assert "coverage: 10 edges, 20 features" in out  # the pass over every corpus


def test_a_bound_is_shared_by_the_targets() -> None:
    def jobs(*options: str) -> dict[str, tuple[int, float]]:
        args = fuzz._arguments(list(options))
        return {job.target: (job.inputs, job.seconds) for job in fuzz._jobs(args, args.workers)}

    # Five targets on two processes: three rounds, each within a third of the time.
    assert set(jobs("--seconds", "600", "--workers", "2").values()) == {(0, 200.0)}
    assert set(jobs("--seconds", "600", "--workers", "1").values()) == {(0, 120.0)}
    assert jobs("--inputs", "3") == {"pool": (1, 0.0), "node": (1, 0.0), "registry": (1, 0.0)}
    assert jobs("--inputs", "10", "--target", "node") == {"node": (10, 0.0)}


@pytest.mark.timeout(60)
def test_a_finding_in_one_target_stops_the_others_and_is_reported(
    fake_child: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # pool and node start first (dearest first); pool runs until stopped, node fails.
    monkeypatch.setenv("FAKE_CRASH", "node")
    assert _launch(fake_child, "--seconds", "100", "--workers", "2") == 1
    out = capsys.readouterr().out
    assert "FOUND A CRASH in the node target" in out
    assert "--target node --reproduce" in out
    assert re.search(r"pool +\d+ inputs.*\(stopped\)", out)
    counted = int(re.search(r"fuzz: (\d+) inputs,", out).group(1))  # type: ignore[union-attr]
    pool = int(re.search(r"pool +(\d+) inputs", out).group(1))  # type: ignore[union-attr]
    assert counted == pool  # the failing one ran none
    # Nothing else started: no target after the first two wrote its log.
    assert sorted(p.name for p in fake_child.iterdir() if p.name in fuzz.TARGETS) == ["pool"]


@pytest.mark.timeout(60)
def test_a_crash_file_names_its_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A target's own process ignores the first byte: a pool input whose first byte says
    # "decode" must still run as a pool script when reproduced.
    saved = tmp_path / "pool-crash-0"
    saved.write_bytes(bytes([fuzz.TARGETS.index("decode"), 1, 4, 6, 0, 6, 1]))
    assert fuzz.reproduce([saved], None) == 0
    assert "(the pool target)" in capsys.readouterr().out


@pytest.mark.timeout(90)
def test_a_short_atheris_run_counts_every_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("atheris", reason="atheris is not installed (nox -s fuzz installs it)")
    assert _launch(tmp_path, "--inputs", "600", "--workers", "2", "--seed", "1") == 0
    out = capsys.readouterr().out
    assert "fuzz: 600 inputs," in out
    for target in fuzz.TARGETS:
        assert re.search(rf"{target} +120 inputs", out)
    edges = int(re.search(r"coverage: (\d+) edges", out).group(1))  # type: ignore[union-attr]
    assert edges > 500  # the seeds alone reach about 950
