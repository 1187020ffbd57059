"""A simulated AKS: the ARM agent-pool API over HTTPS, and a kubelet stand-in that makes Nodes join."""

from gpu_provisioner.sim.scenario import PRESETS, Scenario
from gpu_provisioner.sim.server import AksSimulator, RequestRecord

__all__ = ["PRESETS", "AksSimulator", "RequestRecord", "Scenario"]
