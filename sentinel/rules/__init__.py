"""Rules: the model (one source of truth), the datasources, and the evaluation loop."""
