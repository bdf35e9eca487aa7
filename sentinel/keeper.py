"""The keeper: children die with sentinel, however sentinel dies.

``sentinel up`` starts this small process first (``python -m sentinel.keeper REGISTRY``) with the read end
of a pipe as its standard input; sentinel holds the write end, and no other child inherits it. When
sentinel exits — a clean stop, a crash, ``kill -9``, or a SIGKILL in the middle of its own shutdown — the
kernel closes that end, the keeper reads end-of-file, and it kills the process group of every child
still named in the registry (``children.json``: replicas, Prometheus), checking each pid's command line
first so a reused pid is never hit. Then it exits.

This is ``PR_SET_PDEATHSIG``'s promise without its catch: a parent-death signal fires when the *thread*
that forked the child exits, and sentinel starts children from worker threads (a restart, a scale-out, a
watchdog). It imports nothing of sentinel's, so it costs a few MiB.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

OURS = (b"inference_core", b"prometheus", b"elasticsearch")  # what sentinel starts, by command line


def reap(registry: Path) -> list[str]:
    """SIGKILL the process group of every child named in ``registry`` that is still one of ours."""
    try:
        pids = {str(k): int(v) for k, v in json.loads(registry.read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return []
    killed = []
    for name, pid in pids.items():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if any(word in cmdline for word in OURS):
            try:
                os.killpg(pid, signal.SIGKILL)
                killed.append(f"{name} (pid {pid})")
            except (ProcessLookupError, PermissionError):
                pass
    return killed


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m sentinel.keeper CHILDREN_JSON (stdin: a pipe sentinel holds open)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for sentinel, which stops in order
    registry = Path(argv[0])
    while os.read(0, 4096):  # sentinel never writes: this returns b"" when its end closes
        pass
    killed = reap(registry)
    if killed:
        print(f"sentinel.keeper: sentinel exited; killed {', '.join(killed)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
