"""GPU health from NVML (nvidia-ml-py) and from `nvidia-smi --query-gpu` as a second source."""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
from typing import Any

from pydantic import Field

from sentinel.runbooks.base import Context, Finding, Params, Status, check
from sentinel.xid import XidEvent, recommend

RECOVERY_ACTIONS = {0: "none", 1: "gpu_reset", 2: "node_reboot", 3: "drain_p2p", 4: "drain_and_reset"}
SMI_FIELDS = ("index", "name", "driver_version", "temperature.gpu", "utilization.gpu", "memory.used",
              "memory.total", "ecc.errors.uncorrected.volatile.total", "power.draw")


class GpuParams(Params):
    max_temperature_c: float = Field(85.0, gt=0)
    xid_wait_ms: int = Field(0, ge=0, le=10_000, description="how long to wait for XID events")


def _nvml(ctx: Context) -> Any:
    if ctx.nvml is not None:
        return ctx.nvml
    import pynvml

    return pynvml


def _try(fn: Any, *args: Any) -> Any:
    """An NVML call; None where the device does not support it."""
    try:
        return fn(*args)
    except Exception as exc:  # pynvml raises NVMLError subclasses made at import time
        if type(exc).__name__.startswith("NVMLError"):
            return None
        raise


def _device(nv: Any, i: int, p: GpuParams) -> tuple[dict[str, Any], list[str], list[str]]:
    h = nv.nvmlDeviceGetHandleByIndex(i)
    fails: list[str] = []
    warns: list[str] = []
    d: dict[str, Any] = {"index": i, "name": _try(nv.nvmlDeviceGetName, h)}
    util = _try(nv.nvmlDeviceGetUtilizationRates, h)
    mem = _try(nv.nvmlDeviceGetMemoryInfo, h)
    d["utilization_pct"] = getattr(util, "gpu", None)
    d["memory_used_bytes"], d["memory_total_bytes"] = getattr(mem, "used", None), getattr(mem, "total", None)
    d["temperature_c"] = _try(nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU)
    d["ecc_uncorrected_volatile"] = _try(nv.nvmlDeviceGetTotalEccErrors, h, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                                         nv.NVML_VOLATILE_ECC)
    rows = _try(nv.nvmlDeviceGetRemappedRows, h)  # (corrected, uncorrected, pending, failure)
    if rows is not None:
        d["remapped_rows"] = dict(zip(("correctable", "uncorrectable", "pending", "failure"), rows, strict=False))
        if rows[3]:
            fails.append(f"GPU {i}: row remapping failed")
        elif rows[2]:
            warns.append(f"GPU {i}: row remapping pending (reset the GPU to apply)")
    pending = _try(nv.nvmlDeviceGetRetiredPagesPendingStatus, h)
    if pending:
        warns.append(f"GPU {i}: retired pages pending (reset the GPU to apply)")
    fv = _try(nv.nvmlDeviceGetFieldValues, h, [nv.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION])
    if fv:
        action = RECOVERY_ACTIONS.get(int(fv[0].value.uiVal), str(fv[0].value.uiVal))
        d["recovery_action"] = action
        if action != "none":
            fails.append(f"GPU {i}: driver asks for recovery action {action}")
    if d["ecc_uncorrected_volatile"]:
        fails.append(f"GPU {i}: {d['ecc_uncorrected_volatile']} uncorrected ECC errors since boot")
    if d["temperature_c"] is not None and d["temperature_c"] > p.max_temperature_c:
        warns.append(f"GPU {i}: {d['temperature_c']} °C (> {p.max_temperature_c:g})")
    return d, fails, warns


def _xids(nv: Any, count: int, wait_ms: int) -> list[XidEvent]:
    es = _try(nv.nvmlEventSetCreate)
    if es is None:
        return []
    try:
        for i in range(count):
            _try(nv.nvmlDeviceRegisterEvents, nv.nvmlDeviceGetHandleByIndex(i), nv.nvmlEventTypeXidCriticalError, es)
        out: list[XidEvent] = []
        while True:
            ev = _try(nv.nvmlEventSetWait_v2, es, wait_ms)
            if ev is None:
                return out
            out.append(XidEvent(str(_try(nv.nvmlDeviceGetPciInfo, ev.device) or "?"), int(ev.eventData), "NVML event"))
    finally:
        _try(nv.nvmlEventSetFree, es)


@check("gpu", GpuParams)
def gpu_check(p: GpuParams, ctx: Context) -> Finding:
    """NVML: driver and CUDA versions, per-device utilization, memory, temperature, ECC, remapped rows, XIDs."""
    try:
        nv = _nvml(ctx)
        nv.nvmlInit()
    except ImportError:
        return Finding(Status.SKIPPED, "nvidia-ml-py is not installed")
    except Exception as exc:
        if type(exc).__name__ == "NVMLError_LibraryNotFound":
            return Finding(Status.SKIPPED, "NVML library not found (no NVIDIA driver on this machine)")
        if type(exc).__name__.startswith("NVMLError"):
            return Finding(Status.FAIL, f"NVML failed to initialise: {exc}", remedy="check the driver: nvidia-smi, "
                           "dmesg | grep NVRM; a driver/library version mismatch needs a reboot or module reload")
        raise
    try:
        ev: dict[str, Any] = {"driver_version": _try(nv.nvmlSystemGetDriverVersion),
                              "cuda_driver_version": _try(nv.nvmlSystemGetCudaDriverVersion)}
        count = nv.nvmlDeviceGetCount()
        fails: list[str] = []
        warns: list[str] = []
        devices = []
        for i in range(count):
            d, f, w = _device(nv, i, p)
            devices.append(d)
            fails += f
            warns += w
        xids = _xids(nv, count, p.xid_wait_ms)
        ev.update(devices=devices, xid_events=[vars(x) for x in xids])
        if xids:
            fails.append(f"XID events: {sorted({x.code for x in xids})}; recommended: {recommend(xids)}")
    finally:
        _try(nv.nvmlShutdown)
    if count == 0:  # a driver without a GPU: nothing was checked
        return Finding(Status.SKIPPED, f"NVML (driver {ev['driver_version']}) reports no GPU", ev)
    if fails:
        return Finding(Status.FAIL, "; ".join(fails), ev, "follow the recovery action / XID recommendation; "
                       "repeated faults on one GPU need hardware inspection")
    if warns:
        return Finding(Status.WARN, "; ".join(warns), ev, "plan a GPU reset in a quiet window")
    return Finding(Status.OK, f"{count} GPU(s) healthy (driver {ev['driver_version']})", ev)


class SmiParams(Params):
    timeout_s: float = Field(15.0, gt=0, le=120)
    max_temperature_c: float = Field(85.0, gt=0)


KNOWN_SMI_FAILURES = {
    "couldn't communicate with the NVIDIA driver": "the kernel module is not loaded or mismatches the user-space "
    "driver: check `lsmod | grep nvidia`, dmesg, and reinstall the driver matching the kernel",
    "Driver/library version mismatch": "the kernel module and the user-space library differ (driver updated "
    "without reboot): reboot or reload the nvidia modules",
    "No devices were found": "no GPU visible: check PCIe (lspci | grep -i nvidia) and the container's device "
    "mounts",
    "GPU is lost": "the GPU fell off the bus (XID 79): reboot the node; repeated → hardware inspection",
}


def _num(v: str) -> float | None:
    try:
        return float(v)
    except ValueError:
        return None  # "[N/A]", "[Not Supported]"


@check("nvidia_smi", SmiParams)
def nvidia_smi_check(p: SmiParams, ctx: Context) -> Finding:
    """`nvidia-smi --query-gpu=... --format=csv`: the same figures from the CLI, with its failure messages."""
    binary = shutil.which(ctx.nvidia_smi)
    if binary is None:
        return Finding(Status.SKIPPED, f"{ctx.nvidia_smi} not found (no NVIDIA driver on this machine)")
    argv = [binary, f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=p.timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return Finding(Status.FAIL, f"nvidia-smi hung for {p.timeout_s:g}s", {"argv": argv},
                       "a hung nvidia-smi usually means a wedged driver: check dmesg for XIDs; reset or reboot")
    text = (out.stdout + out.stderr).strip()
    if out.returncode != 0:
        remedy = next((r for k, r in KNOWN_SMI_FAILURES.items() if k.lower() in text.lower()), None)
        return Finding(Status.FAIL, f"nvidia-smi exited {out.returncode}: {text.splitlines()[0] if text else ''}",
                       {"argv": argv, "output": text[-2000:]}, remedy or "run nvidia-smi by hand and read dmesg")
    rows = [dict(zip(SMI_FIELDS, (c.strip() for c in r), strict=False))
            for r in csv.reader(io.StringIO(out.stdout)) if r]
    fails = [f"GPU {r['index']}: {r['ecc.errors.uncorrected.volatile.total']} uncorrected ECC errors"
             for r in rows if (_num(r.get("ecc.errors.uncorrected.volatile.total", "")) or 0) > 0]
    warns = [f"GPU {r['index']}: {r['temperature.gpu']} °C" for r in rows
             if (_num(r.get("temperature.gpu", "")) or 0) > p.max_temperature_c]
    ev = {"argv": argv, "gpus": rows}
    if not rows:
        return Finding(Status.SKIPPED, "nvidia-smi lists no GPU", ev)
    if fails:
        return Finding(Status.FAIL, "; ".join(fails), ev, "ECC workflow: drain the GPU, reset it, check retired "
                       "pages/remapped rows; repeated → hardware inspection")
    if warns:
        return Finding(Status.WARN, "; ".join(warns), ev, "check cooling and power capping")
    util = ", ".join(f"GPU {r['index']} {r['utilization.gpu']}%" for r in rows)
    return Finding(Status.OK, f"{len(rows)} GPU(s): {util}", ev)
