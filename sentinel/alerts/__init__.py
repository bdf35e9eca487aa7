"""Alerts: the Prometheus-exact state machine, the SQLite store, and the notifiers."""
