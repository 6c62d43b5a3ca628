"""A short round of cluster/fuzz.py's targets: a few thousand inputs, a few seconds.

Inputs are real frames (cluster/fuzz_corpus.py) with a few edits each, or raw bytes;
hypothesis picks the edits and shrinks a failure to the fewest. The harness raises on
anything that escapes a target, on a broken oracle (``Finding``), on an input slower than
``SECONDS_PER_INPUT`` and on one that allocates more than ``TRACED_PER_INPUT`` (traced
here with tracemalloc). The long, coverage-guided run is ``nox -s fuzz``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from cluster import fuzz, fuzz_corpus

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
