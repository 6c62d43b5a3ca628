"""Server processes for ``cluster/bench.py``: one per system under test.

    python cluster/_bench_servers.py pyzmq-reqrep --port P --parent PID
    BENCH_CURVE_SECRET_KEY=... python cluster/_bench_servers.py pyzmq-reqrep --curve ...
    python cluster/_bench_servers.py tcp-msgspec --port P --parent PID
    python cluster/_bench_servers.py zeroapi --port P --parent PID
    python cluster/_bench_servers.py scatter-node --port P --data-dir D --parent PID
    python cluster/_bench_servers.py scatter-node --plain-workers ...   # workers without CURVE

The benchmark starts each in a session of its own and kills that process group when done.
Each also stops by itself: a watchdog thread kills its whole process group (zeroapi's
workers, Scatter's node and workers) when the benchmark process is gone or after
``--max-seconds``, so a benchmark killed with SIGKILL leaves nothing running.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time

if __package__:
    from . import _bench_workloads as w
else:  # run as a script: this file's folder is sys.path[0]
    import _bench_workloads as w

# The baseline's CURVE server key (z85), in the environment: the benchmark makes a key
# pair per run and gives its clients the public half.
CURVE_SECRET_VARIABLE = "BENCH_CURVE_SECRET_KEY"


def start_watchdog(parent: int, max_seconds: float) -> None:
    deadline = time.monotonic() + max_seconds

    def watch() -> None:
        while os.getppid() == parent and time.monotonic() < deadline:
            time.sleep(0.5)
        os.killpg(os.getpgrp(), signal.SIGKILL)

    threading.Thread(target=watch, name="bench-watchdog", daemon=True).start()


# -- the baseline: a plain REP loop, typed msgspec decoding, the work done in-process --


def serve_pyzmq_reqrep(port: int, curve: bool = False) -> None:
    import msgspec
    import zmq

    decoders = {
        b"add": msgspec.msgpack.Decoder(tuple[int, int]),
        b"total": msgspec.msgpack.Decoder(list[float]),
        b"cpu": msgspec.msgpack.Decoder(int),
    }
    run = {b"add": lambda ab: w.add(*ab), b"total": w.total, b"cpu": w.cpu}
    encode = msgspec.msgpack.Encoder().encode
    sock = zmq.Context().socket(zmq.REP)
    if curve:  # a CURVE server without ZAP, as Scatter's workers are
        sock.curve_server = True
        sock.curve_secretkey = os.environ.pop(CURVE_SECRET_VARIABLE).encode()
    sock.bind(f"tcp://127.0.0.1:{port}")
    # Bounded by the watchdog, which kills this process when the benchmark is done.
    while True:
        name, payload = sock.recv_multipart()
        try:
            reply = [b"ok", encode(run[name](decoders[name].decode(payload)))]
        except Exception as exc:  # answer, so the REQ client never hangs on a bad request
            reply = [b"error", repr(exc).encode()]
        sock.send_multipart(reply)


# -- tcp-msgspec: a plain TCP server, a thread per connection, length-prefixed msgspec --
# The fastest Python RPC measured on this machine: the limit Scatter aims at.

FRAME_HEADER = struct.Struct("!I")  # the payload's length, then a msgpack [name, args]


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the peer closed the connection")
        data += chunk
    return bytes(data)


def serve_tcp_msgspec(port: int) -> None:
    import msgspec

    decoders = {
        "add": msgspec.msgpack.Decoder(tuple[str, tuple[int, int]]),
        "total": msgspec.msgpack.Decoder(tuple[str, list[float]]),
        "cpu": msgspec.msgpack.Decoder(tuple[str, int]),
    }
    run = {"add": lambda ab: w.add(*ab), "total": w.total, "cpu": w.cpu}
    name_of = msgspec.msgpack.Decoder(tuple[str, msgspec.Raw])

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock: socket.socket = self.request
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            encode = msgspec.msgpack.Encoder().encode
            while True:
                try:
                    (size,) = FRAME_HEADER.unpack(recv_exactly(sock, FRAME_HEADER.size))
                    payload = recv_exactly(sock, size)
                except ConnectionError:
                    return
                try:
                    name = name_of.decode(payload)[0]
                    reply = encode(("ok", run[name](decoders[name].decode(payload)[1])))
                except Exception as exc:  # answer, so the client never hangs
                    reply = encode(("error", repr(exc)))
                sock.sendall(FRAME_HEADER.pack(len(reply)) + reply)

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True

    # Bounded by the watchdog, which kills this process when the benchmark is done.
    with Server(("127.0.0.1", port), Handler) as server:
        server.serve_forever()


# -- zeroapi: its RPC functions take one argument, so add takes a pair --
# Module level: zeroapi hands them to its worker processes through multiprocessing.


def add(ab: tuple[int, int]) -> int:
    return w.add(*ab)


def total(xs: list[float]) -> float:
    return w.total(xs)


def cpu(n: int) -> int:
    return w.cpu(n)


def serve_zeroapi(port: int) -> None:
    from zero import ZeroServer

    app = ZeroServer(host="127.0.0.1", port=port)
    for fn in (add, total, cpu):
        app.register_rpc(fn)
    # The default layout: a broker in this process and os.cpu_count() worker processes.
    # Its IPC socket file goes to the working directory, which the benchmark makes a temp dir.
    app.run()


# -- Scatter: the node exactly as users start it, under this watchdog --


# The node, its workers told no key: their TCP endpoint then runs without CURVE (the
# worker turns CURVE on only when given a key). For ``scatter-tcp-plain`` alone, to
# measure what CURVE costs Scatter; no option of Scatter's own does this, on purpose.
_NODE_WITHOUT_WORKER_CURVE = (
    "import runpy, scatter._node._server as server; "
    "server.WORKER_KEY_VARIABLE = 'SCATTER_BENCH_WORKER_KEY_WITHHELD'; "
    "runpy.run_module('scatter._node', run_name='__main__', alter_sys=True)"
)


def serve_scatter_node(port: int, data_dir: str, plain_workers: bool = False) -> int:
    start = ["-c", _NODE_WITHOUT_WORKER_CURVE] if plain_workers else ["-m", "scatter._node"]
    node = subprocess.Popen(
        [
            sys.executable,
            *start,
            "--address",
            f"tcp://127.0.0.1:{port}",
            "--data-dir",
            data_dir,
        ]
    )
    return node.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="_bench_servers.py")
    parser.add_argument(
        "system", choices=["pyzmq-reqrep", "tcp-msgspec", "zeroapi", "scatter-node"]
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True, help="stop when this pid is gone")
    parser.add_argument("--max-seconds", type=float, default=3600.0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument(
        "--curve", action="store_true", help=f"pyzmq-reqrep: ${CURVE_SECRET_VARIABLE}"
    )
    parser.add_argument(
        "--plain-workers",
        action="store_true",
        help="scatter-node: workers' TCP endpoint without CURVE (to measure CURVE's cost)",
    )
    args = parser.parse_args(argv)
    start_watchdog(args.parent, args.max_seconds)
    if args.system == "pyzmq-reqrep":
        serve_pyzmq_reqrep(args.port, curve=args.curve)
    elif args.system == "tcp-msgspec":
        serve_tcp_msgspec(args.port)
    elif args.system == "zeroapi":
        serve_zeroapi(args.port)
    else:
        if not args.data_dir:
            parser.error("scatter-node needs --data-dir")
        return serve_scatter_node(args.port, args.data_dir, args.plain_workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
