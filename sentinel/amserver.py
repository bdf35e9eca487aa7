"""Runs a real Alertmanager (Debian's ``prometheus-alertmanager``) with a given config, on loopback."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from sentinel.process import ChildRegistry, stop_process
from sentinel.promserver import find_binary, start_service

INSTALL_HINT = "install it with: apt-get install prometheus-alertmanager"


class AlertmanagerServer:
    def __init__(self, workdir: Path, port: int, config: dict[str, Any], children: ChildRegistry,
                 binary: str = "prometheus-alertmanager") -> None:
        self.workdir = workdir
        self.port = port
        self.config = config
        self.children = children
        self.binary = binary
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> None:
        binary = find_binary(self.binary, INSTALL_HINT)
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "alertmanager.yml"
        cfg.write_text(yaml.safe_dump(self.config, sort_keys=False))
        argv = [binary, f"--config.file={cfg}", f"--storage.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--cluster.listen-address=", "--log.level=warn"]
        self.proc = start_service("alertmanager", argv, self.workdir, f"{self.url}/-/ready", self.children,
                                  timeout_s)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, "alertmanager")
            self.children.set("alertmanager", None)
