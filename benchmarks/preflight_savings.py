"""What the quota pre-flight saves: ARM writes in the quota-exhausted scenario, with it and without it.

Puts N Kaito NodeClaims through a real API server, the AKS simulator (scenario quota-exhausted) and a
`gpu-provisioner run` process, once with PREFLIGHT=true and once with PREFLIGHT=false, and counts the ARM
requests of each by operation over the same window. Run: `.venv/bin/python benchmarks/preflight_savings.py`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Annotated

import kubernetes
import typer

from gpu_provisioner.api.claims import CLAIM_APIS, GROUP
from gpu_provisioner.devenv.controlplane import ControlPlane, die_with_parent, free_port
from gpu_provisioner.devenv.tools import ensure_tools
from gpu_provisioner.sandbox import kaito_claim
from gpu_provisioner.sim import AksSimulator, Scenario


def arm_requests(plane: ControlPlane, client: kubernetes.client.ApiClient, preflight: bool, claims: int,
                 window_s: float) -> Counter[str]:
    api = CLAIM_APIS["nodeclaim"]
    custom = kubernetes.client.CustomObjectsApi(client)
    with AksSimulator(Scenario.named("quota-exhausted"), kube_api=client) as sim:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ARM_", "AZURE_", "AKS_SIM_"))}
        env.update(sim.azure_environment(), KUBECONFIG=str(plane.kubeconfig), CLAIM_APIS="nodeclaim",
                   PREFLIGHT=str(preflight).lower(), METRICS_PORT=str(free_port()),
                   HEALTH_PROBE_PORT=str(free_port()), LOG_LEVEL="warning")
        log = Path(tempfile.mkdtemp(prefix="gpu-provisioner-preflight-")) / "controller.log"
        with open(log, "wb") as out:
            controller = subprocess.Popen([sys.executable, "-m", "gpu_provisioner", "run"], env=env,
                                          stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        names = [f"pf{int(preflight)}{index:08x}" for index in range(claims)]
        try:
            for name in names:
                custom.create_cluster_custom_object(GROUP, api.version, api.plural, kaito_claim(api, name))
            time.sleep(window_s)
            counts = Counter(r.operation for r in sim.requests if r.operation not in ("token", "openid-configuration"))
        finally:
            controller.terminate()
            controller.wait(timeout=30)
            for name in names:  # the controller is gone: let the claims go without it
                custom.patch_cluster_custom_object(GROUP, api.version, api.plural, name,
                                                   {"metadata": {"finalizers": None}})
                custom.delete_cluster_custom_object(GROUP, api.version, api.plural, name)
    return counts


def main(
    claims: Annotated[int, typer.Option(help="How many claims.")] = 10,
    window_s: Annotated[float, typer.Option(help="Seconds to count ARM requests for, from the first claim.")] = 90.0,
) -> None:
    with ControlPlane(ensure_tools()) as plane, plane.api_client() as client:
        for preflight in (False, True):
            counts = arm_requests(plane, client, preflight, claims, window_s)
            writes = counts["agentpools.create"] + counts["agentpools.delete"]
            print(f"PREFLIGHT={str(preflight).lower()}: {claims} claims, {window_s:.0f} s: {writes} ARM writes "
                  f"({counts['agentpools.create']} PUT), {sum(counts.values())} requests in all: {dict(counts)}")


if __name__ == "__main__":
    typer.run(main)
