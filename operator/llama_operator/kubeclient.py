"""Reaching the Kubernetes API: connection settings, and how a failed request is to be taken.

The operator reaches any API server through a kubeconfig or in-cluster config; kopf gets the same
credentials through a login handler. A failed request is either transient (429 with its Retry-After,
5xx, a dropped connection, a conflict on a patch: worth retrying after a short wait), a refusal for good
(an invalid object, an admission webhook's no: retrying the same request cannot help), or something the
caller handles itself (401, 404, 409).
"""
from __future__ import annotations

import json
import os

import kopf
import kubernetes
from kubernetes.dynamic.exceptions import DynamicApiError
from urllib3.exceptions import HTTPError as Urllib3Error


USER_AGENT = "llama-operator"
#: The cap on a server's Retry-After.
MAX_RETRY_AFTER = 10.0


class ConfigError(Exception):
    """No way to reach a cluster: neither in-cluster config nor a usable kubeconfig."""


def load_client_configuration(kubeconfig: str | None = None) -> kubernetes.client.Configuration:
    """In-cluster config when running in a pod, else the kubeconfig (`kubeconfig`, $KUBECONFIG, ~/.kube/config).

    $KUBECONFIG is read now, not when the kubernetes package was imported.
    """
    cfg = kubernetes.client.Configuration()
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        try:
            kubernetes.config.load_incluster_config(client_configuration=cfg)
            return cfg
        except kubernetes.config.ConfigException:
            pass
    path = kubeconfig or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    path = path.split(os.pathsep)[0]
    try:
        kubernetes.config.load_kube_config(config_file=path, client_configuration=cfg)
    except (kubernetes.config.ConfigException, FileNotFoundError, OSError, TypeError) as e:
        raise ConfigError(f"cannot load kubeconfig {path}: {e}") from None
    return cfg


def connection_info(cfg: kubernetes.client.Configuration) -> kopf.ConnectionInfo:
    """kopf's credentials from the client's configuration (token, client certificates, CA)."""
    header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization")
    parts = header.split(" ", 1) if header else []
    scheme, token = (None, None) if not parts else (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        username=cfg.username or None,
        password=cfg.password or None,
        scheme=scheme,
        token=token,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
    )


def retry_delay(e: BaseException, *, conflict_ok: bool) -> float | None:
    """Seconds to wait before retrying after `e`, or None when retrying cannot help."""
    if isinstance(e, (DynamicApiError, kubernetes.client.ApiException)):
        status = getattr(e, "status", None)
        if status == 429:
            headers = getattr(e, "headers", None) or {}
            try:
                hint = float(headers.get("Retry-After") or 1.0)
            except (TypeError, ValueError):
                hint = 1.0
            return min(max(hint, 0.1), MAX_RETRY_AFTER)
        if status in (500, 502, 503, 504) or (status == 409 and conflict_ok):
            return 0.0  # the caller adds its backoff
        return None
    if isinstance(e, (Urllib3Error, ConnectionError, TimeoutError)):
        return 0.0
    return None


def refusal(e: BaseException) -> bool:
    """Whether the API server refused a write for good: retrying the same request cannot help (an invalid
    object, an admission webhook's or policy's no). Not: 401 (credentials), 404 and 409 (the Writer's
    own cases), 408 and 429 (transient)."""
    if not isinstance(e, (DynamicApiError, kubernetes.client.ApiException)):
        return False
    status = getattr(e, "status", None)
    return isinstance(status, int) and 400 <= status < 500 and status not in (401, 404, 408, 409, 410, 429)


def api_message(e: BaseException) -> str:
    """The API server's own message for a failed request (its Status body), else the status line."""
    body = getattr(e, "body", None)
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if isinstance(body, str) and body:
        try:
            message = json.loads(body).get("message")
        except (ValueError, AttributeError):
            message = None
        if message:
            return str(message)
    return status_line(e)


def status_line(e: BaseException) -> str:
    """A failed request in a few words, for a log line: its HTTP status and reason, else the error's type."""
    status = getattr(e, "status", None)
    reason = getattr(e, "reason", None)
    return f"{status} {reason}" if status else type(e).__name__
