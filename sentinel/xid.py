"""The NVIDIA XID catalogue: what a code means and what to do, shared by runbooks and remediation.

Actions follow NVIDIA's XID guidance as operators apply it (gpud, FBAR): application faults restart
the app; GSP and uncontained ECC faults reset the GPU; a GPU off the bus needs a reboot; double-bit
ECC goes through the ECC workflow; the same XID repeating means hardware inspection.
"""

from __future__ import annotations

import enum
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass


class XidAction(enum.StrEnum):
    NONE = "none"
    RESTART_APP = "restart_app"
    RESET_GPU = "reset_gpu"
    REBOOT = "reboot"
    ECC_WORKFLOW = "ecc_workflow"
    INSPECT_HARDWARE = "inspect_hardware"


@dataclass(frozen=True)
class XidInfo:
    code: int
    meaning: str
    action: XidAction


CATALOGUE: dict[int, XidInfo] = {x.code: x for x in (
    XidInfo(13, "Graphics engine exception (often an application fault, e.g. out-of-range access)",
            XidAction.RESTART_APP),
    XidInfo(31, "GPU memory page fault (an illegal address access by the application)", XidAction.RESTART_APP),
    XidInfo(32, "Invalid or corrupted push buffer stream", XidAction.RESTART_APP),
    XidInfo(43, "GPU stopped processing (the faulting application was killed)", XidAction.RESTART_APP),
    XidInfo(45, "Preemptive cleanup after a previous error", XidAction.NONE),
    XidInfo(48, "Double-bit ECC error (uncorrectable)", XidAction.ECC_WORKFLOW),
    XidInfo(61, "Internal micro-controller breakpoint/warning", XidAction.RESET_GPU),
    XidInfo(62, "Internal micro-controller halt", XidAction.RESET_GPU),
    XidInfo(63, "ECC page retirement or row remapping recorded", XidAction.NONE),
    XidInfo(64, "ECC page retirement or row remapping recording failure", XidAction.RESET_GPU),
    XidInfo(74, "NVLink error", XidAction.RESET_GPU),
    XidInfo(79, "GPU has fallen off the bus", XidAction.REBOOT),
    XidInfo(92, "High single-bit ECC error rate", XidAction.ECC_WORKFLOW),
    XidInfo(94, "Contained ECC error (the affected application must restart)", XidAction.RESTART_APP),
    XidInfo(95, "Uncontained ECC error", XidAction.RESET_GPU),
    XidInfo(119, "GSP RPC timeout", XidAction.RESET_GPU),
    XidInfo(120, "GSP error", XidAction.RESET_GPU),
)}

# `NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, name=python, GPU has fallen off the bus.`
XID_LINE = re.compile(r"NVRM: Xid \((?P<pci>[^)]*)\): (?P<code>\d+),(?P<rest>.*)")
REPEAT_THRESHOLD = 3


@dataclass(frozen=True)
class XidEvent:
    pci: str
    code: int
    detail: str

    @property
    def info(self) -> XidInfo:
        return CATALOGUE.get(self.code, XidInfo(self.code, "unknown XID (see NVIDIA's XID catalogue)",
                                                XidAction.INSPECT_HARDWARE))


def parse_xid_lines(lines: Iterable[str]) -> list[XidEvent]:
    out = []
    for line in lines:
        m = XID_LINE.search(line)
        if m:
            out.append(XidEvent(m["pci"], int(m["code"]), m["rest"].strip()))
    return out


def recommend(events: Iterable[XidEvent]) -> XidAction:
    """The strongest action the events call for; the same code on the same GPU repeating → inspect."""
    events = list(events)
    if not events:
        return XidAction.NONE
    if any(n >= REPEAT_THRESHOLD for (_, code), n in Counter((e.pci, e.code) for e in events).items()
           if CATALOGUE.get(code, XidInfo(code, "", XidAction.INSPECT_HARDWARE)).action != XidAction.NONE):
        return XidAction.INSPECT_HARDWARE
    order = [XidAction.NONE, XidAction.RESTART_APP, XidAction.ECC_WORKFLOW, XidAction.RESET_GPU, XidAction.REBOOT,
             XidAction.INSPECT_HARDWARE]
    return max((e.info.action for e in events), key=order.index)
