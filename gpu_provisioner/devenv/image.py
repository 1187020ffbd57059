"""Build the controller image from the repository's Dockerfile, on a machine with or without a Docker engine,
and run it as the chart's Deployment runs it.

With a running Docker engine the build is a plain `docker build` from the real base image. Without one
(this project's development and CI machines) it is Debian's podman, as root, with what such a machine
needs: the runc runtime (crun cannot run under a hybrid cgroup hierarchy), rlimits within the hard limits
(root there lacks CAP_SYS_RESOURCE), the host network and CA bundle for pip in RUN steps, and, because no
registry can be reached, a stand-in for the Dockerfile's base image built from Debian's packages and
stored under the base's exact name.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from gpu_provisioner.devenv.tools import cache_lock, timed_step

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
CHART = REPO / "charts" / "gpu-provisioner"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# Debian packages a podman build here needs: the engine, the runtime it can use, and the stand-in's builder.
PODMAN_PACKAGES = ("podman", "runc", "mmdebstrap")
_MODEST_RLIMIT = 16384
_FROM = re.compile(r"^FROM\s+(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", re.IGNORECASE | re.MULTILINE)


class ImageBuildError(RuntimeError):
    """The image could not be built; the message says which step failed."""


class ImageToolsUnavailable(ImageBuildError):
    """Neither a Docker engine nor podman is here, and podman cannot be installed."""


def image_reference() -> str:
    """The name the chart pulls by default: its image repository at its appVersion."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    return f"{values['controller']['image']['repository']}:{chart['appVersion']}"


def base_images(dockerfile: Path = DOCKERFILE) -> list[str]:
    """The images the Dockerfile builds FROM (not its own stages, not scratch)."""
    stages: set[str] = set()
    bases: list[str] = []
    for image, stage in _FROM.findall(dockerfile.read_text()):
        if image not in stages and image != "scratch" and image not in bases:
            bases.append(image)
        if stage:
            stages.add(stage)
    return bases


def _qualified(image: str) -> str:
    """Docker Hub's full name for a short reference, as podman stores it."""
    first = image.split("/", 1)[0]
    if "/" not in image:
        return f"docker.io/library/{image}"
    if "." not in first and ":" not in first and first != "localhost":
        return f"docker.io/{image}"
    return image


def _run(argv: list[str], what: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1800)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-25:])
        raise ImageBuildError(f"{what} failed ({' '.join(argv[:3])} ... exit {result.returncode}):\n{tail}")
    return result.stdout


def _docker_engine_running() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


@dataclass(frozen=True)
class ContainerEngine:
    """A container CLI (docker or podman) and the global options this machine needs for it."""

    name: str

    @staticmethod
    def detect() -> ContainerEngine:
        return ContainerEngine("docker" if _docker_engine_running() else "podman")

    @property
    def argv(self) -> list[str]:
        return ["podman", "--runtime", "runc"] if self.name == "podman" else ["docker"]

    def rlimit_options(self) -> list[str]:
        """podman's default rlimits exceed what root may set here (no CAP_SYS_RESOURCE); even some values
        under the hard limits are refused (measured: nproc 65536 of 96365), so ask for a modest, ample one."""
        if self.name != "podman":
            return []
        options = []
        for name, limit in (("nofile", resource.RLIMIT_NOFILE), ("nproc", resource.RLIMIT_NPROC)):
            hard = resource.getrlimit(limit)[1]
            value = _MODEST_RLIMIT if hard == resource.RLIM_INFINITY else min(hard, _MODEST_RLIMIT)
            options += ["--ulimit", f"{name}={value}:{value}"]
        return options

    def image_exists(self, image: str) -> bool:
        return subprocess.run([*self.argv, "image", "inspect", image], capture_output=True).returncode == 0

    def image_size_bytes(self, image: str) -> int:
        return int(_run([*self.argv, "image", "inspect", "--format", "{{.Size}}", image], "image inspect").strip())


def ensure_podman(console: Console) -> None:
    """Install podman, runc and mmdebstrap from Debian when they are missing and this is a root Debian."""
    missing = [package for package in PODMAN_PACKAGES if shutil.which(package) is None]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ImageToolsUnavailable(
            f"no Docker engine runs here and {', '.join(missing)} are missing; install them (Debian: "
            f"apt-get install {' '.join(PODMAN_PACKAGES)}) or start a Docker engine"
        )
    install = ["apt-get", "install", "--yes", "--quiet", *PODMAN_PACKAGES]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with console.status(f"apt-get install {' '.join(PODMAN_PACKAGES)} ..."):
        if subprocess.run(install, capture_output=True, env=env).returncode != 0:
            # A fresh machine may not have read the package lists yet.
            _run(["apt-get", "update", "--quiet"], "apt-get update")
            _run(install, "apt-get install")


def build_standin_base(engine: ContainerEngine, base: str, console: Console) -> None:
    """A Debian bookworm root with Python 3.11, venv and ca-certificates, `python` on PATH and pip,
    setuptools and wheel installed as the official python image has them, stored as `base`."""
    hooks = [
        # The official image lets pip install into the system Python; Debian's marker forbids it.
        'rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED',
        # pip runs inside the root, where only Debian's CAs are; the host's bundle lets it through this
        # machine's TLS-inspecting proxy. The bundled pip wheel runs pip before pip is installed.
        f'cp {HOST_CA_BUNDLE} "$1"/tmp/host-ca.crt',
        'chroot "$1" sh -c \'set -- /usr/share/python-wheels/pip-*.whl; python3 "$1/pip" install --quiet '
        '--no-cache-dir --cert /tmp/host-ca.crt pip setuptools wheel\'',
        'rm -rf "$1"/tmp/host-ca.crt "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*',
    ]
    # As Debian's own slim images do: no documentation, manual pages or translations.
    excludes = ["/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*", "/usr/share/info/*"]
    packages = "python3,python3-venv,python-is-python3,ca-certificates,python3-pip-whl,python3-setuptools-whl"
    with tempfile.TemporaryDirectory(prefix="gpu-provisioner-base-") as workdir:
        tarball = Path(workdir) / "rootfs.tar"
        # /usr merged by mmdebstrap's hook rather than by the usrmerge package, which brings all of perl.
        argv = ["mmdebstrap", "--variant=minbase", "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
                f"--include={packages}"]
        argv += [f"--dpkgopt=path-exclude={pattern}" for pattern in excludes]
        argv += [f"--customize-hook={hook}" for hook in hooks]
        argv += ["bookworm", str(tarball), "http://deb.debian.org/debian"]
        with timed_step(console, f"build a stand-in for {base} from Debian's packages"):
            # pip inside the root must not see the host's CA variables (REQUESTS_CA_BUNDLE...): they name
            # host paths and would override --cert.
            _run(argv, "mmdebstrap", env={"PATH": os.environ["PATH"], "LANG": "C.UTF-8"})
        changes = ["ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "ENV LANG=C.UTF-8",
                   'CMD ["python3"]']
        import_argv = [*engine.argv, "import"]
        for change in changes:
            import_argv += ["--change", change]
        _run([*import_argv, str(tarball), _qualified(base)], "podman import")


def build_image(console: Console | None = None, tag: str | None = None) -> tuple[ContainerEngine, str]:
    """Build the Dockerfile as `tag` (default: the chart's image), return the engine that holds it and the tag."""
    console = console or Console(stderr=True)
    tag = tag or image_reference()
    engine = ContainerEngine.detect()
    build = [*engine.argv, "build", "--tag", tag, "--file", str(DOCKERFILE)]
    if engine.name == "podman":
        ensure_podman(console)
        with cache_lock():
            for base in base_images():
                if not engine.image_exists(_qualified(base)):
                    build_standin_base(engine, base, console)
        build += ["--pull=never", "--network", "host", *engine.rlimit_options()]
        if HOST_CA_BUNDLE.exists():
            build += ["--volume", f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro"]
    with timed_step(console, f"{engine.name} build {tag}"):
        _run([*build, str(REPO)], f"{engine.name} build")
    return engine, tag


def readable_copy(source: Path, target: Path) -> Path:
    """A copy the container's uid can read (the originals are root's, mode 0600), to mount into it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.parent.chmod(0o755)
    shutil.copyfile(source, target)
    target.chmod(0o644)
    return target


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
             entrypoint: str | None = None, args: list[str] | None = None) -> list[str]:
        """The run command; `volumes=False` leaves out the pod's emptyDirs, so that nothing is writable.
        `entrypoint` and `args` replace the chart's command and arguments."""
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
        argv += ["--entrypoint", entrypoint or self.container["command"][0], self.image]
        return argv + (self.container.get("args", []) if args is None else args)

    def remove(self) -> None:
        subprocess.run([*self.engine.argv, "rm", "--force", self.name], capture_output=True)
