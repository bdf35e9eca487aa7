"""The ``sentinel`` command: a thin face over the daemon and the rule tools. One module per command group
(``run``: up, diagnose, plan, chaos; ``rules``; ``generate``: dashboards, deploy; ``alerts``: alerts, silence,
remediate; ``tokens``; ``logs``), each registering on ``base.app`` as it is imported, in the order ``--help``
lists them."""

# isort: skip_file
from sentinel.cli import rules, run, generate, alerts, tokens, logs  # noqa: F401 - each registers its commands
from sentinel.cli.base import app

__all__ = ["app"]
