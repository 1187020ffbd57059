"""Build the pinned control-plane binaries (and Prometheus) from Go modules, once, into a versioned cache.

No Docker engine, kind or envtest download exists here, but the Go module proxy does. Each tool is
built in a small wrapper module that requires the upstream module at the pinned version; for
Kubernetes the wrapper also repeats the staging `replace` directives of that tag's go.mod, since Go
ignores a dependency's replaces.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

KUBERNETES_VERSION = "v1.33.13"
# The etcd release Kubernetes 1.33 is tested with (its go.mod's etcd client version).
ETCD_VERSION = "v3.5.21"
HELM_VERSION = "v3.19.5"
# Prometheus 3.16.0, whose Go module version is v0.316.0: the server scrapes a controller in the tests, and
# promtool checks and unit-tests the chart's alerts.
PROMETHEUS_VERSION = "v0.316.0"

_STAGING_REPLACE = re.compile(r"^\s*(k8s\.io/[\w.-]+)\s+=>\s+\./staging/", re.MULTILINE)


class ToolBuildError(RuntimeError):
    """A Go build step failed; the message carries the command and the tail of its output."""


def cache_root() -> Path:
    """The tool cache, under the XDG cache directory (outside any checkout)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gpu-provisioner" / "tools"


@dataclass(frozen=True)
class GoTool:
    """One upstream Go module and the binaries built from it."""

    name: str
    module: str
    version: str
    # (binary name, Go main package) pairs
    builds: tuple[tuple[str, str], ...]
    ldflags: tuple[str, ...] = ()
    # What else shapes the binaries besides the version (such as the Kubernetes version helm assumes): part
    # of the cache key, so a build made without it is never taken for one made with it.
    variant: str = ""
    # Computes extra go.mod lines (replace directives) from the upstream go.mod text.
    go_mod_extras: Callable[[str], str] | None = field(default=None, compare=False)

    @property
    def directory(self) -> Path:
        suffix = f"-{self.variant}" if self.variant else ""
        return cache_root() / f"{self.name}-{self.version}{suffix}"

    @property
    def bin_dir(self) -> Path:
        return self.directory / "bin"

    @property
    def binaries(self) -> tuple[str, ...]:
        return tuple(binary for binary, _ in self.builds)

    def path(self, binary: str) -> Path:
        return self.bin_dir / binary

    def is_built(self) -> bool:
        return (self.directory / "complete").exists() and all(self.path(b).exists() for b in self.binaries)


def _kubernetes_replaces(upstream_go_mod: str) -> str:
    staging = _STAGING_REPLACE.findall(upstream_go_mod)
    if not staging:
        raise ToolBuildError("k8s.io/kubernetes go.mod lists no staging replaces: cannot build the wrapper")
    staging_version = "v0." + KUBERNETES_VERSION.removeprefix("v1.")
    lines = "\n".join(f"\t{module} => {module} {staging_version}" for module in staging)
    return f"replace (\n{lines}\n)\n"


def _kubernetes_major_minor() -> tuple[str, str]:
    major, minor, _ = KUBERNETES_VERSION.removeprefix("v").split(".")
    return major, minor


def _kubernetes_ldflags() -> tuple[str, ...]:
    major, minor = _kubernetes_major_minor()
    flags = []
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {package}.gitVersion={KUBERNETES_VERSION}",
            f"-X {package}.gitMajor={major}",
            f"-X {package}.gitMinor={minor}",
            f"-X {package}.gitTreeState=clean",
        ]
    return tuple(flags)


def _prometheus_release() -> str:
    """The release a Prometheus module version stands for: 3.N.P is tagged v0.3NN.P for Go modules."""
    _, minor, patch = PROMETHEUS_VERSION.removeprefix("v").split(".")
    return f"{minor[0]}.{int(minor[1:])}.{patch}"


KUBERNETES = GoTool(
    name="kubernetes",
    module="k8s.io/kubernetes",
    version=KUBERNETES_VERSION,
    builds=(
        ("kube-apiserver", "k8s.io/kubernetes/cmd/kube-apiserver"),
        ("kubectl", "k8s.io/kubernetes/cmd/kubectl"),
    ),
    ldflags=_kubernetes_ldflags(),
    go_mod_extras=_kubernetes_replaces,
)
ETCD = GoTool(
    name="etcd",
    module="go.etcd.io/etcd/server/v3",
    version=ETCD_VERSION,
    # etcd 3.5's server module root is the etcd main package.
    builds=(("etcd", "go.etcd.io/etcd/server/v3"),),
)
def _helm_ldflags() -> tuple[str, ...]:
    """Helm's release build sets the Kubernetes version it assumes without a cluster (`helm template`, `lint`);
    left out, helm assumes v1.20 and refuses charts that need a newer one. Ours is the control plane's."""
    major, minor = _kubernetes_major_minor()
    flags = [f"-X helm.sh/helm/v3/internal/version.version={HELM_VERSION}"]
    for package in ("helm.sh/helm/v3/pkg/chartutil", "helm.sh/helm/v3/pkg/lint/rules"):
        flags += [f"-X {package}.k8sVersionMajor={major}", f"-X {package}.k8sVersionMinor={minor}"]
    return tuple(flags)


HELM = GoTool(
    name="helm",
    module="helm.sh/helm/v3",
    version=HELM_VERSION,
    builds=(("helm", "helm.sh/helm/v3/cmd/helm"),),
    ldflags=_helm_ldflags(),
    variant=f"kube-{KUBERNETES_VERSION}",
)
PROMETHEUS = GoTool(
    name="prometheus",
    module="github.com/prometheus/prometheus",
    version=PROMETHEUS_VERSION,
    builds=tuple((binary, f"github.com/prometheus/prometheus/cmd/{binary}") for binary in ("promtool", "prometheus")),
    ldflags=(f"-X github.com/prometheus/common/version.Version={_prometheus_release()}",),
)
# What a control plane (tests, the sandbox, `devenv up`) needs; `devenv tools` (make tools) builds Prometheus too.
CONTROL_PLANE_TOOLS = (KUBERNETES, ETCD, HELM)
ALL_TOOLS = (*CONTROL_PLANE_TOOLS, PROMETHEUS)
# Only the tests use it (they score the rendered chart); built on first use.
KUBE_SCORE = GoTool(
    name="kube-score",
    module="github.com/zegl/kube-score",
    version="v1.20.0",
    builds=(("kube-score", "github.com/zegl/kube-score/cmd/kube-score"),),
)


@dataclass(frozen=True)
class Toolset:
    """Paths of the built binaries."""

    kube_apiserver: Path
    kubectl: Path
    etcd: Path
    helm: Path
    promtool: Path
    prometheus: Path


def toolset() -> Toolset:
    return Toolset(
        kube_apiserver=KUBERNETES.path("kube-apiserver"),
        kubectl=KUBERNETES.path("kubectl"),
        etcd=ETCD.path("etcd"),
        helm=HELM.path("helm"),
        promtool=PROMETHEUS.path("promtool"),
        prometheus=PROMETHEUS.path("prometheus"),
    )


class _GoBuild:
    """Runs the go commands of one tool build in its wrapper module."""

    def __init__(self, tool: GoTool, workdir: Path) -> None:
        self.tool = tool
        self.workdir = workdir
        self.env = {
            **os.environ,
            "GOTOOLCHAIN": "local",  # the machine's Go; never download another toolchain
            "CGO_ENABLED": "0",
            "GOFLAGS": "-mod=mod -buildvcs=false",
        }

    def go(self, *args: str) -> str:
        proc = subprocess.run(
            ["go", *args], cwd=self.workdir, env=self.env, capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
            raise ToolBuildError(f"`go {' '.join(args)}` failed in {self.workdir}:\n{tail}")
        return proc.stdout

    def write_wrapper_module(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "go.sum").unlink(missing_ok=True)
        extras = ""
        if self.tool.go_mod_extras is not None:
            info = json.loads(self.go("mod", "download", "-json", f"{self.tool.module}@{self.tool.version}"))
            extras = self.tool.go_mod_extras(Path(info["GoMod"]).read_text())
        (self.workdir / "go.mod").write_text(f"module gpuprovisioner.local/devtools/{self.tool.name}\n\n"
                                             f"go 1.24\n\n{extras}")

    def resolve(self) -> None:
        self.go("get", *(f"{package}@{self.tool.version}" for _, package in self.tool.builds))

    def compile(self, bin_dir: Path) -> None:
        staging = bin_dir.with_name("bin.partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        ldflags = " ".join(("-s", "-w", *self.tool.ldflags))
        for binary, package in self.tool.builds:
            self.go("build", "-trimpath", "-ldflags", ldflags, "-o", str(staging / binary), package)
        shutil.rmtree(bin_dir, ignore_errors=True)
        staging.rename(bin_dir)


@contextmanager
def cache_lock() -> Iterator[None]:
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def timed_step(console: Console, label: str) -> Iterator[None]:
    started = time.monotonic()
    with console.status(f"{label} ..."):
        yield
    console.print(f"  [green]done[/green] {label} in {time.monotonic() - started:.1f}s")


def ensure_tools(console: Console | None = None, tools: tuple[GoTool, ...] = CONTROL_PLANE_TOOLS) -> Toolset:
    """Build whatever pinned tool is missing from the cache, then return all paths.

    A lock file makes concurrent callers (a test run and a sandbox) wait for one build.
    """
    console = console or Console(stderr=True)
    if shutil.which("go") is None:
        raise ToolBuildError("the Go toolchain is needed to build kube-apiserver, etcd and helm: install Go")
    with cache_lock():
        for tool in tools:
            if tool.is_built():
                console.print(f"[dim]cached[/dim] {tool.name} {tool.version}: {tool.bin_dir}")
                continue
            console.print(f"[bold]building[/bold] {tool.name} {tool.version} (once; cached afterwards)")
            started = time.monotonic()
            build = _GoBuild(tool, tool.directory / "module")
            with timed_step(console, "write the wrapper module"):
                build.write_wrapper_module()
            with timed_step(console, f"resolve {tool.module}@{tool.version} and its dependencies"):
                build.resolve()
            with timed_step(console, f"compile {', '.join(tool.binaries)}"):
                build.compile(tool.bin_dir)
            (tool.directory / "complete").write_text(f"{tool.version}\n")
            console.print(
                f"  [green]built[/green] {tool.name} in {time.monotonic() - started:.1f}s: {tool.bin_dir}"
            )
    return toolset()


CHECKOV_VERSION = "3.3.30"


def ensure_checkov(console: Console | None = None) -> Path:
    """checkov (the tests run it on the rendered chart) in a virtualenv of its own in the cache: it pins
    `packaging<24`, which the project's own test tools cannot share."""
    console = console or Console(stderr=True)
    directory = cache_root() / f"checkov-{CHECKOV_VERSION}"
    binary = directory / "venv" / "bin" / "checkov"
    with cache_lock():
        if (directory / "complete").exists() and binary.exists():
            return binary
        shutil.rmtree(directory, ignore_errors=True)
        with timed_step(console, f"install checkov {CHECKOV_VERSION} from PyPI"):
            for command in ([sys.executable, "-m", "venv", str(directory / "venv")],
                            [str(directory / "venv" / "bin" / "pip"), "install", "--quiet",
                             f"checkov=={CHECKOV_VERSION}"]):
                proc = subprocess.run(command, capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    raise ToolBuildError(f"`{' '.join(command)}` failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        (directory / "complete").write_text(f"{CHECKOV_VERSION}\n")
    return binary
