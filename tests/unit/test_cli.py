"""The controller's Kubernetes client, as `gpu-provisioner run` makes it."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpu_provisioner.cli import CONNECTIONS_BESIDE_WORKERS, _kubernetes_api_client
from gpu_provisioner.settings import Settings

KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:6443"}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
"""


def test_the_connection_pool_holds_every_concurrent_request(tmp_path: Path):
    """One kept connection for each worker and for each watch, the Event sender and leader election: the client's
    default (5 a core) would open and throw away a TLS connection for each request beyond it."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(KUBECONFIG)
    workers = Settings.model_fields["workers"].default
    client = _kubernetes_api_client(kubeconfig, workers + CONNECTIONS_BESIDE_WORKERS)
    assert client.configuration.host == "https://127.0.0.1:6443"
    assert client.rest_client.pool_manager.connection_pool_kw["maxsize"] == workers + CONNECTIONS_BESIDE_WORKERS > 10


@pytest.mark.parametrize("https_proxy", ["", "http://proxy.example:3128"])
def test_the_environments_proxy_is_read_once_not_before_every_request(tmp_path: Path, monkeypatch, https_proxy):
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    if https_proxy:
        monkeypatch.setenv("HTTPS_PROXY", https_proxy)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(KUBECONFIG)
    client = _kubernetes_api_client(kubeconfig, 10)
    assert client.configuration.proxy == (https_proxy or None)
    read = []
    monkeypatch.setattr("kubernetes.client.configuration.getproxies", lambda: read.append(1) or {})
    # What every request does first: its credentials' refresh hook, which sets the host again.
    assert client.configuration.get_api_key_with_prefix("BearerToken") == "Bearer t"
    assert read == [] and client.configuration.proxy == (https_proxy or None)
