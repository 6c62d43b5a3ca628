"""Secrets, keys and roles: who may talk to a node, and what they may ask.

A function is code: whoever may scatter may run code on every node. So every node has a
secret, always (Jupyter's connection files are the model):

* the **cluster secret**, given with ``SCATTER_SECRET`` or ``--secret-file``, or, for a
  node on loopback with none given, a random one that the node makes in its user's data
  directory (``secret``, mode 0600) and that clients of the same user read there;
* the **call-only secret**, derived from it (``scatter secret call-only``): it may call,
  describe and list, nothing else.

Every TCP connection uses CurveZMQ with keys derived from the secret:

* the node's server key pair from the cluster secret alone, so only its holders can
  serve (the call-only secret carries the server's public key, not its secret one);
* one client key pair per role (deploy, call, and peer for node-to-node traffic); the
  node's ZAP handler maps a client's public key to its role, and refuses every other key;
* workers serve calls to both roles; their own ZAP handler tells each call's role, so
  that a call-only client's pickles (code) are refused unloaded.

Local Unix sockets and the data directory are created under umask 077, so only the
node's user can open them.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import zmq
from zmq.utils import z85

from ._exceptions import ConfigError

Role = Literal["deploy", "call", "peer"]
ROLES: tuple[Role, ...] = ("deploy", "call", "peer")

SECRET_FILE_NAME = "secret"  # in the user's data directory, for nodes given none
CALL_ONLY_PREFIX = "call-only:"
MIN_SECRET_LENGTH = 16  # characters; `scatter secret new` makes 43
# How a node hands its CURVE server key to its workers (their environment, which only
# the user can read; a command line is anyone's). The worker removes it at start.
WORKER_KEY_VARIABLE = "SCATTER_WORKER_SERVER_KEY"
# ... and the client keys with their roles ("role:hex,..."): public, but a worker's ZAP
# needs them to know who calls (a call-only key may not send pickles).
WORKER_CLIENTS_VARIABLE = "SCATTER_WORKER_CLIENT_KEYS"


@dataclass(frozen=True)
class ClientKeys:
    """What a client needs: the server's public key, its own key pair, its role."""

    role: Role
    server_public: bytes  # z85
    public: bytes  # z85
    secret: bytes  # z85


@dataclass(frozen=True)
class NodeKeys:
    """What a node needs: its CURVE key pair, and the client keys of each role."""

    server_public: bytes  # z85
    server_secret: bytes  # z85
    clients: dict[bytes, Role]  # {client public key (32 raw bytes): role}
    peer: ClientKeys  # how this node connects to its peers


def new_secret() -> str:
    """A new random cluster secret (256 bits), as text safe for files and variables."""
    return secrets.token_urlsafe(32)


def check_secret(secret: str, origin: str) -> str:
    """The secret, stripped; ConfigError naming ``origin`` if it cannot be one."""
    secret = secret.strip()
    if secret.startswith(CALL_ONLY_PREFIX):
        _parse_call_only(secret, origin)
        return secret
    if len(secret) < MIN_SECRET_LENGTH:
        raise ConfigError(
            f"{origin}: a cluster secret needs at least {MIN_SECRET_LENGTH} characters; "
            "make one with `scatter secret new > cluster.key`"
        )
    return secret


def call_only_secret(cluster_secret: str) -> str:
    """The call-only secret of a cluster secret: call, describe and list, nothing else."""
    if cluster_secret.startswith(CALL_ONLY_PREFIX):
        raise ConfigError("that is a call-only secret already; give the cluster secret")
    seed = _derive(cluster_secret.encode(), b"call-only")
    # Hex, not z85: z85 has shell characters (`&`, `#`, `}`), and this goes in variables.
    server_public = z85.decode(_public(_derive(cluster_secret.encode(), b"server")))
    return f"{CALL_ONLY_PREFIX}{seed.hex()}:{server_public.hex()}"


def node_keys(cluster_secret: str) -> NodeKeys:
    if cluster_secret.startswith(CALL_ONLY_PREFIX):
        raise ConfigError(
            "a node needs the cluster secret, not a call-only one: it serves and changes code"
        )
    secret = cluster_secret.encode()
    server_secret = _derive(secret, b"server")
    call_seed = _derive(secret, b"call-only")
    deploy_public = _public(_derive(secret, b"deploy client"))
    call_public = _public(_derive(call_seed, b"call client"))
    peer_public = _public(_derive(secret, b"peer"))
    return NodeKeys(
        server_public=_public(server_secret),
        server_secret=z85.encode(server_secret),
        clients={
            z85.decode(deploy_public): "deploy",
            z85.decode(call_public): "call",
            z85.decode(peer_public): "peer",
        },
        peer=peer_keys(cluster_secret),
    )


def peer_keys(cluster_secret: str) -> ClientKeys:
    """The keys a node connects to its peers with: only cluster-secret holders have them."""
    secret = cluster_secret.encode()
    peer_secret = _derive(secret, b"peer")
    return ClientKeys(
        role="peer",
        server_public=_public(_derive(secret, b"server")),
        public=_public(peer_secret),
        secret=z85.encode(peer_secret),
    )


def client_keys(secret: str) -> ClientKeys:
    """The keys of a client holding ``secret`` (a cluster or a call-only secret)."""
    if secret.startswith(CALL_ONLY_PREFIX):
        seed, server_public = _parse_call_only(secret, "the secret")
        client_secret = _derive(seed, b"call client")
        return ClientKeys(
            role="call",
            server_public=server_public,
            public=_public(client_secret),
            secret=z85.encode(client_secret),
        )
    raw = secret.encode()
    client_secret = _derive(raw, b"deploy client")
    return ClientKeys(
        role="deploy",
        server_public=_public(_derive(raw, b"server")),
        public=_public(client_secret),
        secret=z85.encode(client_secret),
    )


def apply_client_keys(sock: zmq.Socket[bytes], keys: ClientKeys) -> None:
    sock.curve_serverkey = keys.server_public
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret


def apply_server_keys(sock: zmq.Socket[bytes], server_secret: bytes, *, zap: bool) -> None:
    """Make ``sock`` a CURVE server; with ``zap``, ask the ZAP handler about each client."""
    sock.curve_server = True
    sock.curve_secretkey = server_secret
    if zap:
        sock.zap_domain = b"scatter"
        # No handler must mean no entry, never "anyone": libzmq's default is to let
        # every client in when nobody answers ZAP.
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)


# -- the user's own secret ------------------------------------------------------


def user_secret_path(data_root: Path) -> Path:
    return data_root / SECRET_FILE_NAME


def read_user_secret(data_root: Path) -> str | None:
    """The secret a loopback node of this user made, if any (None: none yet)."""
    path = user_secret_path(data_root)
    try:
        return read_secret_file(path)
    except FileNotFoundError:
        return None


def ensure_user_secret(data_root: Path) -> str:
    """This user's node secret, made now (random, mode 0600) if there is none yet.

    Two nodes starting at once agree: the file appears whole (a link of a finished
    temporary file), and the loser reads the winner's.
    """
    found = read_user_secret(data_root)
    if found is not None:
        return found
    data_root.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = user_secret_path(data_root)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(new_secret() + "\n")
        with contextlib.suppress(FileExistsError):  # another node made it first
            os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return read_secret_file(path)


def read_secret_file(path: Path) -> str:
    """A secret from a file only its owner may read (as ssh insists for keys).

    Raises:
        FileNotFoundError: no such file.
        ConfigError: the file is readable by others, or holds no usable secret.
    """
    with open(path) as f:
        mode = os.fstat(f.fileno()).st_mode
        text = f.read()
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{path} is readable by other users (mode {stat.S_IMODE(mode):o}); "
            f"make it private with `chmod 600 {path}`"
        )
    return check_secret(text, str(path))


# -- internals --------------------------------------------------------------------


def _derive(key: bytes, label: bytes) -> bytes:
    return hmac.new(key, b"scatter/1 " + label, hashlib.sha256).digest()


def _public(secret_key: bytes) -> bytes:
    return zmq.curve_public(z85.encode(secret_key))


def _parse_call_only(secret: str, origin: str) -> tuple[bytes, bytes]:
    try:
        seed_hex, server_hex = secret[len(CALL_ONLY_PREFIX) :].split(":", 1)
        seed, server_public = bytes.fromhex(seed_hex), bytes.fromhex(server_hex)
        if len(seed) != 32 or len(server_public) != 32:
            raise ValueError("bad lengths")
    except ValueError:
        raise ConfigError(
            f"{origin}: malformed call-only secret; make one with `scatter secret call-only`"
        ) from None
    return seed, z85.encode(server_public)
