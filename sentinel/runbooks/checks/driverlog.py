"""The driver's logs: the tail of /var/log/nvidia-installer.log and kernel `NVRM: Xid` lines."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from pydantic import Field, field_validator

from sentinel.runbooks.base import Context, Finding, Params, Status, check
from sentinel.xid import XidAction, parse_xid_lines, recommend

INSTALLER_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"Nouveau kernel driver is currently in use", re.I),
     "blacklist nouveau (modprobe.d), rebuild the initramfs, reboot, reinstall"),
    (re.compile(r"Unable to find the kernel source tree|kernel header", re.I),
     "install the headers for the running kernel (linux-headers-$(uname -r)) and reinstall"),
    (re.compile(r"Unable to load the kernel module 'nvidia(-drm)?\.ko'", re.I),
     "the module failed to load: check Secure Boot (sign the module or disable it) and dmesg"),
    (re.compile(r"kernel module .* appears to already be loaded", re.I),
     "stop every process using the GPU, unload the nvidia modules (or reboot), reinstall"),
    (re.compile(r"compiler .*(differs|mismatch)|CC version check failed", re.I),
     "install the gcc version the kernel was built with"),
)


class DriverLogParams(Params):
    installer_log: str = "nvidia-installer.log"
    kernel_logs: list[str] = Field(default_factory=lambda: ["kern.log", "syslog", "messages"])
    use_dmesg: bool = True
    tail_lines: int = Field(40, ge=1, le=10_000)
    timeout_s: float = Field(10.0, gt=0)

    @field_validator("installer_log", "kernel_logs")
    @classmethod
    def _relative(cls, v: str | list[str]) -> str | list[str]:
        for name in [v] if isinstance(v, str) else v:
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise ValueError(f"{name!r}: must be a path under the log root, without '..'")
        return v


def _tail(path: Path, n: int) -> list[str] | None:
    try:
        with path.open("rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - 256 * 1024))
            return fh.read().decode(errors="replace").splitlines()[-n:]
    except OSError:
        return None


def _kernel_lines(p: DriverLogParams, ctx: Context) -> tuple[list[str], list[str]]:
    lines, sources = [], []
    for name in p.kernel_logs:
        got = _tail(ctx.var_log / name, 5000)
        if got is not None:
            lines += got
            sources.append(str(ctx.var_log / name))
    binary = shutil.which(ctx.dmesg) if p.use_dmesg else None
    if binary:
        try:
            out = subprocess.run([binary], capture_output=True, text=True, timeout=p.timeout_s, check=False)
            if out.returncode == 0:
                lines += out.stdout.splitlines()
                sources.append("dmesg")
        except subprocess.TimeoutExpired:
            pass
    return lines, sources


@check("driver_log", DriverLogParams)
def driver_log_check(p: DriverLogParams, ctx: Context) -> Finding:
    """Known nvidia-installer failures and kernel XID events, mapped to the XID catalogue."""
    installer = _tail(ctx.var_log / p.installer_log, p.tail_lines)
    kernel, sources = _kernel_lines(p, ctx)
    xids = parse_xid_lines(kernel)
    if installer is None and not sources:
        return Finding(Status.SKIPPED, f"no driver log readable ({ctx.var_log / p.installer_log}, kernel logs, dmesg)")
    ev: dict[str, object] = {"kernel_sources": sources, "xid_events": [
        {"pci": x.pci, "code": x.code, "meaning": x.info.meaning, "action": x.info.action.value} for x in xids[-20:]]}
    remedies = []
    if installer is not None:
        ev["installer_log_tail"] = installer
        text = "\n".join(installer)
        remedies += [r for pat, r in INSTALLER_PATTERNS if pat.search(text)]
        if not remedies and re.search(r"^ERROR:", text, re.M):
            remedies.append("the installer reported an error: read the tail above")
    action = recommend(xids)
    if action != XidAction.NONE:
        codes = sorted({x.code for x in xids})
        remedies.insert(0, f"XID {codes}: {action.value.replace('_', ' ')}")
        return Finding(Status.FAIL, f"{len(xids)} XID event(s) {codes}; recommended action: {action.value}", ev,
                       "; ".join(remedies))
    if remedies:
        return Finding(Status.FAIL, "driver installation failed", ev, "; ".join(remedies))
    return Finding(Status.OK, f"no failure in the installer log; {len(xids)} XID event(s) in {len(sources)} "
                   "kernel log source(s)", ev)
