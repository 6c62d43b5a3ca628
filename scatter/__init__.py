"""Scatter: plain, type-annotated Python functions as versioned remote functions.

Example::

    from scatter import scatter, make_callable

    @scatter
    def add(a: int, b: int) -> int:
        return a + b

    make_callable("add")(1, 2)   # 3, validated on both sides
"""

from ._api import (
    FunctionSet as FunctionSet,
    connect as connect,
    current_version as current_version,
    functions as functions,
    make_callable as make_callable,
    rollback as rollback,
    scatter as scatter,
    vaporize as vaporize,
    versions as versions,
)
from ._client import (
    AsyncRemoteStream as AsyncRemoteStream,
    Client as Client,
    ClientStatistics as ClientStatistics,
    RemoteFunction as RemoteFunction,
    RemoteStream as RemoteStream,
)
from ._core._registry import FunctionInfo as FunctionInfo, VersionInfo as VersionInfo
from ._exceptions import (
    AuthenticationError as AuthenticationError,
    CallTimeout as CallTimeout,
    ConfigError as ConfigError,
    FunctionNotFound as FunctionNotFound,
    NotScatterable as NotScatterable,
    ProtocolError as ProtocolError,
    RemoteError as RemoteError,
    ScatterError as ScatterError,
    SignatureChanged as SignatureChanged,
    Unreachable as Unreachable,
    ValidationError as ValidationError,
    VersionNotFound as VersionNotFound,
    WorkerCrashed as WorkerCrashed,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncRemoteStream",
    "AuthenticationError",
    "CallTimeout",
    "Client",
    "ClientStatistics",
    "ConfigError",
    "FunctionInfo",
    "FunctionNotFound",
    "FunctionSet",
    "NotScatterable",
    "ProtocolError",
    "RemoteError",
    "RemoteFunction",
    "RemoteStream",
    "ScatterError",
    "SignatureChanged",
    "Unreachable",
    "ValidationError",
    "VersionInfo",
    "VersionNotFound",
    "WorkerCrashed",
    "connect",
    "current_version",
    "functions",
    "make_callable",
    "rollback",
    "scatter",
    "vaporize",
    "versions",
]


def _fixup_module_metadata() -> None:
    # Tracebacks and pickles say scatter.RemoteError, not scatter._exceptions.RemoteError
    # (trio's fixup_module_metadata).
    # msgspec Structs keep theirs: msgspec resolves their string annotations against
    # the module named there.
    import contextlib

    import msgspec

    for name in __all__:
        obj = globals()[name]
        if isinstance(obj, type) and issubclass(obj, msgspec.Struct):
            continue
        if getattr(obj, "__module__", "").startswith("scatter."):
            with contextlib.suppress(AttributeError, TypeError):
                obj.__module__ = "scatter"


_fixup_module_metadata()
del _fixup_module_metadata
