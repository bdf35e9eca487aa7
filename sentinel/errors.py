"""sentinel's exception tree. Every error says where it happened and what to do about it.

    SentinelError
    ├── ConfigError            the settings file or environment is invalid
    ├── FileFormatError        a YAML file (rules, runbooks) fails validation: file:line: field: problem
    │   └── RuleFileError      a rule file in particular
    ├── DatasourceError        Prometheus or the log store did not answer a query
    ├── EvaluationError        a rule's result cannot become alerts (duplicate label sets, limit)
    ├── NotifyError            a notification could not be delivered
    │   └── RetryableNotifyError   5xx or network error: try again later
    ├── ServiceError           a child service (Prometheus, a replica) is missing or failed to start
    │   └── MissingBinaryError     a program is not installed; the message says which package
    └── RemediationError       an action failed or was refused by the actuator
"""

from __future__ import annotations


class SentinelError(Exception):
    """Root of every error sentinel raises on purpose."""


class ConfigError(SentinelError):
    """The settings file or environment is invalid."""


class FileFormatError(SentinelError):
    """A YAML file failed validation; ``problems`` holds one ``file:line: field: problem`` per entry."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__("\n".join(problems))


class RuleFileError(FileFormatError):
    """A rule file failed validation."""


class DatasourceError(SentinelError):
    """A query to Prometheus or the log store failed; no alert state changes because of it."""


class EvaluationError(SentinelError):
    """A rule's query result cannot be turned into alerts."""


class NotifyError(SentinelError):
    """A notification was refused by its receiver (not retried)."""


class RetryableNotifyError(NotifyError):
    """A notification failed with a 5xx or a network error and will be retried."""


class ServiceError(SentinelError):
    """A child service is missing or failed to start."""


class MissingBinaryError(ServiceError):
    """A program sentinel needs is not installed."""


class RemediationError(SentinelError):
    """A remediation action failed."""
