"""Fixtures: real node processes on free loopback ports, stopped by PID."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import scatter
from cluster.launch import LocalNode


@pytest.fixture(autouse=True)
def _no_autostart(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A test must never start (or talk to) a node on the default address by accident.
    monkeypatch.setenv("SCATTER_AUTOSTART", "0")
    monkeypatch.setenv("SCATTER_DATA_DIR", str(tmp_path / "default-data"))
    # The user's own secret (made by the first node, read by clients) lives under
    # XDG_DATA_HOME: each test gets its own, never the real user's.
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.delenv("SCATTER_SECRET", raising=False)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[LocalNode]:
    local = LocalNode(tmp_path / "node").start()
    try:
        yield local
    finally:
        local.stop()


@pytest.fixture
def client(node: LocalNode) -> Iterator[scatter.Client]:
    with scatter.Client(node.address, autostart=False) as c:
        yield c


@pytest.fixture
def connected(node: LocalNode) -> Iterator[LocalNode]:
    """The module-level API (the seed's) pointed at a fresh node."""
    scatter.connect(node.address, autostart=False)
    yield node
