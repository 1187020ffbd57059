"""Image benchmark: its size, and the time from `run` to /readyz, run as the chart runs it.

The start time is split into the container runtime's part (the same image running `true`) and the rest:
Python's imports, the first pool LIST answered by the simulator (no scenario delay) and the caches synced.
Run: `make bench-image` (or `.venv/bin/python benchmarks/image.py --runs 5`).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Annotated

import typer

from gpu_provisioner.devenv.controlplane import ControlPlane, free_port
from gpu_provisioner.devenv.image import ChartContainer, build_image, readable_copy, rendered_deployment
from gpu_provisioner.devenv.tools import ensure_tools
from gpu_provisioner.sim import AksSimulator, Scenario

IN_CONTAINER = Path("/etc/gpu-provisioner-bench")


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as answer:
            return answer.status == 200
    except OSError:
        return False


def main(runs: Annotated[int, typer.Option(help="How many starts to time.")] = 5) -> None:
    engine, tag = build_image()
    size_mb = engine.image_size_bytes(tag) / 1e6
    with ControlPlane(ensure_tools()) as plane, plane.api_client() as client, \
            AksSimulator(Scenario(), kube_api=client) as sim:
        mounts_dir = Path(tempfile.mkdtemp(prefix="gpu-provisioner-bench-"))
        mounts_dir.chmod(0o755)
        kubeconfig = readable_copy(plane.kubeconfig, mounts_dir / plane.kubeconfig.name)
        ca = readable_copy(sim.ca_bundle, mounts_dir / sim.ca_bundle.name)
        deployment = rendered_deployment(plane.tools.helm)
        runtime_s, ready_s, loads = [], [], []
        for _ in range(runs):
            container = ChartContainer(engine, tag, deployment)
            started = time.monotonic()
            subprocess.run(container.argv({}, {}, entrypoint="true", args=[]), check=True, capture_output=True)
            runtime_s.append(time.monotonic() - started)

            health_port = free_port()
            env = {**sim.azure_environment(), "REQUESTS_CA_BUNDLE": str(IN_CONTAINER / ca.name),
                   "KUBECONFIG": str(IN_CONTAINER / kubeconfig.name), "METRICS_PORT": str(free_port()),
                   "HEALTH_PROBE_PORT": str(health_port), "LOG_LEVEL": "warning"}
            argv = container.argv(env, {mounts_dir: str(IN_CONTAINER)})
            started = time.monotonic()
            process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                while not _ready(health_port):
                    if process.poll() is not None or time.monotonic() - started > 60:
                        raise SystemExit(f"the container did not become ready (exit code {process.poll()})")
                    time.sleep(0.01)
                ready_s.append(time.monotonic() - started)
                loads.append(os.getloadavg()[0])
            finally:
                container.remove()
                process.wait(timeout=60)
        shutil.rmtree(mounts_dir)
    print(f"image {tag} ({engine.name}): {size_mb:.0f} MB uncompressed")
    print(f"run -> /readyz over {runs} starts: median {statistics.median(ready_s):.2f}s, max {max(ready_s):.2f}s "
          f"(of which the container runtime alone, running `true`: median {statistics.median(runtime_s):.2f}s); "
          f"load average (1 min) {min(loads):.2f}-{max(loads):.2f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    typer.run(main)
