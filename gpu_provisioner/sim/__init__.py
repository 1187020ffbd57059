"""A simulated AKS: the ARM agent-pool API over HTTPS, and a kubelet stand-in that makes Nodes join."""

from typing import Any

from gpu_provisioner.sim.scenario import PRESETS, Scenario

__all__ = ["PRESETS", "AksSimulator", "RequestRecord", "Scenario"]


def __getattr__(name: str) -> Any:
    # The server (HTTPS, certificates, the node materialiser) is loaded by those who use it, not by every
    # `gpu-provisioner` command: the controller's start does not pay for it.
    if name in ("AksSimulator", "RequestRecord"):
        from gpu_provisioner.sim import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
