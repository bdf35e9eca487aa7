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


def reserve_near(host: str, port: int, explicit: bool, tries: int = 20) -> tuple[socket.socket, str]:
    """A reserved socket (``reserve_port``) for a service with a conventional default port: ``port`` itself
    when free; when it is taken and it is only the default (not ``explicit``ly configured), the next free one of
    the ``tries`` after it, and a note saying so; 0: any free port. An explicit port that is taken is an
    OSError, as before."""
    if port == 0 or explicit:
        return reserve_port(host, port), ""
    for candidate in range(port, min(port + tries, 65536)):
        try:
            sock = reserve_port(host, candidate)
        except OSError:
            continue
        return sock, "" if candidate == port else f"port {port} was taken: {candidate}"
    sock = reserve_port(host, 0)
    return sock, f"ports {port}-{port + tries - 1} were taken: {sock.getsockname()[1]}"


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
