"""The typed checks; importing this package registers every one of them."""

from sentinel.runbooks.checks import cuda, driverlog, files, gpu, memory, service, storage

__all__ = ["cuda", "driverlog", "files", "gpu", "memory", "service", "storage"]
