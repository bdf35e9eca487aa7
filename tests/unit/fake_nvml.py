"""A stand-in for the pynvml module, answering from a committed JSON fixture.

There is no GPU on the CI machine, so NVML cannot run here; this object implements only the NVML
calls the gpu check makes, with the same names, argument order and error class names as pynvml.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any


class NVMLError(Exception):
    pass


class NVMLError_LibraryNotFound(NVMLError):  # noqa: N801 - pynvml's name
    pass


class NVMLError_Timeout(NVMLError):  # noqa: N801 - pynvml's name
    pass


class FakeNvml:
    NVML_TEMPERATURE_GPU = 0
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    NVML_VOLATILE_ECC = 0
    NVML_FI_DEV_GET_GPU_RECOVERY_ACTION = 230
    nvmlEventTypeXidCriticalError = 8

    def __init__(self, fixture: Path | None, library_missing: bool = False) -> None:
        self.doc: dict[str, Any] = json.loads(fixture.read_text()) if fixture else {"devices": []}
        self.library_missing = library_missing
        self.pending_xids = [(i, x) for i, d in enumerate(self.doc["devices"]) for x in d["xids"]]

    def _d(self, h: int) -> dict[str, Any]:
        return dict(self.doc["devices"][h])

    def nvmlInit(self) -> None:  # noqa: N802 - pynvml's names below
        if self.library_missing:
            raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        pass

    def nvmlSystemGetDriverVersion(self) -> str:
        return str(self.doc["driver_version"])

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return int(self.doc["cuda_driver_version"])

    def nvmlDeviceGetCount(self) -> int:
        return len(self.doc["devices"])

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> str:
        return str(self._d(h)["name"])

    def nvmlDeviceGetPciInfo(self, h: int) -> str:
        return str(self._d(h)["pci"])

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        return SimpleNamespace(gpu=self._d(h)["utilization"], memory=0)

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        d = self._d(h)
        used, total = d["memory_used"], d["memory_total"]
        return SimpleNamespace(used=used, total=total, free=total - used)

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        return int(self._d(h)["temperature"])

    def nvmlDeviceGetTotalEccErrors(self, h: int, kind: int, counter: int) -> int:
        return int(self._d(h)["ecc_uncorrected_volatile"])

    def nvmlDeviceGetRemappedRows(self, h: int) -> tuple[int, ...]:
        return tuple(self._d(h)["remapped_rows"])

    def nvmlDeviceGetRetiredPagesPendingStatus(self, h: int) -> int:
        return int(self._d(h)["retired_pages_pending"])

    def nvmlDeviceGetFieldValues(self, h: int, ids: list[int]) -> list[Any]:
        return [SimpleNamespace(value=SimpleNamespace(uiVal=self._d(h)["recovery_action"]))]

    def nvmlEventSetCreate(self) -> str:
        return "event-set"

    def nvmlDeviceRegisterEvents(self, h: int, kinds: int, es: str) -> None:
        pass

    def nvmlEventSetWait_v2(self, es: str, timeout_ms: int) -> Any:
        if not self.pending_xids:
            raise NVMLError_Timeout("Timeout")
        dev, code = self.pending_xids.pop(0)
        return SimpleNamespace(device=dev, eventData=code)

    def nvmlEventSetFree(self, es: str) -> None:
        pass
