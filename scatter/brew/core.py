"""The seed notebook's import path, kept so its code runs unchanged.

``from scatter.brew.core import make_callable, current_version, rollback, scatter, vaporize``
New code imports the same names from ``scatter``.
"""

from .. import (
    connect as connect,
    current_version as current_version,
    functions as functions,
    make_callable as make_callable,
    rollback as rollback,
    scatter as scatter,
    vaporize as vaporize,
    versions as versions,
)

__all__ = [
    "connect",
    "current_version",
    "functions",
    "make_callable",
    "rollback",
    "scatter",
    "vaporize",
    "versions",
]
