"""The public API is exactly what ``scatter.__all__`` lists, and it presents as ``scatter``."""

from __future__ import annotations

import scatter
import scatter.brew.core


def test_all_lists_every_public_name() -> None:
    public = {name for name in dir(scatter) if not name.startswith("_")}
    modules = {"brew"}  # subpackage kept for the seed's import line
    assert set(scatter.__all__) == public - modules


def test_exceptions_present_as_scatter_members() -> None:
    for name in ("RemoteError", "ScatterError", "ValidationError", "CallTimeout"):
        assert getattr(scatter, name).__module__ == "scatter"


def test_seed_import_path_gives_the_same_objects() -> None:
    for name in scatter.brew.core.__all__:
        assert getattr(scatter.brew.core, name) is getattr(scatter, name)


def test_error_tree() -> None:
    assert issubclass(scatter.ValidationError, TypeError)
    assert issubclass(scatter.SignatureChanged, TypeError)
    assert issubclass(scatter.CallTimeout, TimeoutError)
    assert issubclass(scatter.FunctionNotFound, LookupError)
    assert issubclass(scatter.Unreachable, ConnectionError)
    assert issubclass(scatter.WorkerCrashed, scatter.RemoteError)
    for name in scatter.__all__:
        obj = getattr(scatter, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, scatter.ScatterError)
