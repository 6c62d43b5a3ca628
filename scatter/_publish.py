"""Turning a local function into what a node stores: body, signature, ids.

The body is pickled BY VALUE, also when the function lives in an importable module:
the node and its workers need not have that module (the notebook that defined it may
be gone). Modules it imports (numpy, ...) stay references and must exist on the node.

The signature goes twice: pickled by value for the node's workers, which load the
body (and so run the publisher's code) anyway, and as a msgspec type description
(``_typespec``) for callers, who never unpickle anything to learn it. The description
is rebuilt here once, as a caller would, so that a signature callers could not use is
refused at ``@scatter`` time.
"""

from __future__ import annotations

import platform
import sys
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


def _pickle_by_value(fn: Callable[..., Any], *objects: object) -> list[bytes]:
    """cloudpickle ``objects`` with ``fn``'s defining module pickled by value."""
    module_name = getattr(fn, "__module__", None) or ""
    module = sys.modules.get(module_name)
    registered = False
    if module is not None and module_name != "__main__" and not module_name.startswith("scatter"):
        try:
            cloudpickle.register_pickle_by_value(module)
            registered = True
        except ValueError:
            pass
    try:
        return [dumps(obj) for obj in objects]
    except Exception as exc:
        raise NotScatterable(
            f"cannot ship {getattr(fn, '__name__', fn)!r}: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        if registered and module is not None:
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

