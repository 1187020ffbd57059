"""Run the built controller image as the chart's Deployment runs it: the pod's user, read-only root, dropped
capabilities, no privilege escalation, the chart's command and arguments, and a tmpfs for each emptyDir."""

from __future__ import annotations

import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gpu_provisioner.devenv.image import CHART, ContainerEngine


def rendered_deployment(helm: Path, *helm_args: str) -> dict[str, Any]:
    """The chart's Deployment, rendered by helm with these extra arguments."""
    out = subprocess.run(
        [str(helm), "template", "gpu-provisioner", str(CHART), "--namespace", "gpu-provisioner",
         "--kube-version", "1.33.0", *helm_args], capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    return next(doc for doc in yaml.safe_load_all(out) if doc and doc["kind"] == "Deployment")


@dataclass
class ChartContainer:
    """`podman run` (or `docker run`) arguments for the Deployment's one container."""

    engine: ContainerEngine
    image: str
    deployment: dict[str, Any]
    name: str = field(default_factory=lambda: f"gpu-provisioner-test-{uuid.uuid4().hex[:8]}")

    @property
    def pod_spec(self) -> dict[str, Any]:
        return self.deployment["spec"]["template"]["spec"]

    @property
    def container(self) -> dict[str, Any]:
        return self.pod_spec["containers"][0]

    def chart_env(self, pod_name: str, namespace: str) -> dict[str, str]:
        """The container's environment as the kubelet would give it (downward-API fields resolved)."""
        fields = {"metadata.name": pod_name, "metadata.namespace": namespace}
        env = {}
        for entry in self.container.get("env", []):
            if "value" in entry:
                env[entry["name"]] = str(entry["value"])
            else:
                env[entry["name"]] = fields[entry["valueFrom"]["fieldRef"]["fieldPath"]]
        return env

    def argv(self, env: dict[str, str], mounts: dict[Path, str], *, volumes: bool = True,
             args: list[str] | None = None) -> list[str]:
        """The run command; `volumes=False` leaves out the pod's emptyDirs, so that nothing is writable."""
        pod_security = self.pod_spec.get("securityContext", {})
        security = self.container.get("securityContext", {})
        argv = [*self.engine.argv, "run", "--rm", "--name", self.name, "--network", "host",
                *self.engine.rlimit_options(), "--pull=never",
                "--user", f"{pod_security['runAsUser']}:{pod_security['runAsGroup']}"]
        if security.get("readOnlyRootFilesystem"):
            argv += ["--read-only"] + (["--read-only-tmpfs=false"] if self.engine.name == "podman" else [])
        argv += [f"--cap-drop={cap}" for cap in security.get("capabilities", {}).get("drop", [])]
        if security.get("allowPrivilegeEscalation") is False:
            argv += ["--security-opt", "no-new-privileges"]
        if volumes:
            empty_dirs = {v["name"] for v in self.pod_spec.get("volumes", []) if "emptyDir" in v}
            argv += [f"--tmpfs={m['mountPath']}" for m in self.container.get("volumeMounts", [])
                     if m["name"] in empty_dirs]
        for source, target in mounts.items():
            argv += ["--volume", f"{source}:{target}:ro"]
        for name, value in env.items():
            argv += ["--env", f"{name}={value}"]
        argv += ["--entrypoint", self.container["command"][0], self.image]
        return argv + (self.container.get("args", []) if args is None else args)

    def remove(self) -> None:
        subprocess.run([*self.engine.argv, "rm", "--force", self.name], capture_output=True)
