"""A function that uses the caller's own modules runs on any node (issue 11, item 10):
they go by value with it, so the node's working directory never matters."""

from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path

import pytest

import scatter
from cluster.launch import LocalNode

HELPERS = "scatter_test_callers_helpers"
PACKAGE = "scatter_test_callers_package"


@pytest.fixture
def callers_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A module and a package in a directory on the caller's sys.path only."""
    directory = tmp_path / "callers-code"
    (directory / PACKAGE).mkdir(parents=True)
    (directory / f"{HELPERS}.py").write_text("FACTOR = 3\n\ndef triple(x):\n    return FACTOR * x\n")
    (directory / PACKAGE / "__init__.py").write_text("from .inner import square\n")
    (directory / PACKAGE / "inner.py").write_text("def square(x):\n    return x * x\n")
    monkeypatch.syspath_prepend(str(directory))
    for name in (HELPERS, PACKAGE, f"{PACKAGE}.inner"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return directory


@pytest.mark.timeout(120)
def test_a_function_using_the_callers_own_modules_runs_on_a_node_started_elsewhere(
    node: LocalNode, client: scatter.Client, callers_modules: Path
) -> None:
    # The node runs in another directory and never had callers_modules on its path.
    assert str(callers_modules) not in node.log()
    helpers = importlib.import_module(HELPERS)
    package = importlib.import_module(PACKAGE)

    def uses_callers_modules(x: int) -> int:
        return helpers.triple(x) + package.square(x)

    client.publish(uses_callers_modules)
    assert client.make_callable("uses_callers_modules")(2) == 6 + 4
    # Gone from the caller's disk: a new connection (another worker) loads the body,
    # and with it the modules, from the node's store alone.
    shutil.rmtree(callers_modules)
    with scatter.Client(node.address, autostart=False) as other:
        assert other.make_callable("uses_callers_modules")(5) == 15 + 25


@pytest.mark.timeout(120)
def test_publishing_from_threads_at_once_ships_every_module_and_keeps_the_users_own(
    node: LocalNode, client: scatter.Client, callers_modules: Path
) -> None:
    # Found in review: cloudpickle's by-value registry is global, so one publish's cleanup
    # unregistered another's modules mid-pickle, and a module the user had registered
    # was unregistered by any publish.
    import threading

    import cloudpickle

    helpers = importlib.import_module(HELPERS)
    package = importlib.import_module(PACKAGE)
    cloudpickle.register_pickle_by_value(package)  # the user's own choice
    try:
        errors: list[BaseException] = []

        def publish_many(index: int) -> None:
            try:
                for round_ in range(15):

                    def uses_helpers(x: int) -> int:
                        return helpers.triple(x)

                    client.publish(uses_helpers, name=f"helpers_{index}_{round_ % 3}")
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=publish_many, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(100)
        assert not errors, errors
        assert PACKAGE in cloudpickle.list_registry_pickle_by_value()
        shutil.rmtree(callers_modules)
        for index in range(4):
            for round_ in range(3):
                assert client.make_callable(f"helpers_{index}_{round_}")(2) == 6
    finally:
        cloudpickle.unregister_pickle_by_value(package)


def test_an_extension_module_built_in_place_is_not_shipped_by_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found in review: a Cython or pybind11 module built in the caller's tree counted as
    # the caller's own code, and cloudpickle then tried to copy its classes by value.
    import types

    from scatter._publish import _callers_own_modules

    extension = types.ModuleType("scatter_test_fast_extension")
    extension.__file__ = str(tmp_path / "scatter_test_fast_extension.cpython-311-x86_64-linux-gnu.so")
    source = types.ModuleType("scatter_test_plain_source")
    source.__file__ = str(tmp_path / "scatter_test_plain_source.py")
    monkeypatch.setitem(sys.modules, extension.__name__, extension)
    monkeypatch.setitem(sys.modules, source.__name__, source)
    own = _callers_own_modules()
    assert source.__name__ in own
    assert extension.__name__ not in own
