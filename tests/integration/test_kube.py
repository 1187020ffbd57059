"""Kube's calls against an API server that takes the connection and never answers."""

from __future__ import annotations

import socket
import time

import kubernetes
import pytest
import urllib3

from gpu_provisioner.api.claims import NODECLAIM
from gpu_provisioner.runtime import rest
from gpu_provisioner.runtime.kube import Kube


def test_a_call_to_a_stalled_api_server_gives_up_and_says_so():
    """A worker is not held for good: the call fails after its timeout, as an outage the controller retries."""
    assert rest.CALL_TIMEOUT is not None  # the default every plain call gets
    with socket.socket() as stalled:
        stalled.bind(("127.0.0.1", 0))
        stalled.listen(16)  # accepts connections (the kernel does), never answers
        config = kubernetes.client.Configuration()
        config.host = f"http://127.0.0.1:{stalled.getsockname()[1]}"
        kube = Kube(kubernetes.client.ApiClient(config), timeout=(1.0, 0.5))
        started = time.monotonic()
        with pytest.raises(urllib3.exceptions.HTTPError):
            kube.patch_claim(NODECLAIM, "ws1", {"metadata": {"labels": {"a": "b"}}})
        assert time.monotonic() - started < 5
        assert kube.outage.ongoing
