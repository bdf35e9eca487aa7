"""The loopback HTTP server the tests' fake receivers run on."""

from __future__ import annotations

from http.server import ThreadingHTTPServer


class LoopbackServer(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` with a listen backlog that a burst of notifications does not overflow.

    The standard library's backlog is 5. When more connections arrive at once (sentinel's concurrent
    groups and a real Alertmanager notifying the same receiver), the kernel drops the extra SYNs and the
    client retransmits after 1 s: a notification sent on time arrives a second late, which failed a
    timing test in CI. 128 is what Go's and uvicorn's listeners get from the kernel's ``somaxconn``."""

    request_queue_size = 128
