"""Diagnostic runbooks: YAML files of typed checks, a runner, and reports."""
