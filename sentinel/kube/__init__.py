"""Kubernetes mode: an API client from the settings, leader election with a coordination Lease
(``lease.py``) and the actuator that restarts and scales through the API (``actuator.py``)."""

from __future__ import annotations

import os
import socket

from kubernetes import client as k8s
from kubernetes import config as k8s_config

from sentinel.errors import ConfigError
from sentinel.settings import KubernetesSettings


def api_client(s: KubernetesSettings) -> k8s.ApiClient:
    """``api_url`` as given (a token from $KUBERNETES_TOKEN if set), else the kubeconfig file, else the pod's
    service account (in-cluster)."""
    cfg = k8s.Configuration()
    if s.api_url:
        cfg.host = s.api_url.rstrip("/")
        token = os.environ.get("KUBERNETES_TOKEN")
        if token:
            cfg.api_key = {"BearerToken": token}
            cfg.api_key_prefix = {"BearerToken": "Bearer"}
    elif s.kubeconfig is not None:
        k8s_config.load_kube_config(str(s.kubeconfig), client_configuration=cfg)
    else:
        try:
            k8s_config.load_incluster_config(client_configuration=cfg)
        except k8s_config.ConfigException as exc:
            raise ConfigError(f"kubernetes: not in a cluster ({exc}); set kubernetes.api_url or "
                              "kubernetes.kubeconfig") from exc
    return k8s.ApiClient(cfg)


def identity(s: KubernetesSettings) -> str:
    return s.identity or os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
