"""Turning a local function into what a node stores: body, signature, ids.

The body is pickled BY VALUE, also when the function lives in an importable module:
the node and its workers need not have that module (the notebook that defined it may
be gone). So is every module of the caller's own code it uses (a ``mymod.py`` next to
the notebook, a package of the project): a module loaded from a file outside the
standard library and the installed packages goes by value
(``cloudpickle.register_pickle_by_value``), so a call never depends on the node's
working directory or on the file still being there. Installed modules (numpy, ...) stay
references and must exist on the node.

The signature goes twice: pickled by value for the node's workers, which load the
body (and so run the publisher's code) anyway, and as a msgspec type description
(``_typespec``) for callers, who never unpickle anything to learn it. The description
is rebuilt here once, as a caller would, so that a signature callers could not use is
refused at ``@scatter`` time.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import os
import platform
import site
import sys
import sysconfig
import threading
import types
from collections.abc import Callable
from typing import Any

import cloudpickle

from ._config import MAX_MESSAGE_BYTES
from ._core import _typespec
from ._core._registry import check_name
from ._core._signature import (
    build_call_spec,
    check_scatterable,
    content_id,
    portable_signature,
    signature_id,
    signature_text,
    source_of,
)
from ._exceptions import ConfigError, NotScatterable
from ._pickling import dumps, stable_pickle_identity


def _installed_roots() -> tuple[str, ...]:
    """Directories whose modules a node is expected to have: the standard library and
    the installed packages (of this interpreter, its base and the user's site)."""
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    roots.update(sysconfig.get_paths().values())
    roots.update(site.getsitepackages() if hasattr(site, "getsitepackages") else ())
    roots.add(site.getusersitepackages())
    return tuple(os.path.join(os.path.realpath(root), "") for root in roots if root)


_INSTALLED_ROOTS = _installed_roots()
# The caller's own modules, found when sys.modules last had this many entries: a scan
# costs ~1 us a module, and sys.modules rarely changes once a program runs.
_callers_own: tuple[int, list[str]] = (-1, [])


def _is_callers_own(name: str, module: object) -> bool:
    """Whether ``module`` is the caller's own code, which a node may lack: loaded from a
    file outside the standard library and the installed packages (and not Scatter)."""
    file = getattr(module, "__file__", None)
    if not isinstance(file, str) or name == "__main__" or name.partition(".")[0] == "scatter":
        return False  # built in, namespace package, or already by value (__main__)
    if not file.endswith(_SOURCE_SUFFIXES):
        return False  # an extension built in place (.so): cloudpickle cannot copy it
    return not os.path.realpath(file).startswith(_INSTALLED_ROOTS)


_SOURCE_SUFFIXES = tuple(importlib.machinery.SOURCE_SUFFIXES)


def _callers_own_modules() -> list[str]:
    global _callers_own
    count, names = _callers_own
    if count != len(sys.modules):
        modules = list(sys.modules.items())
        names = [name for name, module in modules if _is_callers_own(name, module)]
        _callers_own = (len(modules), names)
    return names


def _pickle_by_value(fn: Callable[..., Any], *objects: object) -> list[bytes]:
    """cloudpickle ``objects`` with ``fn``'s defining module, and every module of the
    caller's own code, pickled by value (see the module docstring)."""
    module_name = getattr(fn, "__module__", None) or ""
    names = set(_callers_own_modules())
    if module_name != "__main__" and module_name.partition(".")[0] != "scatter":
        names.add(module_name)
    # cloudpickle's set of by-value modules is global: two threads publishing at once
    # would unregister each other's modules mid-pickle (shipping them by reference, which
    # fails on the node), and a module the user registered must stay registered.
    with _BY_VALUE_LOCK:
        return _dumps_by_value(fn, module_name, names, objects)


_BY_VALUE_LOCK = threading.Lock()


def _dumps_by_value(
    fn: Callable[..., Any], module_name: str, names: set[str], objects: tuple[object, ...]
) -> list[bytes]:
    registered: list[types.ModuleType] = []
    already = cloudpickle.list_registry_pickle_by_value()  # the user's own: left as they are
    for name in names:
        module = sys.modules.get(name)
        if not isinstance(module, types.ModuleType) or name in already:
            continue
        try:
            cloudpickle.register_pickle_by_value(module)
        except ValueError:  # not in sys.modules under its own name
            continue
        registered.append(module)
    try:
        return [dumps(obj) for obj in objects]
    except Exception as exc:
        own = sorted(m.__name__ for m in registered if m.__name__ != module_name)
        shipped = (
            f" (modules of your own code go by value with it: {', '.join(own)}; one of "
            "them may hold an object that does not pickle, such as a lock or a connection)"
            if own
            else ""
        )
        raise NotScatterable(
            f"cannot ship {getattr(fn, '__name__', fn)!r}: {type(exc).__name__}: {exc}{shipped}"
        ) from exc
    finally:
        for module in registered:
            with contextlib.suppress(ValueError):
                cloudpickle.unregister_pickle_by_value(module)


# Read by the node's workers off the loaded body (scatter/_node/_worker.py).
CAPTURE_OUTPUT_ATTRIBUTE = "__scatter_capture_output__"


def without_output_capture(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A copy of ``fn`` whose calls' output a worker drops (``capture_output=False``).

    The setting travels in the body, as a function attribute, so it is part of the
    version (its content id) as the timeout is; ``fn`` itself is left untouched.
    """
    if not isinstance(fn, types.FunctionType):
        raise NotScatterable(
            f"capture_output=False takes a plain function (def or async def), not "
            f"{type(fn).__qualname__}"
        )
    copy = types.FunctionType(
        fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__qualname__ = fn.__qualname__
    copy.__module__ = fn.__module__
    copy.__doc__ = fn.__doc__
    copy.__annotations__ = fn.__annotations__
    copy.__dict__.update(fn.__dict__)
    setattr(copy, CAPTURE_OUTPUT_ATTRIBUTE, False)
    return copy


def prepare_publish(
    fn: Callable[..., Any],
    *,
    name: str | None = None,
    timeout: float | None = None,
    capture_output: bool = True,
) -> dict[str, Any]:
    """The fields of a ``Publish`` request for ``fn``, checked before anything is sent.

    Raises:
        NotScatterable: ``fn`` cannot be a remote function (also: its ``__name__`` breaks
            the name rule, as a lambda's does, and no ``name`` was given).
        ConfigError: ``name`` breaks the name rule (``check_name``), or a bad timeout.
        TypeError: ``name`` is not a str.
    """
    if not isinstance(capture_output, bool):
        raise ConfigError(f"capture_output must be True or False, got {capture_output!r}")
    if not capture_output:
        fn = without_output_capture(fn)
    if name is not None:
        # An explicit name (also "") is judged as given, never replaced by __name__.
        check_name(name)
    if timeout is not None and not timeout > 0:
        raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
    default = getattr(fn, "__name__", None)
    sig = check_scatterable(fn, default if name is None else name)  # judges the default
    resolved = str(default) if name is None else name
    # The signature goes by value too: a client that never imported the defining module
    # still rebuilds the annotation types it validates against.
    body, signature = _pickle_by_value(fn, fn, portable_signature(sig))
    # The timeout is part of what a version is: the same code with another timeout is a
    # new version, not a no-op.
    identity = stable_pickle_identity(body) + f"\0timeout={timeout!r}".encode()
    signature_spec = _typespec.describe(sig)
    try:
        build_call_spec(
            resolved, _typespec.rebuild(signature_spec, local_classes=False), caller=True
        )
    except (NotScatterable, _typespec.DescriptionError) as exc:
        raise NotScatterable(
            f"{resolved}(): callers could not rebuild its signature from its type "
            f"description: {exc}"
        ) from exc
    return {
        "name": resolved,
        "body": body,
        "signature": signature,
        "signature_spec": signature_spec,
        "signature_text": signature_text(sig),
        "signature_id": signature_id(sig),
        "content_id": content_id(identity, sig),
        "source": source_of(fn),
        "doc": getattr(fn, "__doc__", None),
        "python": platform.python_version(),
        "timeout": timeout,
    }


def too_large_to_ship(
    members: list[dict[str, Any]], request_bytes: int, *, set_name: str | None = None
) -> NotScatterable:
    """The error for a ``Publish`` (or ``PublishSet``) of ``members`` (``prepare_publish``
    fields) that encodes to ``request_bytes``, over the limit of one frame.

    The client refuses it before sending anything: a node would drop the frame unread,
    with its connection, and the caller would see only silence.
    """
    largest = max(members, key=lambda fields: len(fields["body"]))
    body_bytes = len(largest["body"])
    over = request_bytes - MAX_MESSAGE_BYTES
    what = repr(largest["name"]) if set_name is None else f"the set {set_name!r}"
    return NotScatterable(
        f"cannot ship {what}: the body of {largest['name']}() pickles to "
        f"{_mib(body_bytes)} ({body_bytes:,} bytes), and the request is {over:,} bytes "
        f"({_mib(over)}) over the {_mib(MAX_MESSAGE_BYTES)} a node accepts in one message. "
        "It is likely a closure over a large array: pass it as an argument, or load it "
        "inside the function"
    )


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"

