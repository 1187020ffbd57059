"""This build's version, and the name the controller gives itself in the requests it sends."""

from __future__ import annotations

import functools
import importlib.metadata


@functools.cache
def version() -> str:
    return importlib.metadata.version("gpu-provisioner")


def user_agent() -> str:
    """The User-Agent of its Kubernetes and ARM requests. The API server names the field manager of a write after
    it (the part before the '/'), so `kubectl get -o yaml --show-managed-fields` and the audit log say which fields
    gpu-provisioner set; without it they said `OpenAPI-Generator`, the generated client's default."""
    return f"gpu-provisioner/{version()}"
