"""Waiting in tests: on a condition the test can observe, always with a deadline.

A test never sleeps a fixed time hoping a node got somewhere; it polls what it can see
(a pid gone, a file written, results arrived) and fails with a message saying what it
waited for. The one exception is a scenario whose point is time passing with nothing
going wrong: ``holds_for`` checks that condition throughout, and fails as soon as it breaks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

POLL_INTERVAL = 0.02  # seconds between looks


def wait_until(predicate: Callable[[], T], timeout: float, message: str) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Raises AssertionError naming ``message`` once ``timeout`` seconds have passed.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting until {message}")
        time.sleep(POLL_INTERVAL)


def holds_for(predicate: Callable[[], object], seconds: float, message: str) -> None:
    """Assert ``predicate`` stays truthy for ``seconds``, looking every POLL_INTERVAL."""
    started = time.monotonic()
    while True:
        now = time.monotonic()
        if not predicate():
            raise AssertionError(
                f"after {now - started:.2f} s of {seconds:g} s, no longer {message}"
            )
        if now - started > seconds:
            return
        time.sleep(POLL_INTERVAL)
