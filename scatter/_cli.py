"""The command line: a skin over the Python API, never a requirement.

Every command maps onto one public call (``scatter ls`` is ``Client.functions()``,
``scatter rollback`` is ``Client.rollback()``), as httpx's ``_main.py`` maps onto
``Client``. Errors are caught once, at the top (``_ScatterGroup.invoke``): a
``ScatterError`` becomes one red line ``error: ...`` on stderr and exit code 1, never a
traceback. Anything else escaping a command is a bug and keeps its traceback.

Tables are for people and fit the console (``_print_table``); ``--json`` prints the
records the Python API returns, for scripts.

Commands talk to the node at ``--address`` (before the command: ``scatter --address
tcp://127.0.0.1:5000 ls``), else ``SCATTER_ADDRESS``, else ``tcp://127.0.0.1:4242``: the
library's own resolution. They never auto-start a node (``scatter node status`` must
not start the node it asks about); ``scatter node start`` does that on purpose.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import inspect
import json
import math
import sys
import time
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

import msgspec
import typer
from rich.cells import cell_len, chop_cells
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from . import __version__, _wire
from ._client import Client, RemoteStream, start_background_node
from ._client._autostart import port_open
from ._config import (
    DEFAULT_CALL_TIMEOUT,
    NodeConfig,
    membership_profile,
    normalize_address,
    parse_address,
    resolve_client_config,
    resolve_node_config,
)
from ._core._registry import FunctionInfo, VersionInfo
from ._exceptions import ConfigError, RemoteError, ScatterError
from ._security import call_only_secret, new_secret, read_secret_file

__all__ = ["app", "main"]

# How long `scatter node stop` waits for the node to stop listening (seconds).
STOP_WAIT = 15.0

# soft_wrap: a long error or path stays on one line instead of being folded at 80 columns.
_out = Console(soft_wrap=True)
_err = Console(stderr=True, soft_wrap=True)


def _fail(exc: BaseException) -> NoReturn:
    """Print one red line for ``exc`` on stderr and exit 1."""
    if isinstance(exc, RemoteError):
        # The remote traceback belongs to the function's author, not on a CLI's one line.
        message = f"{exc.remote_type}: {exc.remote_message}"
    else:
        message = str(exc)
    one_line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    _err.print(Text(f"error: {one_line}", style="bold red"))
    raise typer.Exit(1)


class _ScatterGroup(TyperGroup):
    """The top of the command tree: where every ScatterError is caught."""

    # Any: typer vendors click privately (typer._click); its Context is not public API.
    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except ScatterError as exc:
            _fail(exc)


app = typer.Typer(
    cls=_ScatterGroup,
    name="scatter",
    help=(
        "Scatter: type-annotated Python functions as versioned remote functions.\n\n"
        "Publish functions from Python with @scatter; use this command to run a node and "
        "to list, inspect, call, roll back and delete its functions."
    ),
    epilog=(
        "Examples: scatter node start --background | scatter ls | scatter call add 1 2 | "
        "scatter --address tcp://127.0.0.1:5000 versions add"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
node_app = typer.Typer(help="Start, inspect and stop a node on this machine.", no_args_is_help=True)
app.add_typer(node_app, name="node")
secret_app = typer.Typer(
    help="Make the secrets a cluster's nodes and clients share.", no_args_is_help=True
)
app.add_typer(secret_app, name="secret")


# The NAME argument of the commands that take one.
FunctionName = Annotated[
    str, typer.Argument(metavar="NAME", help="The function name.", show_default=False)
]
FunctionOrSetName = Annotated[
    str, typer.Argument(metavar="NAME", help="The function (or set) name.", show_default=False)
]


@dataclass(frozen=True)
class _Options:
    address: str | None  # None: SCATTER_ADDRESS, else the default address


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"scatter {__version__} (Python {sys.version.split()[0]})")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    _version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Print this Scatter's version and exit.",
            callback=_print_version,
            is_eager=True,
        ),
    ] = False,
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            "-a",
            metavar="tcp://HOST:PORT",
            help="The node to talk to (several, comma-separated: members of one cluster, "
            "failed over in order). Default: $SCATTER_ADDRESS, else tcp://127.0.0.1:4242.",
            show_default=False,
        ),
    ] = None,
) -> None:
    ctx.obj = _Options(address=address)


def _address(ctx: typer.Context) -> str | None:
    options = ctx.find_root().obj
    return options.address if isinstance(options, _Options) else None


def _client(ctx: typer.Context) -> Client:
    return Client(_address(ctx), autostart=False)


# ---------------------------------------------------------------- secret


@secret_app.command("new")
def secret_new() -> None:
    """Print a new random cluster secret: `scatter secret new > cluster.key`.

    Give it to every node (`--secret-file cluster.key` or $SCATTER_SECRET) and to the
    clients that may deploy. Keep the file private (chmod 600): whoever holds it can run
    any code on every node.
    """
    print(new_secret())


@secret_app.command("call-only")
def secret_call_only(
    secret_file: Annotated[
        Path | None,
        typer.Option(
            "--secret-file",
            metavar="PATH",
            help="The cluster secret to derive from. Default: $SCATTER_SECRET.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Print the call-only secret of the cluster secret: it may call, describe and list.

    Clients holding it (as $SCATTER_SECRET) cannot scatter, roll back, vaporize or stop
    a node.
    """
    config = resolve_client_config(secret=None, environ=None)
    if secret_file is not None:
        secret = read_secret_file(secret_file.expanduser())
    elif config.secret is not None:
        secret = config.secret
    else:
        raise ConfigError("give the cluster secret with --secret-file PATH or $SCATTER_SECRET")
    print(call_only_secret(secret))


# ---------------------------------------------------------------- node


AddressOption = Annotated[
    str | None,
    typer.Option(
        "--address",
        metavar="tcp://HOST:PORT",
        help="Where to listen. Beyond loopback it needs a cluster secret "
        "(--secret-file or $SCATTER_SECRET). Default: the global --address, "
        "$SCATTER_ADDRESS, else this user's own (tcp://127.0.0.1:4242 for root).",
        show_default=False,
    ),
]
DataDirOption = Annotated[
    str | None,
    typer.Option(
        "--data-dir",
        metavar="DIR",
        help="Where the node keeps its registry. Default: $SCATTER_DATA_DIR, else one "
        "directory per address under the user's data directory.",
        show_default=False,
    ),
]
BackgroundOption = Annotated[
    bool,
    typer.Option(
        "--background",
        help="Start a detached node (it outlives this command, logs to DIR/node.log), "
        "print its pid and return, instead of running it in the foreground.",
    ),
]
CallTimeoutOption = Annotated[
    float,
    typer.Option(
        "--call-timeout",
        metavar="SECONDS",
        min=0.001,
        help="Timeout of calls whose function and caller set none.",
    ),
]
MaxWorkersOption = Annotated[
    int,
    typer.Option(
        "--max-workers",
        min=1,
        max=256,
        help="Worker processes the pool may grow to (each connection leases one; past "
        "this, connections share them, and a call waits while every worker is busy). "
        "1 is allowed: then a hung call holds up every other until its timeout.",
    ),
]
SecretFileOption = Annotated[
    Path | None,
    typer.Option(
        "--secret-file",
        metavar="PATH",
        help="The cluster secret (make one with `scatter secret new`; mode 600). "
        "Default: $SCATTER_SECRET, else on loopback the secret this user's nodes share.",
        show_default=False,
    ),
]
ProfileOption = Annotated[
    str,
    typer.Option(
        "--profile",
        help="Membership timers: lan (memberlist's LAN defaults: a dead member is known "
        "in about 5-7 s) or local (fast, for a cluster on one machine).",
    ),
]


@node_app.command("start")
def node_start(
    ctx: typer.Context,
    address: AddressOption = None,
    data_dir: DataDirOption = None,
    background: BackgroundOption = False,
    call_timeout: CallTimeoutOption = DEFAULT_CALL_TIMEOUT,
    max_workers: MaxWorkersOption = NodeConfig.max_workers,
    secret_file: SecretFileOption = None,
    profile: ProfileOption = "lan",
) -> None:
    """Run a node. In the foreground it serves until Ctrl-C, SIGTERM or `scatter node stop`.

    A node restarted from its data directory rejoins the members it knew by itself.
    """
    _start_node(
        ctx, address, data_dir, background, call_timeout, max_workers, secret_file, profile, []
    )


@node_app.command("join")
def node_join(
    ctx: typer.Context,
    members: Annotated[
        list[str],
        typer.Argument(
            metavar="ADDR...",
            help="Members to join through, as host:port or tcp://host:port (one is enough).",
        ),
    ],
    address: AddressOption = None,
    data_dir: DataDirOption = None,
    background: BackgroundOption = False,
    call_timeout: CallTimeoutOption = DEFAULT_CALL_TIMEOUT,
    max_workers: MaxWorkersOption = NodeConfig.max_workers,
    secret_file: SecretFileOption = None,
    profile: ProfileOption = "lan",
) -> None:
    """Run a node that joins a cluster through ADDR; the same options as `node start`.

    Every member of one cluster needs the same cluster secret (--secret-file or
    $SCATTER_SECRET; on one machine, your own by default).
    """
    joined = [normalize_address(member) for member in members]
    _start_node(
        ctx, address, data_dir, background, call_timeout, max_workers, secret_file, profile, joined
    )


def _start_node(
    ctx: typer.Context,
    address: str | None,
    data_dir: str | None,
    background: bool,
    call_timeout: float,
    max_workers: int,
    secret_file: Path | None,
    profile: str,
    join: list[str],
) -> None:
    config = resolve_node_config(
        address or _address(ctx),
        data_dir,
        secret_file=secret_file,
        call_timeout=call_timeout,
        max_workers=max_workers,
        membership=membership_profile(profile),
        join=tuple(join),
    )
    if background:
        _refuse_if_listening(config.address)
        options = [
            f"--call-timeout={call_timeout}",
            f"--max-workers={max_workers}",
            f"--profile={profile}",
            *(f"--join={member}" for member in join),
        ]
        if secret_file is not None:
            options.append(f"--secret-file={secret_file.expanduser().resolve()}")
        pid = start_background_node(config.address, config.data_dir, node_options=options)
        _out.print(
            f"started a node at {config.address} in the background: pid {pid}, "
            f"data {config.data_dir}, log {config.data_dir / 'node.log'}",
            highlight=False,
        )
        return
    from ._node._server import run_node  # trio and the node stack: only when serving

    with contextlib.suppress(KeyboardInterrupt):
        run_node(config)


@node_app.command("leave")
def node_leave(ctx: typer.Context) -> None:
    """Make the node (at `scatter --address`) leave its cluster for good, then stop.

    It first hands every change it holds to a live member; then the cluster forgets it.

    Started again, its data directory starts empty, as a new node that rejoins.
    """
    with _client(ctx) as client:
        status = client.status()
        client.leave()
    _wait_until_stopped(status)
    _out.print(
        f"node {status.node_id} at {status.address} left its cluster and stopped",
        highlight=False,
    )


@node_app.command("forget")
def node_forget(
    ctx: typer.Context,
    nodes: Annotated[
        list[str],
        typer.Argument(
            metavar="NODE", help="Node ids of the members to forget (`scatter node status`)."
        ),
    ],
) -> None:
    """Forget members that crashed and whose data directories are gone, for good.

    Each must be dead (or left), and every other member alive (at `scatter --address`).

    Members stop keeping history for them, and refuse what they send.

    One that comes back after all refuses changes; it rejoins with a new data directory.

    A node that leaves (`scatter node leave`) needs no forget: it forgets itself.
    """
    with _client(ctx) as client:
        client.forget(nodes)
        status = client.status()
    _out.print(
        f"node {status.node_id} forgot {', '.join(nodes)}; every member hears of it",
        highlight=False,
    )


def _listening(address: str) -> bool:
    return port_open(*parse_address(address))


def _refuse_if_listening(address: str) -> None:
    # start_background_node waits for the port to open: with something already there it
    # would report the pid of a node that is about to fail to bind.
    if not _listening(address):
        return
    try:
        with Client(address, autostart=False) as client:
            status = client.status()
    except ScatterError:
        raise ScatterError(f"something other than a node already listens at {address}") from None
    raise ScatterError(
        f"a node already runs at {address} (pid {status.pid}); "
        "stop it with `scatter node stop` or pick another --address"
    )


@node_app.command("stop")
def node_stop(ctx: typer.Context) -> None:
    """Stop the node (at `scatter --address`) and wait until it no longer listens.

    Its cluster's members see it go silent and declare it dead; `node leave` says goodbye.
    """
    with _client(ctx) as client:
        status = client.status()
        client.shutdown()
    _wait_until_stopped(status)
    _out.print(
        f"stopped node {status.node_id} at {status.address} (pid {status.pid})", highlight=False
    )


def _wait_until_stopped(status: Any) -> None:
    deadline = time.monotonic() + STOP_WAIT
    while _listening(status.address):
        if time.monotonic() > deadline:
            raise ScatterError(
                f"the node at {status.address} (pid {status.pid}) still listens "
                f"{STOP_WAIT:g} s after it was told to stop"
            )
        time.sleep(0.05)


@node_app.command("status")
def node_status(
    ctx: typer.Context,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print the status as JSON (Client.status()'s fields)."),
    ] = False,
) -> None:
    """Show the node (at `scatter --address`): pid, id, address, data dir, uptime, load,
    and the member this client uses (another than the first address given after a failover)."""
    with _client(ctx) as client:
        status = client.status()
        in_use, left = client.address_in_use, client.failed_over_from
    if as_json:
        _print_json({**_record(status), "client_uses": in_use, "client_failed_over_from": left})
        return
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    rows = [
        ("pid", str(status.pid)),
        ("node id", f"{status.node_id} (start {status.incarnation})"),
        ("address", status.address),
        ("data dir", status.data_dir),
        ("uptime", _duration(status.uptime)),
        ("functions", f"{status.functions} ({status.changes} changes applied)"),
        ("versions", str(status.versions)),
        ("history", _history(status)),
        ("workers", f"{status.workers} ({status.busy_workers} busy) of at most {status.max_workers}"),
        ("leases", str(status.leases)),
        *([("saturated", _saturation(status))] if status.saturated else []),
        *(
            [("worker starts", f"{status.worker_start_failures} failed in a row: "
              f"{status.worker_start_error}")]
            if status.worker_start_failures
            else []
        ),
        ("python", status.python),
        ("scatter", status.scatter_version),
        ("client uses", in_use + (f" (failed over from {left}, unreachable)" if left else "")),
    ]
    for key, value in rows:
        grid.add_row(key, Text(value))
    _out.print(grid)
    if len(status.members) > 1:
        columns = [
            _Column(""),  # this node's marker
            _Column("member"),
            _Column("state"),
            _Column("behind"),
            _Column("incarnation"),
            _Column("address"),  # last: never cut short, under its row if need be
        ]
        cells = []
        for member in status.members:
            behind = member["changes_behind"]
            cells.append([
                "*" if member["node"] == status.node_id else "",
                member["node"],
                member["state"],
                "?" if behind < 0 else f"{behind} changes" if behind else "up to date",
                str(member["incarnation"] & 0xFFFFFFFF) + f" (start {member['incarnation'] >> 32})",
                member["address"],
            ])
        _out.print()
        _print_table(columns, cells)
        _out.print("* this node: the member this client uses", style="dim", highlight=False)


def _saturation(status: _wire.NodeStatus) -> str:
    return (
        f"yes: all {status.workers} workers busy and no more may start (--max-workers "
        f"{status.max_workers}); new calls wait for one to finish ({status.queued} queued "
        "so far)"
    )


def _history(status: _wire.NodeStatus) -> str:
    """The change log's bounded history: what is compacted, what is stable, what waits."""
    stable = "?" if status.stable_changes < 0 else str(status.stable_changes)
    words = (
        f"{status.compacted_changes} changes compacted, {stable} of the log's "
        f"{status.changes} seen by every member, {status.pending_changes} pending"
    )
    if status.void_changes:
        words += f", changes of {status.void_changes} writer(s) refused as void"
    if status.unconfirmed_changes:
        words += (
            f", {status.unconfirmed_changes} compacted kept for members that lack them "
            "(until they are back; `scatter node forget` one whose data is gone)"
        )
    if status.missing_bodies:
        words += f", {status.missing_bodies} bodies still to receive from the members"
    if status.forgotten:
        words += f"; forgotten for good: {', '.join(status.forgotten)}"
    return words


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    parts = [f"{days}d"] if days else []
    if days or hours:
        parts.append(f"{hours}h")
    if days or hours or minutes:
        parts.append(f"{minutes}m")
    parts.append(f"{seconds}s")
    return " ".join(parts)


def _when(timestamp: float | None) -> str:
    if not timestamp:
        return ""
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M")


# ---------------------------------------------------------------- functions


JsonOption = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Print the records as JSON (the fields the Python API returns), for scripts.",
    ),
]


def _print_json(value: Any) -> None:
    typer.echo(msgspec.json.format(msgspec.json.encode(value), indent=2).decode())


@app.command("ls")
def list_functions(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """List the node's functions (and sets) with their current versions."""
    with _client(ctx) as client:
        # The records scatter.functions() returns; fields a newer node appends are dropped.
        rows = msgspec.convert(client.functions(), list[FunctionInfo])
        address = client.address
    rows.sort(key=lambda row: row.name)
    if as_json:
        _print_json(rows)
        return
    if not rows:
        _out.print(f"no functions on the node at {address}", style="dim", highlight=False)
        return
    with_sets = any(row.set_name for row in rows)
    origins = {row.origin for row in rows}
    columns = [
        _Column("name", style="bold cyan", fold=True),
        _Column("version", justify="right"),
        *([_Column("set")] if with_sets else []),
        _Column("published"),
        *([_Column("origin")] if len(origins) > 1 else []),
        _Column("signature"),
    ]
    cells = [
        [
            row.name,
            f"v{row.version}",
            *([row.set_name or ""] if with_sets else []),
            _when(row.created_at),
            *([row.origin] if len(origins) > 1 else []),
            _signature(row),
        ]
        for row in rows
    ]
    _out.print(f"functions at {address}", style="bold", highlight=False)
    _print_table(columns, cells)
    if len(origins) == 1:
        _out.print(f"all published through node {origins.pop()}", style="dim", highlight=False)


def _signature(row: FunctionInfo | VersionInfo) -> str:
    if row.kind == "set":
        return "set: " + ", ".join(f"{n} v{v}" for n, v in sorted(row.members.items()))
    return row.signature_text


@app.command("versions")
def list_versions(
    ctx: typer.Context,
    name: FunctionOrSetName,
    limit: Annotated[
        int | None,
        typer.Option("--limit", "-n", min=1, metavar="N", help="Show the newest N versions only."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Show the version history of NAME: current version marked, merge conflicts noted."""
    with _client(ctx) as client:
        # The records scatter.versions() returns, oldest first.
        rows = msgspec.convert(client.versions(name), list[VersionInfo])
    rows.sort(key=lambda row: row.version)
    total = len(rows)
    if limit is not None:
        rows = rows[-limit:]
    if as_json:
        _print_json(rows)
        return
    with_conflicts = any(row.conflict for row in rows)
    origins = {row.origin for row in rows}
    columns = [
        _Column(""),  # the current marker
        _Column("version", justify="right"),
        _Column("published"),
        _Column("content id"),
        *([_Column("origin")] if len(origins) > 1 else []),
        # The one conflict rule moved these versions off the number their origin gave.
        *([_Column("conflict", style="yellow", under=True)] if with_conflicts else []),
        _Column("signature"),
    ]
    cells = [
        [
            "*" if row.current else "",
            f"v{row.version}",
            _when(row.created_at),
            row.content_id[:12],
            *([row.origin] if len(origins) > 1 else []),
            *(
                [f"proposed as v{row.proposed_version}, renumbered" if row.conflict else ""]
                if with_conflicts
                else []
            ),
            _signature(row),
        ]
        for row in rows
    ]
    _out.print(f"versions of {name}", style="bold", highlight=False)
    _print_table(columns, cells, ["bold green" if row.current else "" for row in rows])
    notes = ["* current version"]
    if len(rows) < total:
        notes.append(f"newest {len(rows)} of {total} versions")
    if len(origins) == 1:
        notes.append(f"all published through node {next(iter(origins))}")
    _out.print("; ".join(notes), style="dim", highlight=False)


# ---------------------------------------------------------------- tables

# Tables are drawn here rather than by rich.Table, which shares out a narrow terminal's
# columns by itself: at 80 columns (and always when piped) it squeezed a signature to
# "(… i… b: i…" to keep room for a node id repeated on every row. Here every column but
# the last keeps its width, and the last one, the signature, wraps between parameters;
# when fewer than MIN_SIGNATURE_WIDTH columns are left, it goes under its row instead.
_GAP = "  "
MIN_SIGNATURE_WIDTH = 24
_INDENT = "    "  # of a signature under its row


@dataclass(frozen=True)
class _Column:
    header: str
    justify: Literal["left", "right"] = "left"
    style: str = ""
    # Long cells fold onto more lines (a 128-character name) instead of taking the row.
    fold: bool = False
    # When the signature goes under its row, so does this cell, as "header: value".
    under: bool = False


def _print_table(
    columns: Sequence[_Column],
    cells: Sequence[Sequence[str]],
    row_styles: Sequence[str] | None = None,
) -> None:
    """Print ``cells`` under ``columns``; the last column wraps to fit the console."""
    width = _out.width
    widths = [
        max([cell_len(column.header), *(cell_len(row[i]) for row in cells)])
        for i, column in enumerate(columns)
    ]
    for i, column in enumerate(columns[:-1]):
        if column.fold:
            widths[i] = min(widths[i], max(cell_len(column.header), 16, width // 4))
    used = sum(widths[:-1]) + len(_GAP) * (len(widths) - 1)
    inline = width - used >= min(widths[-1], MIN_SIGNATURE_WIDTH)
    # {column index: width} of the cells drawn in the row itself
    in_row = {
        i: widths[i] for i, column in enumerate(columns[:-1]) if inline or not column.under
    }
    if inline:
        in_row[len(columns) - 1] = min(widths[-1], width - used)
    under_width = max(width - len(_INDENT), 20)

    def line(parts: list[tuple[str, int, _Column]], style: str) -> Text:
        text = Text(style=style)
        for j, (value, column_width, column) in enumerate(parts):
            if j:
                text.append(_GAP)
            pad = " " * (column_width - cell_len(value))
            value_text = Text(value, style=column.style)
            text.append_text(
                Text.assemble(pad, value_text)
                if column.justify == "right"
                else Text.assemble(value_text, pad)
            )
        text.rstrip()
        return text

    _out.print(line([(columns[i].header, w, columns[i]) for i, w in in_row.items()], "bold"))
    for index, row in enumerate(cells):
        style = row_styles[index] if row_styles else ""
        blocks = {
            i: _wrap_signature(row[i], w)
            if i == len(columns) - 1
            else chop_cells(row[i], w)
            if columns[i].fold and cell_len(row[i]) > w
            else [row[i]]
            for i, w in in_row.items()
        }
        for k in range(max(len(block) for block in blocks.values())):
            parts = [
                (block[k] if k < len(block) else "", in_row[i], columns[i])
                for i, block in blocks.items()
            ]
            _out.print(line(parts, style))
        if inline:
            continue
        for i, column in enumerate(columns[:-1]):
            if i not in in_row and row[i]:
                note = Text(f"{_INDENT}{column.header}: ", style=style)
                _out.print(note.append(row[i], style=column.style))
        for piece in _wrap_signature(row[-1], under_width):
            _out.print(Text(_INDENT + piece, style=style))


def _wrap_signature(text: str, width: int) -> list[str]:
    """``text`` in lines of at most ``width`` cells, broken between parameters if it can be.

    Only spaces become line breaks, so the lines joined with spaces are ``text`` again.
    """
    lines: list[str] = []
    current = ""
    for piece in _signature_pieces(text):
        candidate = f"{current} {piece}" if current else piece
        if cell_len(candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = ""
        for word in piece.split(" "):  # a parameter longer than a line: break between words
            candidate = f"{current} {word}" if current else word
            if cell_len(candidate) <= width:
                current = candidate
                continue
            if current:
                lines.append(current)
            *full, current = chop_cells(word, width) or [""]
            lines.extend(full)
    lines.append(current)
    return lines


def _signature_pieces(text: str) -> list[str]:
    """``(a: int, b: dict[str, int]) -> int`` as ``["(a: int,", "b: dict[str, int])", "-> int"]``.

    Splits after the commas between parameters (and a set's members) and before the
    return arrow: not inside brackets or quoted defaults.
    """
    pieces: list[str] = []
    depth = 0
    quote = ""
    start = 0
    i = 0
    while i < len(text):
        char = text[i]
        if quote:
            if char == "\\":
                i += 1
            elif char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        # depth 1 inside the parameter list's own parentheses, 0 in a set's member list.
        elif char == " " and (
            (text[i - 1] == "," and depth <= (1 if text.startswith("(") else 0))
            or (depth == 0 and text.startswith("-> ", i + 1))
        ):
            pieces.append(text[start:i])
            start = i + 1
        i += 1
    pieces.append(text[start:])
    return pieces


@app.command("show")
def show(
    ctx: typer.Context,
    name: FunctionName,
    version: Annotated[
        int | None,
        typer.Option("--version", "-v", help="Show this version. Default: the current one."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Print the source of NAME (syntax highlighted on a terminal)."""
    with _client(ctx) as client:
        description = client.describe(name, version, source=True)
    if as_json:
        _print_json(_record(description, "signature"))  # always b"" since protocol 3
        return
    source = description.source
    if source is None:
        # Published from somewhere inspect cannot read back (a REPL, exec'd code).
        source = (
            f"# source not available for {name} v{description.version}\n"
            f"def {name}{description.signature_text}: ...\n"
        )
    if _out.is_terminal:
        _out.print(Syntax(source.rstrip("\n"), "python", theme="ansi_dark", line_numbers=False))
    else:
        typer.echo(source.rstrip("\n"))


def _record(reply: msgspec.Struct, *drop: str) -> dict[str, Any]:
    """A wire reply's fields by name, without its request id (and ``drop``)."""
    fields = msgspec.structs.asdict(reply)
    for name in ("id", *drop):
        fields.pop(name, None)
    return fields


@app.command("rollback")
def rollback(
    ctx: typer.Context,
    name: FunctionOrSetName,
    to: Annotated[
        int | None,
        typer.Option("--to", help="Make this version current. Default: the previous one."),
    ] = None,
) -> None:
    """Make the previous version of NAME (or version --to) current again."""
    with _client(ctx) as client:
        version = client.rollback(name, to)
    _out.print(f"{name}: version {version} is current", highlight=False)


@app.command("rm")
def remove(
    ctx: typer.Context,
    name: FunctionOrSetName,
) -> None:
    """Vaporize NAME: delete it and all its versions (numbers are never reused)."""
    with _client(ctx) as client:
        client.vaporize(name)
    _out.print(f"{name}: vaporized", highlight=False)


@app.command(
    "call",
    # `scatter call neg -5`: a negative number is an argument, not an option.
    context_settings={"ignore_unknown_options": True},
)
def call(
    ctx: typer.Context,
    name: FunctionName,
    arguments: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="ARG",
            help="Positional values in parameter order, then key=value keywords. A value "
            "is parsed as JSON unless its parameter is annotated `str` (text that is not "
            "JSON is passed as a string). A float may be nan, inf or -inf; bytes are "
            "b64:BASE64, @FILE or @- (stdin).",
            show_default=False,
        ),
    ] = None,
    version: Annotated[
        int | None,
        typer.Option("--version", "-v", help="Run this version. Default: the current one."),
    ] = None,
) -> None:
    """Call NAME with ARGs, validated against its signature; print the result as JSON
    (a generator function's items: one line each, as they come).

    Non-finite floats print as NaN and Infinity (as Python's json writes them); a result
    with no JSON form is printed as its repr.
    """
    with _client(ctx) as client:
        function = client.make_callable(name, version)
        signature = inspect.signature(function)
        try:
            args, kwargs = cli_arguments(signature, arguments or [])
            result = function(*args, **kwargs)
        except ScatterError:
            raise
        except TypeError as exc:
            # Python's own arity error from the binder: as much the user's mistake as a
            # ValidationError, so it gets the same one line.
            _fail(exc)
        if isinstance(result, RemoteStream):  # a generator: one JSON line per item, as made
            for item in result:
                typer.echo(_result_text(item))
            return
    typer.echo(_result_text(result))


def _result_text(result: Any) -> str:
    try:
        value = msgspec.to_builtins(result)
    except (TypeError, ValueError):
        return repr(result)
    if _has_non_finite(value):
        # msgspec writes NaN as null, which would read back as None.
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return msgspec.json.encode(value).decode()


def _has_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_non_finite(v) for v in value)
    return False


def cli_arguments(signature: inspect.Signature, raw: list[str]) -> tuple[list[Any], dict[str, Any]]:
    """Turn command-line words into ``(args, kwargs)`` for a function with ``signature``.

    Words map to positional parameters in order; ``key=value`` names a parameter (or
    goes to ``**kwargs``). A value is JSON unless the parameter is annotated ``str``; a
    value that is not JSON stays a string and the callable's validation judges it.
    Where the annotation takes a float, ``nan``, ``inf`` and ``-inf`` are floats; where
    it takes bytes, ``b64:BASE64`` is decoded and ``@PATH`` (``@-``: stdin) is read.
    Arity is left to the callable, which words its errors as Python does.

    Raises:
        TypeError: a positional word after a keyword one.
        ConfigError: bytes that are not base64 or a file that cannot be read.
    """
    kinds = inspect.Parameter
    params = list(signature.parameters.values())
    positional = [
        p for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)
    ]
    var_positional = next((p for p in params if p.kind is kinds.VAR_POSITIONAL), None)
    by_keyword = {
        p.name: p for p in params if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)
    }
    var_keyword = next((p for p in params if p.kind is kinds.VAR_KEYWORD), None)
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for word in raw:
        key, sep, value = word.partition("=")
        keyword = by_keyword.get(key) or (var_keyword if key.isidentifier() else None)
        if sep and keyword is not None:
            if key in kwargs:
                raise TypeError(f"{key}= given twice")
            kwargs[key] = _parse_value(value, keyword, key)
            continue
        if kwargs:
            raise TypeError(f"positional argument {word!r} follows a key=value argument")
        index = len(args)
        param = positional[index] if index < len(positional) else var_positional
        args.append(_parse_value(word, param, param.name if param else f"#{index + 1}"))
    return args, kwargs


_NON_FINITE = {
    sign + word for sign in ("", "+", "-") for word in ("nan", "inf", "infinity")
}


def _parse_value(text: str, param: inspect.Parameter | None, label: str) -> Any:
    annotation = param.annotation if param is not None else inspect.Parameter.empty
    if annotation is str:
        return text
    if _takes(annotation, bytes, bytearray):
        if text.startswith("b64:"):
            try:
                return base64.b64decode(text[4:], validate=True)
            except binascii.Error as exc:
                raise ConfigError(f"argument {label!r}: {text[:20]!r} is not base64: {exc}") from None
        if text.startswith("@"):
            return _read_bytes(text[1:], label)
        if annotation in (bytes, bytearray):
            raise ConfigError(
                f"argument {label!r} takes bytes: give b64:BASE64, @FILE or @- (stdin)"
            )
    if _takes(annotation, float) and text.strip().lower() in _NON_FINITE:
        return float(text)
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError:
        pass
    try:
        return json.loads(text)  # JSON with NaN or Infinity in it: [1.5, NaN]
    except ValueError:
        return text


def _takes(annotation: Any, *kinds: type) -> bool:
    """Whether ``annotation`` (or a member of its union) is one of ``kinds``."""
    if annotation in kinds:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _takes(typing.get_args(annotation)[0], *kinds)
    if origin is typing.Union or origin is types.UnionType:
        return any(_takes(arg, *kinds) for arg in typing.get_args(annotation))
    return False


def _read_bytes(path: str, label: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(f"argument {label!r}: cannot read {path}: {exc.strerror}") from None


def main() -> None:
    """The ``scatter`` console script and ``python -m scatter``."""
    app(prog_name="scatter")
