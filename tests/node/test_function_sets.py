"""Function sets: several functions published, rolled back and removed in one change."""

from __future__ import annotations

import pytest

import scatter
from cluster.launch import LocalNode


def _billing(rate: int) -> scatter.FunctionSet:
    billing = scatter.FunctionSet("billing")

    @billing.function
    def charge(cents: int) -> int:
        return cents * rate

    @billing.function(timeout=5.0)
    def refund(cents: int) -> int:
        return -cents * rate

    return billing


@pytest.mark.timeout(60)
def test_set_publishes_rolls_back_and_vaporizes_as_one(connected: LocalNode) -> None:
    assert _billing(1).publish() == 1
    assert _billing(1).publish() == 1  # identical members: nothing changes
    charge, refund = scatter.make_callable("charge"), scatter.make_callable("refund")
    assert (charge(10), refund(10)) == (10, -10)

    assert _billing(2).publish() == 2
    assert (charge(10), refund(10)) == (20, -20)
    assert scatter.current_version("billing") == 2
    history = scatter.versions("billing")
    assert [(v.version, v.kind, v.current) for v in history] == [
        (1, "set", False),
        (2, "set", True),
    ]

    scatter.rollback("billing")
    assert (charge(10), refund(10)) == (10, -10)  # both members moved back together
    assert scatter.current_version("charge") == 1 and scatter.current_version("refund") == 1

    with pytest.raises(scatter.ConfigError, match="belongs to set"):
        scatter.rollback("charge")  # a member alone would break the set's atomicity

    scatter.vaporize("billing")
    for name in ("billing", "charge", "refund"):
        with pytest.raises(scatter.FunctionNotFound):
            scatter.make_callable(name)


@pytest.mark.timeout(60)
def test_empty_set_is_refused(connected: LocalNode) -> None:
    with pytest.raises(scatter.ConfigError, match="no members"):
        scatter.FunctionSet("empty").publish()


@pytest.mark.timeout(60)
def test_member_left_out_of_a_set_version_answers_only_when_pinned(connected: LocalNode) -> None:
    _billing(1).publish()
    refund_v1 = scatter.make_callable("refund", version=1)
    smaller = scatter.FunctionSet("billing")

    @smaller.function
    def charge(cents: int) -> int:
        return cents * 3

    assert smaller.publish() == 2
    assert scatter.make_callable("charge")(10) == 30
    with pytest.raises(scatter.FunctionNotFound):
        scatter.make_callable("refund")
    assert refund_v1(10) == -10  # the retired member's pinned version still runs
