"""The command line: a skin over the Python API, never a requirement.

Every command maps onto one public call (``scatter ls`` is ``Client.functions()``,
``scatter rollback`` is ``Client.rollback()``), as httpx's ``_main.py`` maps onto
``Client``. Errors are caught once, at the top (``_ScatterGroup.invoke``): a
``ScatterError`` becomes one red line ``error: ...`` on stderr and exit code 1, never a
traceback. Anything else escaping a command is a bug and keeps its traceback.

Commands talk to the node at ``--address`` (before the command: ``scatter --address
tcp://127.0.0.1:5000 ls``), else ``SCATTER_ADDRESS``, else ``tcp://127.0.0.1:4242``: the
library's own resolution. They never auto-start a node (``scatter node status`` must
not start the node it asks about); ``scatter node start`` does that on purpose.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import msgspec
import typer
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from ._client import Client, start_background_node
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


@app.callback()
def _root(
    ctx: typer.Context,
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            "-a",
            metavar="tcp://HOST:PORT",
            help="The node to talk to. Default: $SCATTER_ADDRESS, else tcp://127.0.0.1:4242.",
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
        "this, connections share them).",
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
        max_workers=max(max_workers, NodeConfig.min_workers),
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
    """Make the node (at `scatter --address`) leave its cluster gracefully, then stop."""
    with _client(ctx) as client:
        status = client.status()
        client.leave()
    _wait_until_stopped(status)
    _out.print(
        f"node {status.node_id} at {status.address} left its cluster and stopped",
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
def node_status(ctx: typer.Context) -> None:
    """Show the node (at `scatter --address`): pid, id, address, data dir, uptime, load."""
    with _client(ctx) as client:
        status = client.status()
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    rows = [
        ("pid", str(status.pid)),
        ("node id", f"{status.node_id} (start {status.incarnation})"),
        ("address", status.address),
        ("data dir", status.data_dir),
        ("uptime", _duration(time.time() - status.started_at)),
        ("functions", f"{status.functions} ({status.changes} changes applied)"),
        ("versions", str(status.versions)),
        ("workers", f"{status.workers} ({status.busy_workers} busy)"),
        ("leases", str(status.leases)),
        *(
            [("worker starts", f"{status.worker_start_failures} failed in a row: "
              f"{status.worker_start_error}")]
            if status.worker_start_failures
            else []
        ),
        ("python", status.python),
        ("scatter", status.scatter_version),
    ]
    for key, value in rows:
        grid.add_row(key, Text(value))
    _out.print(grid)
    if len(status.members) > 1:
        table = Table(box=None, header_style="bold", pad_edge=False)
        for column in ("member", "state", "incarnation", "address", "behind"):
            table.add_column(column)
        for member in status.members:
            behind = member["changes_behind"]
            table.add_row(
                member["node"] + (" (this node)" if member["node"] == status.node_id else ""),
                member["state"],
                str(member["incarnation"] & 0xFFFFFFFF) + f" (start {member['incarnation'] >> 32})",
                member["address"],
                "?" if behind < 0 else f"{behind} changes" if behind else "up to date",
            )
        _out.print(table)


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


@app.command("ls")
def list_functions(ctx: typer.Context) -> None:
    """List the node's functions (and sets) with their current versions."""
    with _client(ctx) as client:
        # Rows as the node sends them ({field: value} of FunctionInfo): the CLI shows
        # fields, it needs no typed record (and stays readable if a field is appended).
        rows = client.functions()
        address = client.address
    if not rows:
        _out.print(f"no functions on the node at {address}", style="dim", highlight=False)
        return
    with_sets = any(row.get("set_name") for row in rows)
    table = Table(title=f"functions at {address}", title_justify="left")
    table.add_column("name", style="bold cyan", no_wrap=True)
    table.add_column("version", justify="right", no_wrap=True)
    table.add_column("signature", ratio=1)
    if with_sets:
        table.add_column("set", no_wrap=True)
    table.add_column("published", no_wrap=True)
    table.add_column("origin", no_wrap=True)
    for row in sorted(rows, key=lambda r: str(r.get("name"))):
        cells: list[str | Text] = [
            str(row.get("name")),
            f"v{row.get('version')}",
            Text(_signature(row, with_name=False)),
        ]
        if with_sets:
            cells.append(row.get("set_name") or "")
        cells += [_when(row.get("created_at")), str(row.get("origin", ""))]
        table.add_row(*cells)
    _out.print(table)


def _signature(row: dict[str, Any], *, with_name: bool = True) -> str:
    if row.get("kind") == "set":
        members = row.get("members") or {}
        return "set: " + ", ".join(f"{n} v{v}" for n, v in sorted(members.items()))
    text = str(row.get("signature_text", ""))
    return f"{row.get('name')}{text}" if with_name else text


@app.command("versions")
def list_versions(
    ctx: typer.Context,
    name: FunctionOrSetName,
) -> None:
    """Show the version history of NAME: current version marked, merge conflicts noted."""
    with _client(ctx) as client:
        rows = client.versions(name)  # [{field: value} of VersionInfo]
    with_conflicts = any(row.get("conflict") for row in rows)
    table = Table(title=f"versions of {name}", title_justify="left")
    table.add_column("", no_wrap=True)  # the current marker
    table.add_column("version", justify="right", no_wrap=True)
    table.add_column("signature", ratio=1)
    table.add_column("content id", no_wrap=True)
    table.add_column("published", no_wrap=True)
    table.add_column("origin", no_wrap=True)
    if with_conflicts:
        table.add_column("conflict")
    for row in sorted(rows, key=lambda r: int(r.get("version", 0))):
        current = bool(row.get("current"))
        cells: list[str | Text] = [
            "*" if current else "",
            f"v{row.get('version')}",
            Text(_signature(row, with_name=False)),
            str(row.get("content_id", ""))[:12],
            _when(row.get("created_at")),
            str(row.get("origin", "")),
        ]
        if with_conflicts:
            # The one conflict rule moved this version off the number its origin gave it.
            moved = f"proposed as v{row.get('proposed_version')}, renumbered"
            cells.append(Text(moved if row.get("conflict") else "", style="yellow"))
        table.add_row(*cells, style="bold green" if current else None)
    _out.print(table)
    _out.print("* current version", style="dim", highlight=False)


@app.command("show")
def show(
    ctx: typer.Context,
    name: FunctionName,
    version: Annotated[
        int | None,
        typer.Option("--version", "-v", help="Show this version. Default: the current one."),
    ] = None,
) -> None:
    """Print the source of NAME (syntax highlighted on a terminal)."""
    with _client(ctx) as client:
        description = client.describe(name, version, source=True)
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
            "JSON is passed as a string).",
            show_default=False,
        ),
    ] = None,
    version: Annotated[
        int | None,
        typer.Option("--version", "-v", help="Run this version. Default: the current one."),
    ] = None,
) -> None:
    """Call NAME with ARGs, validated against its signature; print the result as JSON.

    A result with no JSON form is printed as its repr.
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
    try:
        text = msgspec.json.encode(result).decode()
    except (TypeError, ValueError):
        text = repr(result)
    typer.echo(text)


def cli_arguments(signature: inspect.Signature, raw: list[str]) -> tuple[list[Any], dict[str, Any]]:
    """Turn command-line words into ``(args, kwargs)`` for a function with ``signature``.

    Words map to positional parameters in order; ``key=value`` names a parameter (or
    goes to ``**kwargs``). A value is JSON unless the parameter is annotated ``str``; a
    value that is not JSON stays a string and the callable's validation judges it.
    Arity is left to the callable, which words its errors as Python does.

    Raises:
        TypeError: a positional word after a keyword one.
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
            kwargs[key] = _parse_value(value, keyword)
            continue
        if kwargs:
            raise TypeError(f"positional argument {word!r} follows a key=value argument")
        index = len(args)
        param = positional[index] if index < len(positional) else var_positional
        args.append(_parse_value(word, param))
    return args, kwargs


def _parse_value(text: str, param: inspect.Parameter | None) -> Any:
    if param is not None and param.annotation is str:
        return text
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError:
        return text


def main() -> None:
    """The ``scatter`` console script and ``python -m scatter``."""
    app(prog_name="scatter")
