"""The one exception tree of Scatter.

Every error Scatter raises on purpose is a ``ScatterError``. Foreign errors (zmq,
msgspec, diskcache, cloudpickle) are mapped at the boundary where they happen, with
``raise ... from exc``, so users never see ``zmq.Again``::

    ScatterError
    +-- ValidationError (also TypeError)      an argument or result does not match its annotation
    +-- RemoteError                           the function raised; carries type, message, traceback
    |   |                                     (and is an instance of the remote class too, where
    |   |                                     the caller can rebuild it: _client/_remote_errors.py)
    |   +-- WorkerCrashed                     the process running the call died (os._exit, segfault)
    +-- FunctionNotFound (also LookupError)   no function (or set) by that name
    +-- VersionNotFound (also LookupError)    the function exists, the version does not
    +-- SignatureChanged (also TypeError)     the current version's signature differs from the caller's
    +-- NotScatterable (also TypeError)       @scatter refused the function (no annotations, a generator not annotated Iterator[T] ...)
    +-- Unreachable (also ConnectionError)    no node answered at the address
    +-- AuthenticationError (also PermissionError)  wrong or missing secret, or a call-only
    |                                         secret asking for a change
    +-- CallTimeout (also TimeoutError)       the call ran past its timeout
    +-- ProtocolError                         a malformed, oversized or unexpected message
    +-- ConfigError (also ValueError)         a bad argument or SCATTER_* environment value

Whether a failed call may have run: every ``ScatterError`` has ``may_have_run``.
False means the function certainly did not start (refused before running, expired
before it could start, never delivered): a retry is safe. True means it may have run,
or may still be running (a timeout, a worker lost mid-call, a repeated call id): a
retry may run it twice. A call itself is never run twice (at most once):
ARCHITECTURE.md, "At most once".

Wrong arity and unknown keywords raise the plain ``TypeError`` Python raises for a
local call with the same signature: that is what a caller expects, and the message is
the interpreter's own.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "CallTimeout",
    "ConfigError",
    "FunctionNotFound",
    "NotScatterable",
    "ProtocolError",
    "RemoteError",
    "ScatterError",
    "SignatureChanged",
    "Unreachable",
    "ValidationError",
    "VersionNotFound",
    "WorkerCrashed",
]


class ScatterError(Exception):
    """Base class of every error Scatter raises on purpose.

    Attributes:
        may_have_run: whether the call that failed may have run (see the module
            docstring); False for errors raised before anything was sent.
    """

    may_have_run: bool = False


class ValidationError(ScatterError, TypeError):
    """An argument (or a return value) does not match its annotation.

    Attributes:
        parameter: the parameter's name, or ``"return"`` for a result.
        path: msgspec's path to the bad value, such as ``$.items[0].price``.
    """

    def __init__(self, message: str, *, parameter: str | None = None, path: str | None = None):
        super().__init__(message)
        self.parameter = parameter
        self.path = path


class RemoteError(ScatterError):
    """The scattered function raised on the node.

    Where the caller can rebuild the remote exception's class (it has imported the class's
    module, or may load it by value), the error raised is an instance of that class
    too: ``except ValueError`` catches a remote ``ValueError``, its attributes are there,
    ``str()`` is the remote exception's own, and the remote traceback is its
    ``__cause__`` (a ``RemoteTraceback``). Otherwise it is a plain ``RemoteError``, whose
    ``str()`` holds the remote traceback.

    Attributes:
        remote_type: the qualified name of the remote exception's class (``"builtins.ValueError"``).
        remote_message: ``str()`` of the remote exception.
        remote_traceback: the remote traceback, formatted as text.
    """

    may_have_run = True  # the function raised: it ran

    def __init__(self, remote_type: str, remote_message: str, remote_traceback: str = ""):
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback
        super().__init__(f"{remote_type}: {remote_message}")

    def __str__(self) -> str:
        text = f"{self.remote_type}: {self.remote_message}"
        if self.remote_traceback:
            text += "\n\nRemote traceback:\n" + self.remote_traceback.rstrip()
        return text

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.remote_type, self.remote_message, self.remote_traceback))


class RemoteTraceback(Exception):
    """The ``__cause__`` of a rebuilt remote exception: its traceback, as text.

    Python prints it above the error, as ``concurrent.futures`` does for a process pool's.
    """

    def __init__(self, traceback: str) -> None:
        super().__init__(traceback)
        self.traceback = traceback

    def __str__(self) -> str:
        return "\n\n" + self.traceback.rstrip()


class WorkerCrashed(RemoteError):
    """The process running the call died before it answered (``os._exit``, a segfault).

    The node replaces the process and keeps serving; only this call is lost.
    """


class FunctionNotFound(ScatterError, LookupError):
    """No function or function set by that name exists (or it was vaporized)."""


class VersionNotFound(ScatterError, LookupError):
    """The function exists but not the requested version."""


class SignatureChanged(ScatterError, TypeError):
    """The function's current version has a different signature than the caller's.

    The callable that raised it has already refreshed itself: the next call validates
    against the new signature.

    Attributes:
        name: the function's name.
        old_version: the version whose signature the caller used.
        new_version: the current version.
    """

    def __init__(self, message: str, *, name: str = "", old_version: int = 0, new_version: int = 0):
        super().__init__(message)
        self.name = name
        self.old_version = old_version
        self.new_version = new_version


class NotScatterable(ScatterError, TypeError):
    """``@scatter`` refused the object: it cannot become a remote function."""


class Unreachable(ScatterError, ConnectionError):
    """No node answered at the address: nothing listens there, or what listens was silent.

    Only ever silence. A node that answers with an error raises that error, and what the
    client refuses before sending (a body or arguments over the frame limit) raises its
    own. A call that could not be delivered did not run (``may_have_run`` False).
    """

    def __init__(self, message: str = "", *, may_have_run: bool = False) -> None:
        super().__init__(message)
        self.may_have_run = may_have_run


class AuthenticationError(ScatterError, PermissionError):
    """The node refused this client's secret, or its role may not do what it asked.

    A client with a wrong or missing secret gets no frame through: check
    ``SCATTER_SECRET`` (or the node's ``--secret-file``). A call-only secret may call,
    describe and list; changes and shutdown need the cluster secret.
    """


class CallTimeout(ScatterError, TimeoutError):
    """The call ran past its timeout. The node keeps serving other calls.

    ``may_have_run`` says whether it may have started: False when no worker came free in
    time, or when the worker saw that its caller had given up before it could start it
    (a call the caller gave up on never starts); True when it ran past its timeout or no
    reply came (it may have run, or still run).
    """

    def __init__(self, message: str = "", *, may_have_run: bool = True) -> None:
        super().__init__(message)
        self.may_have_run = may_have_run


class ProtocolError(ScatterError):
    """A message was malformed, oversized or not what the protocol allows here.

    Also a call whose id came before (a repeat): it is not run again, and
    ``may_have_run`` is True (the first one may have).
    """

    def __init__(self, message: str = "", *, may_have_run: bool = False) -> None:
        super().__init__(message)
        self.may_have_run = may_have_run


class ConfigError(ScatterError, ValueError):
    """A configuration value (an argument or a ``SCATTER_*`` variable) is invalid."""
