"""A function's exception, raised on the caller as an instance of its own class.

As Ray's ``RayTaskError.as_instanceof_cause``: the error is an instance of a class made
here, a subclass of both the remote exception's class and ``RemoteError``, so ``except
InsufficientFunds``, ``except ValueError`` and ``except scatter.RemoteError`` all catch a
remote ``raise InsufficientFunds(50)``. It has the remote exception's ``args`` and
attributes (``.need``), its class's ``str()``, and the remote traceback as ``__cause__``
(a ``RemoteTraceback``, as ``concurrent.futures`` chains a process pool's).

Where the class comes from, in this order:

1. By name: a module this process has already imported (``sys.modules``) holding a class
   of that qualified name. Nothing is imported and nothing is unpickled, so any caller
   may; the instance is made with ``cls.__new__`` and the plain msgpack ``args`` and
   attributes the worker sent, never by calling ``__init__`` (Ray's dual class breaks on
   an ``__init__`` whose parameters are not ``args``; this does not).
2. By value: ``Failure.remote_pickle``, the exception by cloudpickle (a class defined in a
   notebook or inside a function). A pickle is code the function's publisher chose, so
   it is loaded only by a client whose secret may deploy (who could publish code to run
   anyway), and a worker sends none to a call-only client in the first place.

Building the dual class and its instance runs no code of the class's own: a class with a
metaclass, or an ``__init_subclass__``, ``__new__``, ``__setattr__`` or ``__del__`` of its
own (in Python, anywhere in its MRO) is not rebuilt, and attributes go straight into the
instance's ``__dict__`` (no property setter runs; no dunder name is taken).

Anything else (a class neither found nor unpickled, a ``BaseException`` that is no
``Exception`` such as ``SystemExit``, a class whose layout cannot be combined with
``RemoteError``, a class that would run code of its own, a pickle that fails to load)
gives the plain ``RemoteError``.
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from typing import Any

import cloudpickle
import msgspec

from .. import _wire
from .._exceptions import RemoteError, RemoteTraceback

# {remote class: a weak reference to its dual class, or None where the two cannot be
# combined}. Weak both ways: a dual subclasses its class, so a strong value would keep
# the key alive forever (a class loaded by value is a new one per worker process).
_duals: weakref.WeakKeyDictionary[type, weakref.ref[type] | None] = weakref.WeakKeyDictionary()


def remote_error(failure: _wire.Failure, *, may_unpickle: bool) -> RemoteError:
    """The exception a ``remote`` failure stands for (see the module docstring)."""
    plain = RemoteError(failure.remote_type, failure.message, failure.remote_traceback)
    try:
        rebuilt = _rebuilt(failure, may_unpickle=may_unpickle)
    except Exception:  # a class whose __new__ or attributes refuse what came: plain
        rebuilt = None
    if rebuilt is None:
        return plain
    rebuilt.remote_type = failure.remote_type
    rebuilt.remote_message = failure.message
    rebuilt.remote_traceback = failure.remote_traceback
    if failure.remote_traceback:
        rebuilt.__cause__ = RemoteTraceback(failure.remote_traceback)
    return rebuilt


def _rebuilt(failure: _wire.Failure, *, may_unpickle: bool) -> RemoteError | None:
    cls = _class_by_name(failure.remote_type)
    if cls is not None and failure.remote_args:
        args = msgspec.msgpack.decode(failure.remote_args)  # no ext_hook: nothing unpickled
        attributes = (
            msgspec.msgpack.decode(failure.remote_attributes) if failure.remote_attributes else {}
        )
        if isinstance(args, list) and isinstance(attributes, dict):
            return _instance(cls, args, attributes)
    if may_unpickle and failure.remote_pickle:
        original = cloudpickle.loads(failure.remote_pickle)
        if isinstance(original, Exception):
            return _instance(type(original), list(original.args), dict(vars(original)))
    return None


def _class_by_name(qualified: str) -> type | None:
    """A class already loaded here under ``qualified`` (``module.qualname``, or a
    builtin's bare name); never imports anything or runs a module's ``__getattr__``."""
    parts = qualified.split(".")
    if len(parts) == 1:
        parts = ["builtins", *parts]
    for split in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:split]))
        if module is None:
            continue
        found: Any = module
        for name in parts[split:]:
            # Namespaces only: a module's __getattr__ (PEP 562) would run its code.
            namespace = getattr(found, "__dict__", None)
            found = namespace.get(name) if namespace is not None else None
            if found is None:
                break
        if isinstance(found, type):
            return found
    return None


def _instance(cls: type, args: list[Any], attributes: dict[str, Any]) -> RemoteError | None:
    dual = _dual(cls)
    if dual is None:
        return None
    error: RemoteError = dual.__new__(dual, *args)
    if not error.args and args:
        error.args = tuple(args)
    # Straight into the instance's dict: setattr would run property setters or a
    # __setattr__ of the class's own, with names and values the remote side chose.
    error.__dict__.update(
        (name, value)
        for name, value in attributes.items()
        if isinstance(name, str) and not name.startswith("__")
    )
    return error


def _runs_no_code_of_its_own(cls: type) -> bool:
    """Whether building a subclass and an instance of ``cls`` runs only BaseException's
    code: no metaclass, ``__init_subclass__``, ``__new__``, ``__setattr__`` or ``__del__``
    of a class's own (a remote side chooses the class, among those loaded here)."""
    if type(cls) is not type:
        return False
    for klass in cls.__mro__:
        if klass.__module__ == "builtins":  # the built-in exceptions' own C slots
            continue
        if any(
            name in vars(klass)
            for name in ("__init_subclass__", "__new__", "__setattr__", "__del__")
        ):
            return False
    return True


def _dual(cls: type) -> type | None:
    """A subclass of ``cls`` and of ``RemoteError``, named as ``cls``; made once per class."""
    if not issubclass(cls, Exception) or issubclass(cls, RemoteError):
        # SystemExit, KeyboardInterrupt: never raised here on a remote's behalf.
        # A RemoteError from a nested call already says what it is.
        return None
    try:
        known = _duals[cls]
    except KeyError:
        pass
    else:
        if known is None:
            return None
        found = known()
        if found is not None:
            return found
    if not _runs_no_code_of_its_own(cls):  # walked once per class, not per error
        with contextlib.suppress(TypeError):
            _duals[cls] = None
        return None
    dual: type | None
    try:
        dual = type(
            cls.__name__,
            (cls, RemoteError),
            {
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
                # The remote class's own text, not RemoteError's (which adds the traceback:
                # here it is the __cause__).
                "__str__": cls.__str__,
                "__repr__": cls.__repr__,
                "__reduce__": _reduce_to_plain,
                "__doc__": cls.__doc__,
            },
        )
    except TypeError:  # "multiple bases have instance lay-out conflict", a final class
        dual = None
    with contextlib.suppress(TypeError):
        _duals[cls] = None if dual is None else weakref.ref(dual)
    return dual


def _reduce_to_plain(error: RemoteError) -> tuple[object, ...]:
    # The dual class exists only in this process: a pickled copy is the plain RemoteError.
    return (RemoteError, (error.remote_type, error.remote_message, error.remote_traceback))
