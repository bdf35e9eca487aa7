"""sentinel's one client for Prometheus's HTTP API: instant queries (the rules' hot path, on a keep-alive
httpx pool), range queries (learned thresholds, through prometheus-api-client, which the design names) and
a config reload. Third-party errors become DatasourceError (queries) or ServiceError (reload) here, at
the boundary. Remote write, a different protocol (snappy protobuf), is ``sentinel.rules.remote_write``.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from urllib.parse import urlencode

import httpx
import requests
from prometheus_api_client import PrometheusApiClientException, PrometheusConnect
from urllib3.util.retry import Retry

from sentinel.alerts.state import Sample
from sentinel.errors import DatasourceError, EvaluationError, ServiceError

__all__ = ["PromQLSource"]


class PromQLSource:
    """Instant queries through Prometheus's HTTP API (``/api/v1/query``) with a per-query timeout."""

    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.client = PrometheusConnect(url=self.url, disable_ssl=True, retry=Retry(total=0), timeout=timeout_s)
        # instant queries, the hot path: one keep-alive connection pool shared by every rule of every group
        self.http = httpx.Client(timeout=timeout_s + 1.0, limits=httpx.Limits(max_keepalive_connections=16))

    def query(self, expr: str, at: float) -> list[Sample]:
        """The instant vector at ``at``; NaN samples are left out (they cannot become alerts)."""
        return [s for s in self.query_raw(expr, at) if not math.isnan(s.value)]

    def query_raw(self, expr: str, at: float) -> list[Sample]:
        """The instant vector at ``at`` as Prometheus returns it, NaN included (recording rules keep it)."""
        params = {"query": expr, "time": f"{at:.3f}", "timeout": f"{self.timeout_s:g}s"}
        try:
            # POST (form-encoded), as Prometheus's own UI does: long expressions stay out of the URL, and the
            # standard library encodes the body faster than httpx parses a long query string
            resp = self.http.post(f"{self.url}/api/v1/query", content=urlencode(params),
                                  headers={"Content-Type": "application/x-www-form-urlencoded"})
        except httpx.HTTPError as exc:
            raise DatasourceError(f"Prometheus at {self.url} unreachable: {type(exc).__name__}: {exc}") from exc
        try:
            body = resp.json()
        except ValueError as exc:
            raise DatasourceError(f"Prometheus at {self.url} answered HTTP {resp.status_code} with no JSON") from exc
        if resp.status_code != 200 or body.get("status") != "success":
            error = body.get("error") or resp.text[:300]
            if resp.status_code in (400, 422):  # bad_data / execution: the expression's fault, not the server's
                raise DatasourceError(f"Prometheus at {self.url} rejected the query: {error}")
            raise DatasourceError(f"Prometheus at {self.url} failed the query (HTTP {resp.status_code}): {error}")
        data = body.get("data") or {}
        if data.get("resultType") == "scalar":  # as Prometheus's rule engine: one sample without labels
            return [Sample({}, float(data["result"][1]))]
        if data.get("resultType") != "vector":
            kind = {"matrix": "a range vector", "string": "a string"}.get(
                str(data.get("resultType")), repr(data.get("resultType")))
            raise EvaluationError(f"rule result is not a vector or scalar (it is {kind}): {expr}")
        return [Sample(dict(r.get("metric", {})), float(r["value"][1])) for r in data.get("result") or []]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[tuple[dict[str, str], list[float]]]:
        """Each series of a range query with its values (for learned thresholds)."""
        try:
            result = self.client.custom_query_range(
                expr, datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(end, UTC), f"{step:g}s",
                timeout=self.timeout_s)
        except PrometheusApiClientException as exc:
            raise DatasourceError(f"Prometheus at {self.url} rejected the range query: {exc}") from exc
        except requests.RequestException as exc:
            raise DatasourceError(f"Prometheus at {self.url} unreachable: {type(exc).__name__}: {exc}") from exc
        return [({k: v for k, v in r.get("metric", {}).items() if k != "__name__"},
                 [float(v) for _, v in r.get("values", [])]) for r in result]

    def close(self) -> None:
        self.http.close()
        self.client._session.close()

    def reload(self, timeout_s: float = 30.0) -> None:
        """``POST /-/reload`` (Prometheus started with ``--web.enable-lifecycle``): re-read the config file."""
        try:
            self.http.post(f"{self.url}/-/reload", timeout=timeout_s).raise_for_status()
        except httpx.HTTPError as exc:
            raise ServiceError(f"Prometheus at {self.url} did not reload its config: {exc}") from exc
