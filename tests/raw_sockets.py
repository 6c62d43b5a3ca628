"""Raw zmq sockets for tests that speak the wire protocol by hand, with this user's keys."""

from __future__ import annotations

from typing import Any

import zmq

from scatter._config import default_data_dir
from scatter._security import apply_client_keys, client_keys, read_user_secret


def dealer(context: zmq.Context[Any], endpoint: str, *, secret: str | None = None) -> zmq.Socket[bytes]:
    """A DEALER connected to ``endpoint``: CURVE with this user's secret on TCP
    (or ``secret``), plain on a Unix socket, as a Scatter client does."""
    sock: zmq.Socket[bytes] = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if endpoint.startswith("tcp://"):
        found = secret or read_user_secret(default_data_dir())
        assert found is not None, "no node of this test made the user's secret"
        apply_client_keys(sock, client_keys(found))
    sock.connect(endpoint)
    return sock
