"""One typed settings object, from a YAML file and ``SENTINEL_*`` environment variables.

Precedence (highest first): explicit overrides (CLI flags), environment (``SENTINEL_API__PORT=9000``),
the YAML file, defaults. Invalid settings stop the start with ``file:line: field: problem``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from sentinel.alerts.routing import RouteConfig
from sentinel.alerts.silences import DEFAULT_INHIBIT_RULES, InhibitRule
from sentinel.durations import Duration
from sentinel.errors import ConfigError, FileFormatError
from sentinel.yamlfile import format_problems, load_yaml

PLACEHOLDER_SECRETS = frozenset({"changeme", "change-me", "changethis", "secret", "password", "token", "admin"})


def _no_placeholder(v: SecretStr | None) -> SecretStr | None:
    if v is not None:
        raw = v.get_secret_value()
        if raw.lower() in PLACEHOLDER_SECRETS or len(raw) < 12:
            raise ValueError("refusing a placeholder or short secret (use 12+ random characters)")
    return v


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ApiSettings(Section):
    host: str = "127.0.0.1"
    port: int = Field(9095, ge=0, le=65535, description="sentinel's API; left at the default and taken: the next "
                      "free port (the up table says so); set and taken: an error; 0: any free port")
    token: SecretStr | None = Field(None, description="bearer token for mutating endpoints (an API key with every "
                                    "scope)")
    api_key_hashes: list[str] = Field(default_factory=list, description="SHA-256 (hex) of more API keys "
                                      "(`sentinel token hash`); the keys themselves are never stored")
    jwt_secret: SecretStr | None = Field(None, description="accept HS256 tokens signed with this secret "
                                         "(`sentinel token issue` signs with it)")
    jwt_public_key: Path | None = Field(None, description="accept RS256/ES256 tokens: a PEM public key")
    jwt_jwks: Path | None = Field(None, description="accept RS256/ES256 tokens: a JWKS file")
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    protect_reads: bool = Field(False, description="reads under /api/ need a token with the 'read' scope")
    tls_cert: Path | None = Field(None, description="serve HTTPS (TLS 1.3 only) with this certificate")
    tls_key: Path | None = None
    tls_client_ca: Path | None = Field(None, description="mutual TLS: clients need a certificate signed by this CA")
    rate_limit: float = Field(10.0, ge=0, description="requests/s per client on /api/ (the seed: 10; 0: none)")
    rate_burst: int = Field(20, ge=1)
    _token = field_validator("token", "jwt_secret")(_no_placeholder)

    @field_validator("api_key_hashes")
    @classmethod
    def _hashes(cls, v: list[str]) -> list[str]:
        for h in v:
            if not re.fullmatch(r"[0-9a-f]{64}", h):
                raise ValueError(f"{h[:8]}...: not a SHA-256 in hex (64 characters 0-9a-f); `sentinel token hash` "
                                 "makes one")
        return v


class PrometheusSettings(Section):
    url: str | None = Field(None, description="use this Prometheus instead of starting one")
    port: int = Field(9090, ge=0, le=65535, description="the Prometheus sentinel starts (its conventional port); "
                      "left at the default and taken: the next free port; 0: any free port")
    binary: str = "prometheus"
    scrape_interval: Duration = 5.0
    query_timeout: Duration = 10.0


class ReplicaSettings(Section):
    count: int = Field(1, ge=1, le=64)
    max_count: int = Field(4, ge=1, le=64, description="scale-out never goes beyond this many replicas")
    min_count: int = Field(1, ge=1, le=64, description="scale-in never goes below this many replicas")
    model_dir: Path | None = Field(None, description="default: the bundled model, generated on first start")
    served_model_name: str = "deepseek-tiny"
    ports: list[int] = Field(default_factory=list, description="one per replica; empty: free ports")
    enable_faults: bool = False
    admin_token: SecretStr | None = None
    start_timeout: Duration = 120.0
    liveness_interval: Duration = Field(2.0, description="how often sentinel probes each local replica's /health")
    liveness_failures: int = Field(3, ge=1, description="probes in a row that find the engine stalled or the "
                                   "process gone before InferenceReplicaUnresponsive fires (and the replica restarts)")
    rate_limit: float = Field(10.0, ge=0, description="requests/s per client on each replica's /v1/* (the seed: 10; "
                              "0: none)")
    rate_burst: int = Field(20, ge=1, description="bursts of this many requests (the seed: 20)")
    cpu_sets: Literal["disjoint", "shared"] = Field(
        "disjoint", description="on a CPU host, each replica runs on cores of its own (count replicas split the "
        "cores; a scale-out needs free cores, else it is refused: 'host full'), or every replica may use every core "
        "and memory alone bounds scale-out (for models too small to keep a core busy)")
    engine_args: list[str] = Field(
        default_factory=list, description="more flags for every replica's inference server, as a list, e.g. "
        "['--quantization', 'int8', '--max-num-seqs', '16'] (each replica gets --memory-limit from the host plan "
        "unless one is given here)")
    _token = field_validator("admin_token")(_no_placeholder)


class ReceiverSettings(Section):
    name: str = Field(min_length=1)
    url: str = Field(pattern=r"^https?://")
    signing_key: SecretStr | None = Field(None, description="sign each request: HMAC-SHA256 over the timestamp and "
                                          "the body (X-Sentinel-Signature); never stored in sentinel's state")
    signing_key_id: str = Field("default", pattern=r"^[A-Za-z0-9._-]{1,64}$", description="named in the "
                                "signature so receivers can rotate keys")
    send_resolved: bool = Field(True, description="also notify when alerts resolve (Alertmanager's send_resolved)")
    max_alerts: int = Field(0, ge=0, description="at most this many alerts per notification, the rest counted in "
                            "truncatedAlerts (0: all)")
    _key = field_validator("signing_key")(_no_placeholder)


class AlertingSettings(Section):
    evaluation_interval: Duration = 15.0
    resend_delay: Duration = 60.0
    meta_for: Duration = 60.0
    reload_interval: Duration = 2.0
    max_concurrent_evaluations: int = Field(4, ge=1, le=64)
    inhibit_rules: list[InhibitRule] = Field(
        default_factory=lambda: list(DEFAULT_INHIBIT_RULES), description="Alertmanager's inhibit_rules (matcher "
        "lists): the default mutes a down replica's latency and GPU alerts")
    notification_max_age: Duration = Field(3600.0, gt=0, description="a notification still undelivered after this "
                                           "long expires, and SentinelNotificationUndeliverable tells the other "
                                           "receivers")
    retention: Duration = Field(7 * 86400.0, gt=0, description="delivered notifications, runbook findings, finished "
                                "remediations and resolved alerts are kept this long")
    audit_retention: Duration = Field(90 * 86400.0, gt=0, description="audit log rows are kept this long")
    receivers: list[ReceiverSettings] = Field(default_factory=list)
    route: RouteConfig | None = Field(None, description="Alertmanager's routing tree for the receivers above "
                                      "(group_by, group_wait, group_interval, repeat_interval, matchers, continue, "
                                      "routes); unset: every receiver gets every alert, grouped by alertname, "
                                      "after 30s/5m/4h")
    relay_inbound: bool = Field(True, description="alerts that arrive on the Alertmanager webhook are also routed "
                                "to the receivers above, with sentinel's evidence attached")
    alertmanager_url: str | None = Field(None, pattern=r"^https?://",
                                         description="also push alerts to this Alertmanager (POST /api/v2/alerts)")

    @model_validator(mode="after")
    def _route(self) -> AlertingSettings:
        names = [r.name for r in self.receivers]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"receivers: the name {dup[0]!r} is used twice")
        if self.route is not None:
            if not self.route.receiver:
                raise ValueError("route.receiver: the root route needs a receiver (Alertmanager's rule)")
            unknown = sorted(self.route.receivers() - set(names))
            if unknown:
                raise ValueError(f"route: receiver {unknown[0]!r} is not one of alerting.receivers {names}")
        return self


class RemediationSettings(Section):
    enabled: bool = True
    dry_run: bool = False
    paused: bool = False
    cooldown: Duration = 300.0
    max_actions_per_hour: int = Field(6, ge=0)
    max_concurrent: int = Field(1, ge=1)
    verify_timeout: Duration = 120.0
    clear_deadline: Duration = Field(600.0, description="after a restart that succeeded, the alert must stop firing "
                                     "within this long; if not, the attempt did not help and the ladder climbs")
    escalation_window: Duration = Field(3600.0, description="a problem that comes back within this long climbs the "
                                        "escalation ladder (restart x2, GPU reset with approval, cordon, page)")
    scale_in_stabilization: Duration = Field(300.0, description="scale in only after the alert has fired this long "
                                             "and no scale action ran within it (Kubernetes HPA's default)")


class DiagnosticsSettings(Section):
    """Where the checks read; every root can point elsewhere (a container's host mounts, tests)."""

    proc_root: Path = Path("/proc")
    sys_root: Path = Path("/sys")
    dev_root: Path = Path("/dev")
    var_log: Path = Path("/var/log")
    nvidia_smi: str = "nvidia-smi"
    dmesg: str = "dmesg"
    max_parallel_runbooks: int = Field(2, ge=1, le=16)


class LogSettings(Section):
    ship_interval: Duration = 1.0
    retention: Duration = Field(7 * 86400.0, gt=0, description="the local store keeps lines this long (pruned every "
                                "10 minutes); Elasticsearch's retention is the cluster's (ILM)")
    elasticsearch_url: str | None = Field(
        None, description="ship logs to this Elasticsearch (8.x) and answer log rules from it; "
        "default: the local store")
    elasticsearch_timeout: Duration = 10.0
    catch_up_max: Duration = Field(3600.0, description="log rules replay the evaluations they missed (log store "
                                   "down, sentinel down) up to this far back; 0 turns replays off")


class RouterSettings(Section):
    """The OpenAI-compatible endpoint in front of the local replicas (``sentinel up`` prints it first)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535, description="the OpenAI-compatible endpoint (vLLM's port); left at the "
                      "default and taken: the next free port (the up table says so); 0: any free port")
    poll_interval: Duration = Field(0.25, description="how often each replica's /load is read")
    timeout: Duration = Field(600.0, description="the longest a request may take upstream")


class KubernetesSettings(Section):
    """Kubernetes mode: the replicas are the pods of a Deployment (``deploy/kubernetes/inference.yaml``);
    sentinel acts through the API (delete a pod, the scale subresource, rollout restart, cordon) and two or
    more sentinels elect one leader with a coordination Lease: only the leader notifies and acts."""

    enabled: bool = False
    api_url: str | None = Field(None, pattern=r"^https?://", description="the API server; default: kubeconfig "
                                "when set, else in-cluster (the pod's service account)")
    kubeconfig: Path | None = Field(None, description="a kubeconfig file to use instead of the in-cluster account")
    namespace: str = Field("default", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    deployment: str = Field("deepseek-inference", pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
                            description="the inference Deployment whose pods are the replicas")
    lease_name: str = Field("sentinel-leader", pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    identity: str | None = Field(None, description="this sentinel's name in the Lease; default: $POD_NAME, else "
                                 "the host name plus the process id")
    lease_duration: Duration = Field(15.0, description="a leader that has not renewed for this long is replaced "
                                     "(client-go's LeaseDuration)")
    renew_deadline: Duration = Field(10.0, description="a leader that cannot renew within this long steps down")
    retry_period: Duration = Field(2.0, description="how often to try to acquire or renew")

    @model_validator(mode="after")
    def _timings(self) -> KubernetesSettings:
        if not self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError("need retry_period < renew_deadline < lease_duration (client-go's rule)")
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SENTINEL_", env_nested_delimiter="__", extra="forbid")

    state_dir: Path = Path("var/sentinel")
    rules_dir: Path = Path("rules")
    runbooks_dir: Path = Path("runbooks")
    api: ApiSettings = Field(default_factory=ApiSettings)
    prometheus: PrometheusSettings = Field(default_factory=PrometheusSettings)
    replicas: ReplicaSettings = Field(default_factory=ReplicaSettings)
    alerting: AlertingSettings = Field(default_factory=AlertingSettings)
    remediation: RemediationSettings = Field(default_factory=RemediationSettings)
    logs: LogSettings = Field(default_factory=LogSettings)
    diagnostics: DiagnosticsSettings = Field(default_factory=DiagnosticsSettings)
    kubernetes: KubernetesSettings = Field(default_factory=KubernetesSettings)
    router: RouterSettings = Field(default_factory=RouterSettings)

    @model_validator(mode="after")
    def _kubernetes_needs(self) -> Settings:
        if self.kubernetes.enabled:
            missing = [name for name, v in (("prometheus.url", self.prometheus.url),
                                            ("logs.elasticsearch_url", self.logs.elasticsearch_url)) if not v]
            if missing:
                raise ValueError(f"kubernetes.enabled needs {' and '.join(missing)}: in a cluster sentinel starts "
                                 "no Prometheus and ships no logs (the Prometheus Operator and Filebeat do)")
        return self

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _FileSource(settings_cls)


class _FileSource(PydanticBaseSettingsSource):
    """The YAML file's data, set by :func:`load_settings` for the duration of one validation."""

    data: dict[str, Any] = {}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.data)


def load_settings(path: Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Build the settings; raises ConfigError naming file, line and field."""
    data: dict[str, Any] = {}
    lines: dict[tuple[str | int, ...], int] = {}
    if path is not None:
        try:
            raw, lines = load_yaml(path)
        except FileFormatError as exc:
            raise ConfigError(str(exc)) from exc
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError(f"{path}:1: (document): expected a mapping of settings")
        data = raw or {}
    _FileSource.data = data
    try:
        s = Settings(**(overrides or {}))  # sources are deep-merged: an override keeps sibling fields
    except ValidationError as exc:
        where = path if path is not None else Path("<environment>")
        raise ConfigError("\n".join(format_problems(where, exc, lines))) from exc
    finally:
        _FileSource.data = {}
    return s
