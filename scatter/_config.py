"""Configuration: defaults, profiles and the one place that reads ``SCATTER_*``.

Precedence is arguments, then environment, then defaults, resolved only in
:func:`resolve_client_config` and :func:`resolve_node_config`. A bad environment
value raises :class:`~scatter.ConfigError` naming the variable.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

from ._core._membership import MembershipConfig
from ._exceptions import ConfigError

DEFAULT_PORT = 4242
DEFAULT_CALL_TIMEOUT = 30.0  # seconds; a function's own timeout or a per-call one overrides it
DEFAULT_CONNECT_TIMEOUT = 5.0  # seconds a client waits for a node's control answer

# Frames above this are refused before decoding: a function body or an argument list
# larger than this is almost certainly a mistake, and it bounds a node's memory per message.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

ENV_ADDRESS = "SCATTER_ADDRESS"
ENV_DATA_DIR = "SCATTER_DATA_DIR"
ENV_AUTOSTART = "SCATTER_AUTOSTART"
ENV_SECRET = "SCATTER_SECRET"
# A test hook, never for production: "0" starts a node that never pushes, gossips or
# starts anti-entropy for registry changes (NodeConfig.registry_gossip).
ENV_TEST_REGISTRY_GOSSIP = "SCATTER_TEST_REGISTRY_GOSSIP"
# "1": a node logs every change of a member's state or incarnation (NodeConfig.log_membership).
ENV_LOG_MEMBERSHIP = "SCATTER_LOG_MEMBERSHIP"
# Bounded history (NodeConfig.history_grace, compact_after): seconds, and a count.
ENV_HISTORY_GRACE = "SCATTER_HISTORY_GRACE"
ENV_COMPACT_AFTER = "SCATTER_COMPACT_AFTER"
# Bytes of bodies one node-to-node message carries at most (NodeConfig.max_push_bytes).
ENV_MAX_PUSH_BYTES = "SCATTER_MAX_PUSH_BYTES"


def default_address(uid: int | None = None) -> str:
    """The node address of this OS user when none is configured: private to the user.

    Two users of one machine must never share a node by accident (each has its own
    data directory and secret). On Linux all of 127.0.0.0/8 is loopback, so each user
    gets a host of their own on port 4242: 127.0.0.1 plus the uid (root, uid 0:
    ``tcp://127.0.0.1:4242``; uid 1000: ``tcp://127.0.3.233:4242``). Elsewhere only
    127.0.0.1 answers, so the port moves instead: 4242 + uid modulo 20,000.
    """
    if uid is None:
        uid = os.getuid() if hasattr(os, "getuid") else 0
    if sys.platform.startswith("linux"):
        host = ipaddress.IPv4Address("127.0.0.1") + (uid % (2**24 - 2))
        return f"tcp://{host}:{DEFAULT_PORT}"
    return f"tcp://127.0.0.1:{DEFAULT_PORT + uid % 20_000}"


DEFAULT_ADDRESS = default_address()


def default_data_dir() -> Path:
    """The user's data directory for Scatter (XDG on Linux, the platform's idea elsewhere)."""
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    elif os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "scatter"


def parse_address(address: str) -> tuple[str, int]:
    """Split ``tcp://HOST:PORT`` into its host and port, or raise ConfigError."""
    parts = urlsplit(address)
    if parts.scheme != "tcp" or not parts.hostname or parts.port is None:
        raise ConfigError(
            f"bad node address {address!r}: expected tcp://HOST:PORT, such as {DEFAULT_ADDRESS}"
        )
    return parts.hostname, parts.port


def membership_profile(name: str) -> MembershipConfig:
    """A named membership profile: "lan" (memberlist's LAN defaults) or "local" (fast)."""
    if name == "lan":
        return MembershipConfig.lan()
    if name == "local":
        return MembershipConfig.local()
    raise ConfigError(f"unknown membership profile {name!r}: use lan or local")


def normalize_address(address: str) -> str:
    """``host:port`` or ``tcp://host:port`` as ``tcp://host:port``; ConfigError if neither."""
    text = address.strip()
    if "://" not in text:
        text = f"tcp://{text}"
    parse_address(text)
    return text


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def data_dir_for(address: str, root: Path | None = None) -> Path:
    """Where the node listening at ``address`` keeps its replica when none is configured.

    One directory per port, so two local nodes started with the defaults never share a store.
    """
    host, port = parse_address(address)
    return (root or default_data_dir()) / f"node-{host}-{port}"


@dataclass(frozen=True)
class ClientConfig:
    """How a client finds and talks to a node."""

    address: str = DEFAULT_ADDRESS
    # Start a detached local node when none answers at a loopback address and the user
    # configured none. Off when SCATTER_AUTOSTART=0 or when an address was configured.
    autostart: bool = True
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT  # seconds per control request
    data_dir: Path | None = None  # for an auto-started node; None: data_dir_for(address)
    # The cluster or call-only secret; None: this user's own (read from
    # `default_data_dir()/secret`, which the user's loopback nodes make).
    secret: str | None = None
    # Every address given (``address`` is the first): members a client may fail over to
    # before it has learned the member list from its node. Empty: ``(address,)``.
    addresses: tuple[str, ...] = ()


def split_addresses(addresses: str | Sequence[str]) -> tuple[str, ...]:
    """Several node addresses, as a sequence or one comma-separated string, each checked
    (ConfigError); duplicates dropped, order kept."""
    parts = addresses.split(",") if isinstance(addresses, str) else list(addresses)
    found: list[str] = []
    for part in parts:
        if not isinstance(part, str):
            raise ConfigError(f"a node address is a str such as {DEFAULT_ADDRESS}, not {part!r}")
        text = part.strip()
        if not text:
            continue
        parse_address(text)
        if text not in found:
            found.append(text)
    if not found:
        raise ConfigError(f"no node address in {addresses!r}")
    return tuple(found)


@dataclass(frozen=True)
class NodeConfig:
    """How a node listens, stores and executes.

    Use a profile, then override what differs: ``NodeConfig.local(address=...)``.
    """

    address: str = DEFAULT_ADDRESS
    data_dir: Path = field(default_factory=lambda: data_dir_for(DEFAULT_ADDRESS))
    # Timeout of a call when neither the call nor the function sets one (seconds).
    call_timeout: float = DEFAULT_CALL_TIMEOUT
    # Worker processes kept warm. Each client connection leases one; a hung or CPU-heavy
    # call then holds up only its own caller. More workers cost ~30 MB of memory each.
    min_workers: int = 2
    # The pool grows on demand up to this; beyond it, leases share workers (least loaded).
    max_workers: int = 16
    # Unleased idle workers above min_workers are retired after this long (seconds).
    worker_idle_retire: float = 60.0
    # A call past its deadline first gets a soft interrupt (CallTimeout raised inside the
    # function); if it is still running this long after, its worker is killed and replaced.
    kill_grace: float = 1.0  # seconds
    # How often the node looks at worker deadlines: the hard kill's precision (seconds).
    # (A worker interrupts its own call at the deadline; see _worker.py.)
    supervise_interval: float = 0.02
    # A worker that has not said READY after this long is killed and started again,
    # with back-off (seconds). Generous: a loaded machine imports slowly.
    worker_start_timeout: float = 60.0
    max_message_bytes: int = MAX_MESSAGE_BYTES
    # Membership timers (SWIM + Lifeguard): the LAN profile, memberlist's defaults; a
    # loopback cluster for tests may take MembershipConfig.local() (`--profile local`).
    membership: MembershipConfig = field(default_factory=MembershipConfig.lan)
    # Every interval, one random member gets this node's registry clock and sends back
    # what this node lacks (seconds). The digest is one counter per writer: cheap.
    anti_entropy_interval: float = 1.0
    # Read your writes: a read whose client has seen registry changes this node lacks is
    # held while the node pulls them from the members that made them, at most this long
    # (seconds; a call's catch-up at most half its timeout); then it is answered with
    # what the node holds, saying what it had not received.
    read_wait: float = 2.0
    # A test hook (SCATTER_TEST_REGISTRY_GOSSIP=0), never for production: False makes a
    # node that never pushes its changes, gossips them or starts anti-entropy; it still
    # answers digests, so it learns and spreads changes only through pulls (read your
    # writes) and the anti-entropy rounds of nodes that have it on.
    registry_gossip: bool = True
    # One log line per change of a member's state or incarnation, with the monotonic
    # time (SCATTER_LOG_MEMBERSHIP=1): to follow a partition's heal across nodes' logs.
    log_membership: bool = False
    # Bounded history (cluster/README.md). A member dead or gone for longer than this
    # no longer holds back the compaction of what every other member has seen; should it
    # come back, it gets a full state transfer, and what it changed while away is
    # re-issued on top (seconds; 7 days, as Riak's and below Cassandra's 10-day
    # gc_grace_seconds: an outage longer than a week is a rebuild, not a hiccup).
    history_grace: float = 7 * 24 * 3600.0
    # Changes every member has seen are folded into the snapshot once at least this many
    # are (a snapshot write costs O(live registry): not worth it for every change).
    compact_after: int = 256
    # Bytes of bodies one node-to-node message carries at most (beyond one body, which
    # always goes): a full state transfer of a large registry, or a push of many big
    # versions, sends what fits, and the receiver asks for the rest (PeerBodiesWanted)
    # in messages of this size, so none nears max_message_bytes.
    max_push_bytes: int = 16 * 2**20
    # Members to join through at start (`scatter node join ADDR`), beyond those the
    # node remembers from its last run.
    join: tuple[str, ...] = ()
    # The cluster secret. None: on loopback, this user's own (made at first start in
    # `default_data_dir()/secret`, mode 0600); beyond loopback, refused.
    secret: str | None = None

    def __post_init__(self) -> None:
        # The shared-memory file has this many worker slots (see _node/_slots.py).
        if not 1 <= self.max_workers <= 256:
            raise ConfigError(f"max_workers must be between 1 and 256, got {self.max_workers}")
        # `--max-workers 1` is honoured, not raised to the floor: a user who asks for one
        # process (a small machine) gets one, and `scatter node status` says when it is
        # saturated. The floor never exceeds the ceiling.
        if self.min_workers > self.max_workers:
            object.__setattr__(self, "min_workers", self.max_workers)
        if self.max_push_bytes < 1:
            raise ConfigError(f"max_push_bytes must be at least 1, got {self.max_push_bytes}")

    @classmethod
    def local(cls, **overrides: object) -> NodeConfig:
        """Loopback: the default profile for a node on one machine (LAN membership timers;
        pass ``membership=MembershipConfig.local()`` for a fast test cluster)."""
        return replace(cls(), **overrides)  # type: ignore[arg-type]


def _env_bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={value!r} is not a boolean; use 1 or 0")


def resolve_client_config(
    address: str | Sequence[str] | None = None,
    *,
    secret: str | None = None,
    environ: dict[str, str] | None = None,
) -> ClientConfig:
    """Arguments, then SCATTER_* variables, then defaults."""
    env = os.environ if environ is None else environ
    configured = address is not None or ENV_ADDRESS in env
    given = address or env.get(ENV_ADDRESS) or default_address()
    try:
        addresses = split_addresses(given)
    except ConfigError as exc:
        if address is None and ENV_ADDRESS in env:
            raise ConfigError(f"{ENV_ADDRESS}: {exc}") from None
        raise
    resolved = addresses[0]
    autostart = True
    if env.get(ENV_AUTOSTART, "").strip():  # empty counts as unset
        autostart = _env_bool(ENV_AUTOSTART, env[ENV_AUTOSTART])
    data_dir = Path(env[ENV_DATA_DIR]) if env.get(ENV_DATA_DIR) else None
    return ClientConfig(
        address=resolved,
        # A configured address means the user runs their node; only the default one
        # (or one set through SCATTER_ADDRESS on loopback) may be started for them.
        # Several addresses are a cluster's: the client fails over, never starts a node.
        autostart=autostart
        and len(addresses) == 1
        and (not configured or is_loopback(parse_address(resolved)[0])),
        data_dir=data_dir,
        secret=_resolve_secret(secret, None, env),
        addresses=addresses,
    )


def resolve_node_config(
    address: str | None = None,
    data_dir: str | Path | None = None,
    *,
    secret_file: str | Path | None = None,
    environ: dict[str, str] | None = None,
    **overrides: object,
) -> NodeConfig:
    """Arguments, then SCATTER_* variables, then the local profile's defaults.

    Raises:
        ConfigError: a bad value, or an address beyond loopback without a secret.
    """
    env = os.environ if environ is None else environ
    resolved = address or env.get(ENV_ADDRESS) or default_address()
    host, _port = parse_address(resolved)
    secret = _resolve_secret(None, secret_file, env)
    if secret is not None and secret.startswith("call-only:"):
        raise ConfigError(
            "a node needs the cluster secret, not a call-only one: it serves and changes code"
        )
    if secret is None and not is_loopback(host):
        raise ConfigError(
            f"refusing to listen on {resolved} without a cluster secret: anyone who can "
            "reach it could run code here. Make one with `scatter secret new > cluster.key`, "
            "copy it to every machine of the cluster (mode 600), and start the node with "
            "--secret-file cluster.key (or SCATTER_SECRET)"
        )
    if data_dir is None and env.get(ENV_DATA_DIR):
        data_dir = env[ENV_DATA_DIR]
    if env.get(ENV_TEST_REGISTRY_GOSSIP, "").strip() and "registry_gossip" not in overrides:
        overrides["registry_gossip"] = _env_bool(
            ENV_TEST_REGISTRY_GOSSIP, env[ENV_TEST_REGISTRY_GOSSIP]
        )
    if env.get(ENV_LOG_MEMBERSHIP, "").strip() and "log_membership" not in overrides:
        overrides["log_membership"] = _env_bool(ENV_LOG_MEMBERSHIP, env[ENV_LOG_MEMBERSHIP])
    for name, key, kind in (
        (ENV_HISTORY_GRACE, "history_grace", float),
        (ENV_COMPACT_AFTER, "compact_after", int),
        (ENV_MAX_PUSH_BYTES, "max_push_bytes", int),
    ):
        if env.get(name, "").strip() and key not in overrides:
            try:
                overrides[key] = kind(env[name])
            except ValueError:
                raise ConfigError(f"{name} must be a number, got {env[name]!r}") from None
    path = Path(data_dir) if data_dir is not None else data_dir_for(resolved)
    return NodeConfig.local(address=resolved, data_dir=path.expanduser(), secret=secret, **overrides)


def _resolve_secret(
    given: str | None, secret_file: str | Path | None, env: Mapping[str, str]
) -> str | None:
    # Imported here: _security needs zmq, which the config module should not pull in
    # for a `--help`.
    from ._security import check_secret, read_secret_file

    if given is not None:
        return check_secret(given, "the secret argument")
    if secret_file is not None:
        try:
            return read_secret_file(Path(secret_file).expanduser())
        except OSError as exc:
            raise ConfigError(f"cannot read the secret file {secret_file}: {exc.strerror}") from None
    if env.get(ENV_SECRET, "").strip():
        return check_secret(env[ENV_SECRET], ENV_SECRET)
    return None
