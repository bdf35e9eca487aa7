"""Remediation: a pure policy (guardrails), actuators that act, and the shell that joins them."""
