"""Small network helpers: free loopback ports and readiness polling."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def reserve_port(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A TCP socket bound to ``port`` (0: a free one) and kept: unlike ``free_port``, nothing can take the
    port between choosing it and serving on it (an outbound connection of a child process picks its local
    port from the same ephemeral range). It listens at once; connections made before the server runs wait
    in the backlog. Serve on it with ``uvicorn.Server.run(sockets=[sock])``."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # listening: no other socket binds it, SO_REUSEADDR or not (connections wait in the backlog)
    except OSError:
        sock.close()
        raise
    return sock


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex((host, port)) == 0


def wait_http_ok(url: str, timeout_s: float, alive: Callable[[], bool] = lambda: True, interval_s: float = 0.1) -> bool:
    """Poll ``url`` until it answers 2xx, the deadline passes, or ``alive()`` turns false."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive():
        try:
            if httpx.get(url, timeout=2.0).is_success:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(interval_s)
    return False
