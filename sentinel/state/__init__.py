"""sentinel's durable state: one SQLite database (``db.Database``) and the stores of the areas that do not
depend on alert types (outbox, remediation records and approvals, audit, silences). The alert-state store
is ``sentinel.alerts.store``, which composes them all into the ``Store`` the daemon opens."""
