"""CUDA from PyTorch's side: is it available, how many devices, does a tiny kernel round-trip."""

from __future__ import annotations

from importlib import metadata
from typing import Any, Literal

from sentinel.runbooks.base import Context, Finding, Params, Status, check


class CudaParams(Params):
    expect_gpu: Literal["auto", "yes", "no"] = "auto"  # auto: expected when /dev/nvidia* device nodes exist


def _torch(ctx: Context) -> Any:
    if ctx.torch is not None:
        return ctx.torch
    import torch

    return torch


@check("cuda", CudaParams)
def cuda_check(p: CudaParams, ctx: Context) -> Finding:
    """`torch.cuda.is_available()`, device count, a kernel round trip, and why not when not."""
    nodes = sorted(n.name for n in ctx.dev.glob("nvidia[0-9]*")) if ctx.dev.exists() else []
    expected = p.expect_gpu == "yes" or (p.expect_gpu == "auto" and bool(nodes))
    if not expected and ctx.torch is None:  # no GPU here: answer without paying for `import torch`
        try:
            version = metadata.version("torch")
        except metadata.PackageNotFoundError:
            version = "not installed"
        return Finding(Status.SKIPPED, "no CUDA: no NVIDIA device nodes in /dev", {
            "torch": version, "device_nodes": [], "reason": "no NVIDIA device nodes in /dev"})
    torch = _torch(ctx)
    ev: dict[str, Any] = {"torch": str(torch.__version__), "torch_cuda": torch.version.cuda, "device_nodes": nodes}
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            why = "torch is a CPU-only build"
        elif not nodes:
            why = "no NVIDIA device nodes in /dev (no GPU, or not mounted into the container)"
        else:
            try:
                torch.cuda.init()
                why = "torch.cuda.is_available() is False"
            except Exception as exc:  # torch raises RuntimeError/AssertionError with the driver's reason
                why = str(exc).splitlines()[0]
        ev["reason"] = why
        if expected:
            return Finding(Status.FAIL, f"CUDA unavailable: {why}", ev,
                           "check nvidia-smi and the driver log; a torch CUDA build newer than the driver "
                           "supports fails here (match torch's CUDA version to the driver)")
        return Finding(Status.SKIPPED, f"no CUDA: {why}", ev)
    count = torch.cuda.device_count()
    ev["device_count"] = count
    ev["devices"] = [torch.cuda.get_device_name(i) for i in range(count)]
    try:
        x = torch.arange(1024, device="cuda", dtype=torch.float32)
        got = float((x * 2).sum().item())
        torch.cuda.synchronize()
    except Exception as exc:  # a CUDA error here is the finding
        return Finding(Status.FAIL, f"kernel round trip failed: {exc}", ev,
                       "a sticky CUDA error needs the process (or the GPU) reset; read the XIDs in dmesg")
    if got != 1047552.0:
        return Finding(Status.FAIL, f"kernel round trip returned {got}, expected 1047552", ev,
                       "the GPU computes wrong results: drain it and run a hardware diagnostic (dcgmi diag)")
    return Finding(Status.OK, f"CUDA {torch.version.cuda}: {count} device(s), kernel round trip ok", ev)
