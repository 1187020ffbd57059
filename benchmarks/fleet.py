"""Fleet benchmark: N Kaito claims through a real API server and the AKS simulator.

Prints time to Ready (all and per claim), ARM requests by operation (the subscription's throttling
budget), and the controller process's peak memory and CPU time. Run: `make bench` (or
`.venv/bin/python benchmarks/fleet.py --claims 50`).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Annotated

import kubernetes
import typer

from gpu_provisioner.api.claims import CLAIM_APIS, GROUP, READY
from gpu_provisioner.devenv.controlplane import ControlPlane, die_with_parent, free_port
from gpu_provisioner.devenv.tools import ensure_tools
from gpu_provisioner.sandbox import kaito_claim
from gpu_provisioner.sim import AksSimulator, Scenario


def process_figures(pid: int) -> tuple[float, float]:
    """(peak resident MiB, CPU seconds) of a running process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    peak_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return peak_kib / 1024, cpu_s


def main(
    claims: Annotated[int, typer.Option(help="How many claims.")] = 20,
    api: Annotated[str, typer.Option(help="machine or nodeclaim")] = "nodeclaim",
    refresh_s: Annotated[float, typer.Option(help="POOL_REFRESH_INTERVAL_SECONDS of the controller.")] = 10.0,
) -> None:
    claim_api = CLAIM_APIS[api]
    with ControlPlane(ensure_tools()) as plane, plane.api_client() as client, \
            AksSimulator(Scenario(), kube_api=client) as sim:
        workdir = Path(tempfile.mkdtemp(prefix="gpu-provisioner-bench-"))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ARM_", "AZURE_", "AKS_SIM_"))}
        env.update(sim.azure_environment(), KUBECONFIG=str(plane.kubeconfig), CLAIM_APIS=api,
                   POOL_REFRESH_INTERVAL_SECONDS=str(refresh_s), METRICS_PORT=str(free_port()),
                   HEALTH_PROBE_PORT=str(free_port()), LOG_LEVEL="warning")
        with open(workdir / "controller.log", "wb") as log:
            controller = subprocess.Popen([sys.executable, "-m", "gpu_provisioner", "run"], env=env,
                                          stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        try:
            custom = kubernetes.client.CustomObjectsApi(client)
            names = [f"ws{index:09x}" for index in range(claims)]
            started = time.monotonic()
            for name in names:
                custom.create_cluster_custom_object(GROUP, claim_api.version, claim_api.plural,
                                                    kaito_claim(claim_api, name))
            ready_after: dict[str, float] = {}
            while len(ready_after) < claims and time.monotonic() - started < 600:
                if controller.poll() is not None:
                    raise SystemExit(f"the controller exited with code {controller.returncode}")
                for item in custom.list_cluster_custom_object(GROUP, claim_api.version, claim_api.plural)["items"]:
                    conditions = (item.get("status") or {}).get("conditions") or []
                    name = item["metadata"]["name"]
                    ready = any(c["type"] == READY and c["status"] == "True" for c in conditions)
                    if ready and name not in ready_after:
                        ready_after[name] = time.monotonic() - started
                time.sleep(0.2)
            all_ready_s = time.monotonic() - started
            launch_requests = Counter(r.operation for r in sim.requests)

            deleting = time.monotonic()
            for name in names:
                custom.delete_cluster_custom_object(GROUP, claim_api.version, claim_api.plural, name)
            while custom.list_cluster_custom_object(GROUP, claim_api.version, claim_api.plural)["items"]:
                time.sleep(0.2)
            all_deleted_s = time.monotonic() - deleting
            peak_mib, cpu_s = process_figures(controller.pid)
        except BaseException:
            print(f"controller log kept in {workdir / 'controller.log'}", file=sys.stderr)
            raise
        else:
            shutil.rmtree(workdir)
        finally:
            controller.terminate()
            controller.wait(timeout=30)
        total_requests = Counter(r.operation for r in sim.requests)
        latencies = sorted(ready_after.values())
        print(f"claims: {claims} ({claim_api.kind}), pool refresh interval {refresh_s:.0f}s, default simulator delays")
        print(f"ready: {len(latencies)}/{claims}; all Ready after {all_ready_s:.1f}s; per claim p50 "
              f"{statistics.median(latencies):.1f}s, p95 {latencies[int(0.95 * (len(latencies) - 1))]:.1f}s, "
              f"max {latencies[-1]:.1f}s")
        print(f"all deleted (node drained, pool gone, finalizer released) after {all_deleted_s:.1f}s")
        arm = {op: n for op, n in total_requests.items() if op not in ("token", "openid-configuration")}
        print(f"ARM requests until all Ready: {sum(n for op, n in launch_requests.items() if op in arm)} "
              f"{dict(sorted((op, n) for op, n in launch_requests.items() if op in arm))}")
        print(f"ARM requests in all: {sum(arm.values())} ({sum(arm.values()) / claims:.1f} per claim) "
              f"{dict(sorted(arm.items()))}")
        print(f"controller: peak RSS {peak_mib:.0f} MiB, CPU {cpu_s:.1f}s")


if __name__ == "__main__":
    typer.run(main)
