"""Generators: Prometheus rule files (and, later, dashboards and manifests) from the one rule model."""
