"""Benchmark suite: a `gpu-provisioner run` process (configured by its environment only, as in production)
against a real API server and the AKS simulator with its default delays.

Scenarios:
  burst        N Kaito NodeClaims at once (default 200), until all are Ready, then all deleted.
  big-cluster  the same among 5,000 foreign Nodes made like real AKS nodes (images, conditions, addresses).
  restart      1,000 Ready claims among 5,000 foreign Nodes, the controller restarted: time to /readyz and the
               writes it makes (ARM, claims, Nodes, Events); then all deleted.
  floor        no controller: N claims (default 200) whose pools a stand-in PUTs on sight, writing nothing to
               Kubernetes; the simulator's timing with only its own writes and the client's, what this machine
               allows any controller. With --writes the stand-in also makes the writes the contract asks of any
               controller (finalizer, Node, Ready status), as soon as it can: what this machine allows Ready.

Each prints its figures and writes them to .artifacts/bench/<scenario>.json (or $BENCH_RESULTS/); `table`
prints the README's table from those files. Times per claim are measured by a watch (not by polling lists),
the simulator's part from its own timeline: when each step was due under the scenario and when it happened.
Run: `make bench` (all four), `make bench ARGS="burst --claims 1000"`, `make bench ARGS=table`.
"""

from __future__ import annotations

import compileall
import functools
import json
import math
import multiprocessing
import os
import queue
import re
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Protocol

import kubernetes
import typer

from gpu_provisioner.api.claims import (
    CLAIM_APIS,
    GROUP,
    INITIALIZED_LABEL,
    READY,
    REGISTERED_LABEL,
    TERMINATION_FINALIZER,
    Claim,
    StatusWriter,
    rfc3339,
)
from gpu_provisioner.cloud.agentpools import AgentPools
from gpu_provisioner.cloud.pool_request import MACHINE_TYPE_LABEL, build_pool_request
from gpu_provisioner.devenv.controlplane import (
    ControlPlane,
    die_with_parent,
    free_port,
    process_cpu_s,
    process_peak_rss_mib,
)
from gpu_provisioner.devenv.tools import ensure_tools
from gpu_provisioner.lifecycle.nodes import pool_of_node
from gpu_provisioner.runtime import rest
from gpu_provisioner.runtime.kube import claim_path
from gpu_provisioner.runtime.rest import MERGE_PATCH, STRATEGIC_MERGE_PATCH
from gpu_provisioner.sandbox import kaito_claim
from gpu_provisioner.settings import Settings
from gpu_provisioner.sim import AksSimulator, Scenario, timeline

RESULTS = Path(__file__).resolve().parents[1] / ".artifacts" / "bench"  # or $BENCH_RESULTS
CHART = Path(__file__).resolve().parents[1] / "charts" / "gpu-provisioner"
CLAIM_API = CLAIM_APIS["nodeclaim"]
ARM_OPERATIONS_NOT_COUNTED = ("token", "openid-configuration")
PARALLEL_WRITES = 8  # client threads creating or deleting objects at once
# The floor's stand-in writes as many at once as the API server takes (its seats queue the rest), so that no claim
# waits for a writer.
FLOOR_WRITERS = 64
app = typer.Typer(add_completion=False, no_args_is_help=True)


# figures -------------------------------------------------------------------------------------


def distribution(values: Iterable[float]) -> dict[str, float] | None:
    """p50/p95/p99/max (nearest rank) in seconds, or None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = lambda p: round(ordered[max(math.ceil(p * len(ordered)) - 1, 0)], 3)  # noqa: E731
    return {"n": len(ordered), "p50": rank(0.50), "p95": rank(0.95), "p99": rank(0.99), "max": rank(1.0)}


def shown(figure: dict[str, float] | None) -> str:
    """p50 / p95 / p99 / max."""
    if figure is None:
        return "-"
    return " / ".join(f"{figure[k]:.2f}" for k in ("p50", "p95", "p99", "max")) + " s"


def machine_cpu_s() -> tuple[float, float]:
    """This machine's CPU time so far, over all its cores: (busy, all) seconds, from /proc/stat."""
    user, nice, system, idle, iowait, irq, softirq, steal = (
        int(n) for n in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
    ticks = os.sysconf("SC_CLK_TCK")
    busy = user + nice + system + irq + softirq + steal  # guest time is counted in user's
    return busy / ticks, (busy + idle + iowait) / ticks


@dataclass(frozen=True)
class Moment:
    """A point of a run: the monotonic clock and the machine's CPU time then."""

    at: float
    cpu_s: tuple[float, float]

    @classmethod
    def now(cls) -> Moment:
        return cls(time.monotonic(), machine_cpu_s())

    def busy_cores_since(self) -> float:
        """How many of the machine's cores were busy from this moment to now, on average: the load of a wave too
        short for the 1-minute load average to show."""
        busy, all_s = machine_cpu_s()
        return round((busy - self.cpu_s[0]) / max(all_s - self.cpu_s[1], 1e-9) * (os.cpu_count() or 1), 2)


class LoadSampler:
    """The machine's 1-minute load average and its busy cores, every second while a scenario runs, and the CPU its
    parts used."""

    def __init__(self, plane: ControlPlane) -> None:
        self.samples: list[float] = []
        self.busy_cores: list[float] = []  # each second's
        self._plane = plane
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LoadSampler:
        self._cpu_at_start = _own_cpu_s()
        self._plane_cpu_at_start = self._plane.cpu_s()
        self._api_server_requests_at_start = self._api_server_requests()
        self._api_server_log_at_start = self._api_server_log.stat().st_size
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        second = Moment.now()
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(1):
                return
            self.busy_cores.append(second.busy_cores_since())
            second = Moment.now()

    def figures(self) -> dict[str, Any]:
        plane = {f"{name}_cpu_s": round(used - self._plane_cpu_at_start.get(name, 0.0), 2)
                 for name, used in self._plane.cpu_s().items()}
        # With GOGC at 400 (the control plane's), memory is what they trade for CPU.
        plane.update({f"{name}_peak_rss_mib": rss for name, rss in self._plane.peak_rss_mib().items()})
        requests = self._api_server_requests() - self._api_server_requests_at_start
        plane["kube-apiserver_requests"] = requests
        # What a request costs it on average, its watch events to every watcher included.
        plane["kube-apiserver_cpu_ms_a_request"] = round(plane["kube-apiserver_cpu_s"] * 1000 / max(requests, 1), 2)
        return {"cpus": os.cpu_count(), "simulator_process_cpu_s": round(_own_cpu_s() - self._cpu_at_start, 2), **plane,
                "busy_cores_mean": round(statistics.fmean(self.busy_cores or [0.0]), 2),
                "busy_cores_max": max(self.busy_cores or [0.0]),
                "load_1m_mean": round(statistics.fmean(self.samples), 2),
                "load_1m_max": round(max(self.samples), 2), "load_at_end": [round(x, 2) for x in os.getloadavg()],
                **self._api_server_strain()}

    def _api_server_requests(self) -> int:
        """Requests the API server has answered so far (its apiserver_request_total)."""
        with self._plane.api_client() as client:
            text = rest.send(client, "GET", "/metrics", accept="text/plain").read().decode()
        return round(sum(float(n) for n in re.findall(r"^apiserver_request_total\{[^}]*\} (\S+)$", text, re.MULTILINE)))

    @property
    def _api_server_log(self) -> Path:
        return self._plane.log_dir / "kube-apiserver.log"

    def _api_server_strain(self) -> dict[str, Any]:
        """What the API server's log (-v=1) says of its watches during the run: the most events a resource's watch
        cache held, not yet sent on (it holds 100 at most, then its writers wait), and the watches it closed for
        not taking their events in time (each of them watches again)."""
        with open(self._api_server_log, "rb") as log:
            log.seek(self._api_server_log_at_start)
            text = log.read().decode(errors="replace")
        backlog: dict[str, int] = {}
        for watched, queued in re.findall(r"cacher \(([^)]+)\): (\d+) objects queued in incoming channel", text):
            backlog[watched] = max(backlog.get(watched, 0), int(queued))
        closed = Counter(re.findall(r"Forcing (\S+) watcher close due to unresponsiveness", text))
        return {"kube-apiserver_watch_backlog_max": backlog, "kube-apiserver_watches_closed": dict(closed)}


def _own_cpu_s() -> float:
    """CPU seconds of this process: the simulator (ARM server, kubelet stand-in) and the client's writes."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


# the controller ------------------------------------------------------------------------------


@functools.cache  # once a run of the suite
def compile_as_the_image_does() -> None:
    """The image ships bytecode without docstrings and runs with PYTHONOPTIMIZE=2 (see the Dockerfile); without
    that bytecode here, every start would compile from source, and memory would be measured for another process.
    The standard library too, where this user may write to it (else its modules compile at each start)."""
    package = Path(__file__).resolve().parent.parent / "gpu_provisioner"
    for directory in (sysconfig.get_paths()["purelib"], str(package)):
        compileall.compile_dir(directory, quiet=1, optimize=2, workers=0)
    compileall.compile_dir(sysconfig.get_paths()["stdlib"], quiet=2, optimize=2, workers=0,
                           rx=re.compile(r"/(test|tests|lib2to3|idlelib)/"))


class Controller:
    """`gpu-provisioner run` in its own process, configured only by its environment, as the image runs it."""

    def __init__(self, kubeconfig: Path, sim: AksSimulator, workdir: Path, name: str) -> None:
        self.health_port, self.metrics_port = free_port(), free_port()
        # The caller's Azure identity and endpoint are not the simulator's; the simulator's scenario is its own.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ARM_ENDPOINT", "AZURE_", "AKS_SIM_"))}
        env.update(sim.azure_environment(), KUBECONFIG=str(kubeconfig), CLAIM_APIS=CLAIM_API.name,
                   PYTHONOPTIMIZE="2",
                   POOL_REFRESH_INTERVAL_SECONDS=os.environ.get("POOL_REFRESH_INTERVAL_SECONDS", "10"),
                   METRICS_PORT=str(self.metrics_port),
                   HEALTH_PROBE_PORT=str(self.health_port), LOG_LEVEL="warning")
        self.log_path = workdir / f"{name}.log"
        self.started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "gpu_provisioner", "run"], env=env, stdout=log,
                                            stderr=subprocess.STDOUT, preexec_fn=die_with_parent)

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise SystemExit(f"the controller exited with code {self.process.returncode}; log: {self.log_path}")

    def seconds_to_ready(self, timeout_s: float = 120) -> float:
        while time.monotonic() - self.started < timeout_s:
            self.check_alive()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/readyz", timeout=1) as answer:
                    if answer.status == 200:
                        return time.monotonic() - self.started
            except OSError:
                pass
            time.sleep(0.05)
        raise SystemExit(f"the controller was not ready after {timeout_s:.0f}s; log: {self.log_path}")

    def wait_idle(self, timeout_s: float = 120) -> float:
        """Until no key waits in the controller's queue and no worker holds one, twice in a row (its metrics); the
        seconds that took. Writes nobody waits for come in passes after the claims are Ready."""
        started = time.monotonic()
        idle_reads = 0
        while idle_reads < 2:
            self.check_alive()
            if time.monotonic() - started > timeout_s:
                raise SystemExit(f"the controller was still busy after {timeout_s:.0f}s; log: {self.log_path}")
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as answer:
                text = answer.read().decode()
            busy = re.findall(r"^gpu_provisioner_workqueue_(?:depth|unfinished_work_seconds)\{[^}]*\} (\S+)$", text,
                              re.MULTILINE)
            idle_reads = idle_reads + 1 if busy and not any(float(value) for value in busy) else 0
            time.sleep(0.2)
        return time.monotonic() - started

    def figures(self) -> dict[str, float]:
        """Peak resident MiB and CPU seconds so far, from /proc."""
        return {"peak_rss_mib": process_peak_rss_mib(self.process.pid),
                "cpu_s": round(process_cpu_s(self.process.pid), 2)}

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


class Launcher:
    """`floor`'s stand-in for a controller, in a process of its own: it PUTs each claim's pool when it sees the claim
    created, through this project's ARM door (the SDK's pipeline, as the controller sends it). Without `writes` it
    writes nothing to Kubernetes; with them, the least the contract asks of any controller, each as soon as it can:
    the claim's finalizer before its PUT, and once its Node is Ready with its GPUs, one Node write (the registered
    and initialized labels, the finalizer, the owner) and one status write (every condition True). It reads and
    writes as the controller's ServiceAccount."""

    def __init__(self, kubeconfig: Path, sim: AksSimulator, workdir: Path, writes: bool) -> None:
        self.log_path = workdir / "launcher.log"
        context = multiprocessing.get_context("spawn")
        opened: multiprocessing.Queue[tuple[str, str, float]] = context.Queue()
        self.process = context.Process(
            target=launch_on_sight, daemon=True,
            args=(sim.azure_environment(), str(kubeconfig), str(self.log_path), opened, writes))
        self.process.start()
        for _ in range(2 if writes else 1):
            opened.get(timeout=120)

    def check_alive(self) -> None:
        if not self.process.is_alive():
            raise SystemExit(f"the launcher exited with code {self.process.exitcode}; log: {self.log_path}")

    def stop(self) -> None:
        self.process.terminate()


def launch_on_sight(environment: dict[str, str], kubeconfig: str, log_path: str,
                    opened: multiprocessing.Queue[tuple[str, str, float]], writes: bool) -> None:
    """The Launcher's process: sends ("open", "", time) once each of its watches is open, then PUTs each new claim's
    pool (the first size it lists) and, with `writes`, makes the contract's writes; FLOOR_WRITERS at once, for ever."""
    sys.stderr = open(log_path, "a", buffering=1)  # noqa: SIM115 - the process's own, until it ends
    os.environ.update(environment)
    pools = AgentPools(Settings.load())
    kube = kubernetes.config.new_client_from_config(config_file=kubeconfig)
    kube.user_agent = "gpu-provisioner/floor"  # its writes are counted as the controller's would be
    claims: dict[str, dict[str, Any]] = {}
    nodes: dict[str, dict[str, Any]] = {}
    seen: queue.SimpleQueue[tuple[str, str, float]] = queue.SimpleQueue()

    def created(event_type: str, claim: dict[str, Any]) -> str | None:
        if event_type != "ADDED":
            return None
        claims[claim["metadata"]["name"]] = claim  # before its name is queued
        return "created"

    def gpus_up(event_type: str, node: dict[str, Any]) -> str | None:
        if gpu_ready(event_type, node) is None or pool_of_node(node) in nodes:
            return None
        nodes[pool_of_node(node)] = node
        return "gpu"

    def launch(name: str) -> None:
        claim = Claim(CLAIM_API, claims[name])
        if writes:
            rest.call(kube, "PATCH", claim_path(CLAIM_API, name), content_type=MERGE_PATCH, body={"metadata": {
                "finalizers": [TERMINATION_FINALIZER], "resourceVersion": claim.metadata["resourceVersion"]}})
        request = build_pool_request(claim, created_at=rfc3339(claim.created or datetime.now(UTC)))
        pools.create(name, request.body(request.vm_sizes[0]))

    def make_ready(name: str) -> None:
        claim, node = Claim(CLAIM_API, claims[name]), nodes[name]
        owner = {"apiVersion": CLAIM_API.api_version, "kind": CLAIM_API.kind, "name": name, "uid": claim.uid}
        rest.call(kube, "PATCH", f"/api/v1/nodes/{node['metadata']['name']}", content_type=STRATEGIC_MERGE_PATCH,
                  body={"metadata": {"labels": {REGISTERED_LABEL: "true", INITIALIZED_LABEL: "true"},
                                     "finalizers": [TERMINATION_FINALIZER], "ownerReferences": [owner]}})
        status = StatusWriter(claim, datetime.now(UTC))
        for phase in CLAIM_API.phases:
            status.set(phase, "True", phase)
        status.status.update(providerID=node["spec"]["providerID"], nodeName=node["metadata"]["name"],
                             capacity=node["status"]["capacity"], allocatable=node["status"]["allocatable"])
        rest.call(kube, "PATCH", f"{claim_path(CLAIM_API, name)}/status", body={"status": status.render()},
                  content_type=MERGE_PATCH)

    def attempt(action: Callable[[str], None], name: str) -> None:
        try:
            action(name)
        except Exception as error:  # the run then times out waiting for this claim, and this says why
            print(f"{action.__name__} of {name} failed: {error!r}", file=sys.stderr)

    threading.Thread(target=follow_claims, args=(kubeconfig, created, seen), daemon=True).start()
    if writes:
        threading.Thread(target=follow_gpu_nodes, args=(kubeconfig, gpus_up, seen), daemon=True).start()
    with ThreadPoolExecutor(FLOOR_WRITERS) as writers:
        while True:
            what, name, _ = seen.get()
            if what == "open":
                opened.put((what, name, time.monotonic()))
            else:
                writers.submit(attempt, launch if what == "created" else make_ready, name)


# watching claims -----------------------------------------------------------------------------


class Watcher:
    """When each claim was first seen Ready and when it was gone, and when each claim's Node was first seen
    GPU-ready, from watches (a process each, so that neither the other nor the simulator's threads in this one
    delay what it sees). The Node watch sees the Node events when the controller's does: the API server sends them
    to both at once (measured within 0.01 s at p99)."""

    def __init__(self, plane: ControlPlane) -> None:
        self.ready_at: dict[str, float] = {}
        self.gone_at: dict[str, float] = {}
        self.gpu_seen_at: dict[str, float] = {}
        self._changed = threading.Condition()
        context = multiprocessing.get_context("spawn")
        self._events: multiprocessing.Queue[tuple[str, str, float]] = context.Queue()
        self._processes = [context.Process(target=target, args=(str(plane.kubeconfig), self._events), daemon=True)
                           for target in (watch_claims, watch_gpu_nodes)]
        for process in self._processes:
            process.start()
        for _ in self._processes:
            self._events.get(timeout=120)  # the watch is open
        threading.Thread(target=self._receive, daemon=True).start()

    def stop(self) -> None:
        for process in self._processes:
            process.terminate()

    def wait(self, what: str, done: Callable[[], bool], timeout_s: float, controller: Controller | Launcher) -> None:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not done():
                controller.check_alive()
                if time.monotonic() > deadline:
                    raise SystemExit(f"timed out after {timeout_s:.0f}s waiting for {what}; log: {controller.log_path}")
                self._changed.wait(1)

    def _receive(self) -> None:
        seen_at = {"ready": self.ready_at, "gone": self.gone_at, "gpu": self.gpu_seen_at}
        while True:
            change, name, seen = self._events.get()
            with self._changed:
                seen_at[change].setdefault(name, seen)
                self._changed.notify_all()


def watch_claims(kubeconfig: str, events: multiprocessing.Queue[tuple[str, str, float]]) -> None:
    """In its own process: sends ("ready" | "gone", claim name, time.monotonic() when seen) for each claim."""

    def change(event_type: str, claim: dict[str, Any]) -> str | None:
        if event_type == "DELETED":
            return "gone"
        conditions = (claim.get("status") or {}).get("conditions") or []
        return "ready" if any(c["type"] == READY and c["status"] == "True" for c in conditions) else None

    follow_claims(kubeconfig, change, events)


def follow_claims(kubeconfig: str, change: Callable[[str, dict[str, Any]], str | None], events: Sink) -> None:
    """`follow` the claims, by name."""
    custom = kubernetes.client.CustomObjectsApi(kubernetes.config.new_client_from_config(config_file=kubeconfig))
    follow(functools.partial(custom.list_cluster_custom_object, GROUP, CLAIM_API.version, CLAIM_API.plural),
           lambda claim: claim["metadata"]["name"], change, events)


def watch_gpu_nodes(kubeconfig: str, events: multiprocessing.Queue[tuple[str, str, float]]) -> None:
    """In its own process: sends ("gpu", agent pool (= claim) name, time.monotonic() when seen) for each Node of a
    claim's pool that is Ready with its GPUs allocatable."""
    follow_gpu_nodes(kubeconfig, gpu_ready, events)


def gpu_ready(event_type: str, node: dict[str, Any]) -> str | None:
    """A Node event's change: "gpu" if it shows the Node Ready with its GPUs allocatable."""
    status = node.get("status") or {}
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions") or [])
    gpus = (status.get("allocatable") or {}).get("nvidia.com/gpu", "0")
    return "gpu" if event_type != "DELETED" and ready and gpus != "0" else None


def follow_gpu_nodes(kubeconfig: str, change: Callable[[str, dict[str, Any]], str | None], events: Sink) -> None:
    """`follow` the Nodes of claims' pools, by pool."""
    core = kubernetes.client.CoreV1Api(kubernetes.config.new_client_from_config(config_file=kubeconfig))
    follow(functools.partial(core.list_node, label_selector=MACHINE_TYPE_LABEL), pool_of_node, change, events)


class Sink(Protocol):
    def put(self, item: tuple[str, str, float]) -> None: ...


def follow(list_objects: Callable[..., Any], name_of: Callable[[dict[str, Any]], str],
           change: Callable[[str, dict[str, Any]], str | None], events: Sink) -> None:
    """List, say the watch is open, then watch for ever: (change, name, time.monotonic() when seen) for each event
    that `change` names, the objects as the API server's JSON."""
    resource_version = json.loads(list_objects(_preload_content=False).data)["metadata"]["resourceVersion"]
    events.put(("open", "", time.monotonic()))
    while True:
        try:
            for event in kubernetes.watch.Watch(return_type="object").stream(
                    list_objects, resource_version=resource_version, timeout_seconds=30):
                seen = time.monotonic()
                obj = event["object"]
                resource_version = obj["metadata"]["resourceVersion"]
                if (what := change(event["type"], obj)) is not None:
                    events.put((what, name_of(obj), seen))
        except Exception as error:  # the next watch resumes from the last resourceVersion seen
            print(f"watch ended: {error!r}; watching again", file=sys.stderr)


# the API server's record of the writes ----------------------------------------------------------

# The controller's ServiceAccount: the chart's, installed by install_identities as release gpu-provisioner.
CONTROLLER_NAMESPACE = CONTROLLER_ACCOUNT = "gpu-provisioner"
CONTROLLER_USER = f"system:serviceaccount:{CONTROLLER_NAMESPACE}:{CONTROLLER_ACCOUNT}"
# The writes to Nodes and claims, with when the API server received and answered each (its audit log): what part of
# a claim's way to Ready the controller's writes spent in the API server, and when each claim came to exist (its
# create answered) and was deleted (its DELETE answered). And every request of the controller's but its watches:
# what its claims cost the API server.
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived", "ResponseStarted", "Panic"],
    "rules": [
        {"level": "Metadata", "verbs": ["patch"], "resources": [
            {"group": "", "resources": ["nodes", "nodes/status"]},
            {"group": GROUP, "resources": [CLAIM_API.plural, f"{CLAIM_API.plural}/status"]}]},
        {"level": "Metadata", "verbs": ["create", "delete"], "resources": [
            {"group": GROUP, "resources": [CLAIM_API.plural]}]},
        {"level": "Metadata", "users": [CONTROLLER_USER],
         "verbs": ["get", "list", "create", "update", "patch", "delete"]},
        {"level": "None"},
    ],
}
# The control plane shares this machine's two cores with all it serves, unlike an AKS cluster's. Its garbage collected
# at 400 % heap growth, the API server spent 13-21 % less CPU a request (200-claim burst: 2.2-2.3 ms instead of 2.7,
# three interleaved runs each; restart, one run each: 2.5 instead of 2.8) for a peak of 2.8 GiB instead of 1.3 in
# the restart scenario: memory is plentiful here, cores are not.
API_SERVER_GOGC = 400
READS = ("get", "list")
# A write the controller made after its Node watch got an event may be logged as received a little before this
# benchmark's own Node watch got the same event.
SAME_EVENT_S = 0.05
_NODE_OF_POOL = re.compile(r"^aks-(?P<pool>[a-z0-9]+)-\d{8}-vmss")


@dataclass(frozen=True)
class Write:
    """A write as the API server's audit log has it; its times on this machine's monotonic clock."""

    verb: str
    resource: str
    name: str
    subresource: str
    user_agent: str
    received: float
    answered: float

    @property
    def claim(self) -> str:
        """The claim it is for: the claim itself, or the Node of the claim's agent pool."""
        node = _NODE_OF_POOL.match(self.name) if self.resource == "nodes" else None
        return node["pool"] if node else self.name


def audit_events(log: Path) -> list[dict[str, Any]]:
    """The API server's audit events so far, one a line; a line it is still writing is waited for (a second at
    most), not read in half."""
    text = log.read_text()
    for _ in range(10):
        if text.endswith("\n") or not text:
            break
        time.sleep(0.1)
        text = log.read_text()
    return [json.loads(line) for line in text.splitlines()]


def wait_for_audit_lines(log: Path, quiet_s: float = 0.3, most_s: float = 2.0) -> None:
    """Until the audit log has not grown for `quiet_s` (`most_s` at most). The API server writes a request's line
    once it has answered: a claim released by a PATCH is seen gone by the watch before that PATCH's line is there."""
    deadline = time.monotonic() + most_s
    size = log.stat().st_size
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        if (grown := log.stat().st_size) == size:
            return
        size = grown


def audited_writes(log: Path) -> list[Write]:
    wall_to_monotonic = time.time() - time.monotonic()
    at = lambda stamp: datetime.fromisoformat(stamp).timestamp() - wall_to_monotonic  # noqa: E731
    writes = []
    for event in audit_events(log):
        if event.get("verb") in READS:
            continue
        target = event.get("objectRef") or {}
        writes.append(Write(event.get("verb", ""), target.get("resource", ""), target.get("name", ""),
                            target.get("subresource", ""), event.get("userAgent", ""),
                            at(event["requestReceivedTimestamp"]), at(event["stageTimestamp"])))
    return writes


def requests_of(log: Path, user: str) -> dict[str, int]:
    """How many requests `user` made (its watches aside), by verb and resource, such as "patch nodeclaims/status"."""
    counted: Counter[str] = Counter()
    for event in audit_events(log):
        if (event.get("user") or {}).get("username") == user:
            target = event.get("objectRef") or {}
            subresource = f"/{target['subresource']}" if target.get("subresource") else ""
            counted[f"{event['verb']} {target.get('resource', '')}{subresource}"] += 1
    return dict(sorted(counted.items()))


def answered(writes: Iterable[Write], verb: str) -> dict[str, float]:
    """Claim name -> when the API server answered the claim's first `verb` (create: the claim exists from then on;
    delete: it has its deletionTimestamp)."""
    first: dict[str, float] = {}
    for write in writes:
        if write.verb == verb and write.resource == CLAIM_API.plural and not write.subresource:
            first[write.name] = min(first.get(write.name, write.answered), write.answered)
    return first


def split_controller_part(names: list[str], node_event_at: dict[str, float], ready_at: dict[str, float],
                          writes: Iterable[Write]) -> dict[str, dict[str, float] | None]:
    """Node event -> claim Ready seen, in three: the controller's own time (its queue, its work, between its
    writes; and of it, the part until its first write), its writes in the API server (received -> answered), and
    the claim's Ready passed on by the API server (its Ready write answered -> the Ready seen by this benchmark's
    watch). Only claims with a controller write after this benchmark's Node watch saw the event are counted."""
    by_claim: dict[str, list[Write]] = {}
    for write in writes:
        if write.verb == "patch" and write.user_agent.startswith("gpu-provisioner/"):
            by_claim.setdefault(write.claim, []).append(write)
    own, first, in_api_server, passed_on = [], [], [], []
    for name in names:
        event_at = node_event_at[name]
        window = [w for w in by_claim.get(name, ()) if event_at - SAME_EVENT_S <= w.received <= ready_at[name]]
        status_writes = [w for w in window if w.resource == CLAIM_API.plural and w.subresource == "status"]
        if not status_writes:
            continue  # Ready before this benchmark saw its Node's event
        ready_write = max(status_writes, key=lambda w: w.received)
        made = [w for w in window if w.received <= ready_write.received]
        spent = sum(w.answered - w.received for w in made)
        own.append(ready_write.answered - event_at - spent)
        first.append(min(w.received for w in made) - event_at)
        in_api_server.append(spent)
        passed_on.append(ready_at[name] - ready_write.answered)
    return {"controller_own_s": distribution(own), "controller_own_until_first_write_s": distribution(first),
            "controller_writes_in_api_server_s": distribution(in_api_server),
            "ready_write_to_claim_ready_s": distribution(passed_on)}


# who is who in the cluster -------------------------------------------------------------------

# The API server's seats (read-only, mutating requests run at once). Its defaults (400, 200) are sized for control
# planes of many cores: on this machine's two shared cores they let ~180 simulated kubelet writes run at once, every
# one slowing the others, so priority and fairness never queues one and the kubelets' wave holds the controller's
# writes back as no production API server would. 60 seats still keep both cores busy (a request costs it ~4 ms of
# CPU); BENCH_API_SERVER_SEATS=default runs with its defaults instead.
API_SERVER_SEATS = (40, 20)
KUBELET_USER = "system:node:aks-simulator"
KAITO_NAMESPACE = KAITO_ACCOUNT = "kaito-workspace"


def api_server_seats() -> tuple[int, int] | None:
    return None if os.environ.get("BENCH_API_SERVER_SEATS") == "default" else API_SERVER_SEATS


@dataclass(frozen=True)
class Identities:
    """Kubeconfigs of who writes, each authenticated as in an AKS cluster, so that RBAC and priority and fairness
    treat its requests as there: the controller as its ServiceAccount, with the chart's RBAC and FlowSchemas
    (workload-high); the simulated kubelets as a node (system:nodes: the `system` priority level); Kaito's stand-in,
    which creates and deletes the claims, as a ServiceAccount of its own (workload-low). This benchmark's watches and
    metrics reads stay the admin's (system:masters, exempt from priority and fairness): they measure."""

    controller: Path
    kubelet: Path
    kaito: Path


def install_identities(plane: ControlPlane, directory: Path) -> Identities:
    """Installs the chart (its ServiceAccount, RBAC and FlowSchemas; no replica), and RBAC for the kubelets and
    Kaito's stand-in (what the simulator and this benchmark call)."""
    subprocess.run([str(plane.tools.helm), "install", CONTROLLER_ACCOUNT, str(CHART), "--kubeconfig",
                    str(plane.kubeconfig), "--namespace", CONTROLLER_NAMESPACE, "--create-namespace", "--skip-crds",
                    "--set", "replicas=0", "--set", "leaderElection.enabled=false"],
                   check=True, capture_output=True, timeout=120)
    may = {"kubelet": ({"kind": "Group", "name": "system:nodes", "apiGroup": "rbac.authorization.k8s.io"}, [
               {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "create", "patch", "delete"]},
               {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch"]}]),
           "kaito": ({"kind": "ServiceAccount", "name": KAITO_ACCOUNT, "namespace": KAITO_NAMESPACE}, [
               {"apiGroups": [GROUP], "resources": [CLAIM_API.plural], "verbs": ["create", "delete"]}])}
    with plane.api_client() as client:
        core, rbac = kubernetes.client.CoreV1Api(client), kubernetes.client.RbacAuthorizationV1Api(client)
        core.create_namespace({"metadata": {"name": KAITO_NAMESPACE}})
        core.create_namespaced_service_account(KAITO_NAMESPACE, {"metadata": {"name": KAITO_ACCOUNT}})
        for who, (subject, rules) in may.items():
            name = f"bench-{who}"
            rbac.create_cluster_role({"metadata": {"name": name}, "rules": rules})
            rbac.create_cluster_role_binding({
                "metadata": {"name": name}, "subjects": [subject],
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name}})
    return Identities(
        controller=plane.service_account_kubeconfig(directory / "controller.kubeconfig", CONTROLLER_NAMESPACE,
                                                    CONTROLLER_ACCOUNT),
        kubelet=plane.kubeconfig_as(directory / "kubelet.kubeconfig", KUBELET_USER, ["system:nodes"]),
        kaito=plane.service_account_kubeconfig(directory / "kaito.kubeconfig", KAITO_NAMESPACE, KAITO_ACCOUNT))


def client_of(kubeconfig: Path) -> kubernetes.client.ApiClient:
    return kubernetes.config.new_client_from_config(config_file=str(kubeconfig))


# the cluster ---------------------------------------------------------------------------------


def foreign_node(index: int) -> dict[str, Any]:
    """An ordinary (CPU) AKS node, with about what a real one carries: labels, annotations, addresses,
    4 conditions, 25 images, capacity, nodeInfo."""
    pool = f"nodepool{index // 100 + 1}"
    vmss = f"aks-{pool}-{31415926 + index // 100}-vmss"
    name = f"{vmss}{index % 100:06x}"
    node_rg = "mc_kaito-rg_kaito-cluster_eastus"
    labels = {
        "agentpool": pool, "kubernetes.azure.com/agentpool": pool, "kubernetes.azure.com/cluster": node_rg,
        "kubernetes.azure.com/mode": "system" if index < 100 else "user", "kubernetes.azure.com/role": "agent",
        "kubernetes.azure.com/os-sku": "Ubuntu", "kubernetes.azure.com/node-image-version":
            "AKSUbuntu-2204gen2containerd-202611.10.0", "kubernetes.azure.com/nodepool-type": "VirtualMachineScaleSets",
        "kubernetes.azure.com/kubelet-identity-client-id": "5a3c4f1e-0000-4000-8000-00000000c1d0",
        "kubernetes.azure.com/consolidated-additional-properties": "c2d8f1a0-0000-4000-8000-000000000001",
        "kubernetes.azure.com/network-policy": "none", "kubernetes.azure.com/storageprofile": "managed",
        "kubernetes.azure.com/storagetier": "Premium_LRS", "storageprofile": "managed", "storagetier": "Premium_LRS",
        "beta.kubernetes.io/arch": "amd64", "beta.kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
        "kubernetes.io/os": "linux", "kubernetes.io/role": "agent", "node-role.kubernetes.io/agent": "",
        "kubernetes.io/hostname": name, "node.kubernetes.io/instance-type": "Standard_D8s_v5",
        "beta.kubernetes.io/instance-type": "Standard_D8s_v5", "topology.kubernetes.io/region": "eastus",
        "topology.kubernetes.io/zone": f"eastus-{index % 3 + 1}", "failure-domain.beta.kubernetes.io/region": "eastus",
        "failure-domain.beta.kubernetes.io/zone": f"eastus-{index % 3 + 1}",
        "topology.disk.csi.azure.com/zone": f"eastus-{index % 3 + 1}",
    }
    annotations = {
        "node.alpha.kubernetes.io/ttl": "0", "volumes.kubernetes.io/controller-managed-attach-detach": "true",
        "csi.volume.kubernetes.io/nodeid": json.dumps({"disk.csi.azure.com": name, "file.csi.azure.com": name}),
    }
    images = [{"names": [f"mcr.microsoft.com/oss/kubernetes/component-{n}@sha256:{(index * 31 + n):064x}",
                         f"mcr.microsoft.com/oss/kubernetes/component-{n}:v1.{n}.{index % 7}"],
               "sizeBytes": 20_000_000 + n * 1_048_576} for n in range(25)]
    heartbeat = "2026-11-26T06:00:00Z"
    conditions = [{"type": t, "status": "False", "reason": f"KubeletHasNo{t}", "message": f"kubelet has no {t}",
                   "lastHeartbeatTime": heartbeat, "lastTransitionTime": heartbeat}
                  for t in ("MemoryPressure", "DiskPressure", "PIDPressure")]
    conditions.append({"type": "Ready", "status": "True", "reason": "KubeletReady",
                       "message": "kubelet is posting ready status", "lastHeartbeatTime": heartbeat,
                       "lastTransitionTime": heartbeat})
    capacity = {"cpu": "8", "memory": "32863040Ki", "pods": "110", "ephemeral-storage": "129886128Ki",
                "hugepages-1Gi": "0", "hugepages-2Mi": "0"}
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
        "spec": {"providerID": f"azure:///subscriptions/00000000-0000-4000-8000-000000000000/resourceGroups/"
                               f"{node_rg}/providers/Microsoft.Compute/virtualMachineScaleSets/{vmss}/"
                               f"virtualMachines/{index % 100}", "podCIDR": f"10.{index // 250}.{index % 250}.0/24"},
        "status": {
            "capacity": capacity, "allocatable": {**capacity, "cpu": "7820m", "memory": "28434496Ki"},
            "conditions": conditions, "images": images,
            "addresses": [{"type": "InternalIP", "address": f"10.224.{index // 250}.{index % 250 + 4}"},
                          {"type": "Hostname", "address": name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {"kubeletVersion": "v1.33.5", "osImage": "Ubuntu 22.04.5 LTS", "architecture": "amd64",
                         "operatingSystem": "linux", "containerRuntimeVersion": "containerd://1.7.27-1",
                         "kernelVersion": "5.15.0-1089-azure", "kubeProxyVersion": "v1.33.5",
                         "machineID": f"{index:032x}", "systemUUID": f"{index:08x}-0000-4000-8000-000000000000",
                         "bootID": f"{index:08x}-0000-4000-8000-00000000b007"},
        },
    }


def in_parallel(action: Callable[[Any], object], items: Iterable[Any]) -> None:
    with ThreadPoolExecutor(PARALLEL_WRITES) as pool:
        for _ in pool.map(action, items):
            pass


def add_foreign_nodes(plane: ControlPlane, count: int) -> float:
    """Setup, not measured: `count` foreign Nodes (a Node takes its status on create: one write each)."""
    started = time.monotonic()
    with plane.api_client() as client:  # its connection pool (5 a core) holds PARALLEL_WRITES
        core = kubernetes.client.CoreV1Api(client)
        in_parallel(lambda index: core.create_node(foreign_node(index), _preload_content=False).data, range(count))
    return time.monotonic() - started


# a run ---------------------------------------------------------------------------------------


@dataclass
class Run:
    plane: ControlPlane
    sim: AksSimulator
    client: kubernetes.client.ApiClient  # Kaito's stand-in, for the claims' writes; the simulator has its own
    workdir: Path
    identities: Identities
    watcher: Watcher = field(init=False)
    created_at: dict[str, float] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.watcher = Watcher(self.plane)
        self._custom = kubernetes.client.CustomObjectsApi(self.client)

    def controller(self, name: str = "controller") -> Controller:
        return Controller(self.identities.controller, self.sim, self.workdir, name)

    def arm_requests(self, since: int = 0) -> dict[str, int]:
        counted = Counter(r.operation for r in self.sim.requests[since:]
                          if r.operation not in ARM_OPERATIONS_NOT_COUNTED)
        return dict(sorted(counted.items()))

    def create_claims(self, claims: int) -> list[str]:
        """Creates `claims` claims at once (PARALLEL_WRITES at a time); their names."""
        names = [f"ws{index:09x}" for index in range(claims)]

        def create(name: str) -> None:
            self.created_at[name] = time.monotonic()
            self._custom.create_cluster_custom_object(GROUP, CLAIM_API.version, CLAIM_API.plural,
                                                      kaito_claim(CLAIM_API, name))

        in_parallel(create, names)
        return names

    def burst(self, controller: Controller, claims: int) -> dict[str, Any]:
        """Creates `claims` claims at once and waits until all are Ready; their figures."""
        first = Moment.now()
        return self.ready_figures(self.create_claims(claims), first, controller)

    def floor(self, launcher: Launcher, claims: int, writes: bool) -> dict[str, Any]:
        """Creates `claims` claims at once and waits until every one's node is GPU-ready (and with the stand-in's
        `writes`, every claim Ready); their figures."""
        first = Moment.now()
        names = self.create_claims(claims)
        if writes:
            return self.ready_figures(names, first, launcher)
        gpu_seen = self.watcher.gpu_seen_at
        self.watcher.wait("every claim's node GPU-ready", lambda: all(n in gpu_seen for n in names), 120 + claims,
                          launcher)
        return {
            "busy_cores": first.busy_cores_since(),
            **self.launch_figures(names, answered(audited_writes(self.plane.audit_log), "create")),
            "all_gpu_ready_s": round(max(gpu_seen[n] for n in names) - first.at, 2),
            "arm_requests_until_gpu_ready": self.arm_requests(),
        }

    def ready_figures(self, names: list[str], first: Moment, controller: Controller | Launcher) -> dict[str, Any]:
        """Waits until the claims `names`, created from `first` on, are all Ready; their figures."""
        ready, gpu_seen = self.watcher.ready_at, self.watcher.gpu_seen_at
        self.watcher.wait("every claim Ready", lambda: all(n in ready and n in gpu_seen for n in names),
                          120 + len(names), controller)
        # The machine's cores busy from the first create until every claim was Ready.
        busy_cores = first.busy_cores_since()
        writes = audited_writes(self.plane.audit_log)
        created = answered(writes, "create")
        return {
            "busy_cores": busy_cores,
            **self.launch_figures(names, created),
            "gpu_ready_to_claim_ready_s": distribution(
                ready[n] - self.sim.timeline()[n][timeline.GPUS_PUBLISHED].at for n in names),
            "node_event_to_claim_ready_s": distribution(ready[n] - gpu_seen[n] for n in names),
            **split_controller_part(names, gpu_seen, ready, writes),
            "created_to_claim_ready_s": distribution(ready[n] - created[n] for n in names),
            "all_ready_s": round(max(ready[n] for n in names) - first.at, 2),
            "arm_requests_until_ready": self.arm_requests(),
        }

    def launch_figures(self, names: list[str], created: dict[str, float]) -> dict[str, Any]:
        """From each claim's create (`created`: answered) to its node GPU-ready and that Node's event seen: the
        client's part, the launch's (the controller's, or the floor's stand-in), the simulator's, the API server's."""
        steps = self.sim.timeline()
        s = self.sim.scenario
        nominal = s.create_delay_s + s.node_join_delay_s + s.node_ready_delay_s + s.gpu_publish_delay_s
        up = [timeline.CREATED, timeline.NODE_JOINED, timeline.NODE_READY, timeline.GPUS_PUBLISHED]
        gpu_seen = self.watcher.gpu_seen_at
        return {
            "claims": len(names),
            # The client's part (Kaito's): its create sent -> answered; the claim exists from the answer on.
            "create_answered_s": distribution(created[n] - self.created_at[n] for n in names),
            "created_to_put_s": distribution(steps[n][timeline.PUT].at - created[n] for n in names),
            "put_to_gpu_ready_s": distribution(
                steps[n][timeline.GPUS_PUBLISHED].at - steps[n][timeline.PUT].at for n in names),
            "put_to_gpu_ready_nominal_s": nominal,
            "simulator_lag_s": distribution(steps[n][step].lag_s for n in names for step in up),
            "simulator_lag_by_step_s": {step: distribution(steps[n][step].lag_s for n in names) for step in up},
            # Of that lag, the simulator's own (its steps due but not started); the rest waited for the API server.
            "simulator_own_lag_s": distribution(steps[n][step].own_lag_s for n in names for step in up),
            # The API server's: from the simulator's Node write answered to its watch event seen (by the controller
            # as by this watcher). In a burst, the controller's follows: that event seen -> the claim Ready seen.
            "gpu_ready_to_node_event_s": distribution(
                gpu_seen[n] - steps[n][timeline.GPUS_PUBLISHED].at for n in names),
        }

    def delete_all(self, controller: Controller) -> dict[str, Any]:
        names = list(self.created_at)
        requests_before = len(self.sim.requests)
        started = time.monotonic()
        deleted_at: dict[str, float] = {}

        def delete(name: str) -> None:
            deleted_at[name] = time.monotonic()
            self._custom.delete_cluster_custom_object(GROUP, CLAIM_API.version, CLAIM_API.plural, name)

        in_parallel(delete, names)
        sent = time.monotonic() - started
        gone = self.watcher.gone_at
        self.watcher.wait("every claim gone", lambda: all(n in gone for n in names), 120 + len(names), controller)
        steps = self.sim.timeline()
        deleted = answered(audited_writes(self.plane.audit_log), "delete")
        return {
            "all_deleted_s": round(max(gone[n] for n in names) - started, 2),
            "delete_delay_nominal_s": self.sim.scenario.delete_delay_s,
            # The client's part: its last claim DELETE answered this long after its first was sent.
            "deletes_sent_s": round(sent, 2),
            # Whose time is whose: the controller's until the DELETE reaches ARM, the simulator's until the pool
            # is gone (scheduled: the delete delay), the controller's again until the claim is released.
            "delete_answered_s": distribution(deleted[n] - deleted_at[n] for n in names),
            "claim_deleted_to_pool_delete_s": distribution(
                steps[n][timeline.DELETE].at - deleted[n] for n in names if timeline.DELETE in steps[n]),
            "pool_delete_to_gone_s": distribution(
                steps[n][timeline.DELETED].at - steps[n][timeline.DELETE].at for n in names
                if timeline.DELETED in steps[n]),
            "pool_gone_to_claim_gone_s": distribution(
                gone[n] - steps[n][timeline.DELETED].at for n in names if timeline.DELETED in steps[n]),
            "arm_requests_deleting": self.arm_requests(requests_before),
        }

    def finish(self, load: LoadSampler, controller: Controller | None = None) -> dict[str, Any]:
        arm = self.arm_requests()
        claims = len(self.created_at)
        self.figures.update(arm_requests=arm, arm_requests_per_claim=round(sum(arm.values()) / max(claims, 1), 2))
        if controller is not None:
            # The controller's Kubernetes requests in the whole run (in restart, both controllers').
            wait_for_audit_lines(self.plane.audit_log)
            kube = requests_of(self.plane.audit_log, CONTROLLER_USER)
            self.figures.update(
                controller_kubernetes_requests=kube,
                controller_kubernetes_requests_per_claim=round(sum(kube.values()) / max(claims, 1), 2),
                controller=controller.figures())
        self.figures.update(machine=load.figures())
        return self.figures


@contextmanager
def running(scenario: str, foreign_nodes: int = 0) -> Iterator[tuple[Run, LoadSampler]]:
    compile_as_the_image_does()
    # Beside the results, the last run's of each scenario only (its logs and kubeconfigs): runs do not pile up in /tmp.
    workdir = results_dir() / "logs" / scenario
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    seats = api_server_seats()
    with ControlPlane(ensure_tools(), audit_policy=AUDIT_POLICY, seats=seats, go_gc_percent=API_SERVER_GOGC) as plane:
        identities = install_identities(plane, workdir)
        with client_of(identities.kubelet) as sim_client, AksSimulator(Scenario(), kube_api=sim_client) as sim, \
                client_of(identities.kaito) as client:
            setup_s = add_foreign_nodes(plane, foreign_nodes) if foreign_nodes else 0.0
            run = Run(plane, sim, client, workdir, identities)
            run.figures.update(scenario=scenario, date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                               foreign_nodes=foreign_nodes, foreign_nodes_setup_s=round(setup_s, 1),
                               api_server_seats=list(seats) if seats else "default",
                               simulator_scenario=sim.scenario.model_dump(exclude_defaults=True) or "default")
            try:
                with LoadSampler(plane) as load:
                    yield run, load
            finally:
                run.watcher.stop()
                print(f"logs in {workdir}", file=sys.stderr)


def results_dir() -> Path:
    return Path(os.environ.get("BENCH_RESULTS") or RESULTS)


def report(name: str, figures: dict[str, Any]) -> None:
    results_dir().mkdir(parents=True, exist_ok=True)
    path = results_dir() / f"{name}.json"
    path.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"== {name} ({figures['date']}, {figures['foreign_nodes']} foreign Nodes)")
    for phase in ("launch", "after_restart", "deletion"):
        for key, value in (figures.get(phase) or {}).items():
            if key == "simulator_lag_by_step_s":
                for step, lag in value.items():
                    print(f"{phase:>13}   lag of {step:<22} {shown(lag)}")
            else:
                print(f"{phase:>13} {key:<30} {shown(value) if isinstance(value, dict) and 'p50' in value else value}")
    print(f"ARM requests: {figures['arm_requests']} ({figures['arm_requests_per_claim']} a claim)")
    if "controller" in figures:
        print(f"the controller's Kubernetes requests: {figures['controller_kubernetes_requests']} "
              f"({figures['controller_kubernetes_requests_per_claim']} a claim)")
        print(f"controller: {figures['controller']}")
    print(f"machine: {figures['machine']}")
    print(f"written to {path}")


# scenarios -----------------------------------------------------------------------------------


def measure_burst(name: str, claims: int, foreign_nodes: int) -> None:
    with running(name, foreign_nodes) as (run, load):
        controller = run.controller()
        try:
            run.figures["launch"] = {"controller_ready_s": round(controller.seconds_to_ready(), 2),
                                     **run.burst(controller, claims)}
            run.figures["deletion"] = run.delete_all(controller)
            figures = run.finish(load, controller)
        finally:
            controller.stop()
    report(name, figures)


@app.command()
def burst(claims: Annotated[int, typer.Option(help="How many claims at once.")] = 200) -> None:
    """N claims at once until all are Ready, then all deleted."""
    measure_burst(f"burst-{claims}", claims, 0)


@app.command("big-cluster")
def big_cluster(claims: Annotated[int, typer.Option(help="How many claims at once.")] = 200,
                nodes: Annotated[int, typer.Option(help="Foreign Nodes in the cluster.")] = 5000) -> None:
    """A burst of claims among thousands of foreign Nodes."""
    measure_burst("big-cluster", claims, nodes)


@app.command()
def restart(claims: Annotated[int, typer.Option(help="Ready claims when the controller restarts.")] = 1000,
            nodes: Annotated[int, typer.Option(help="Foreign Nodes in the cluster.")] = 5000,
            watch_s: Annotated[float, typer.Option(help="How long writes are counted after /readyz.")] = 25) -> None:
    """The controller restarted with Ready claims and foreign Nodes: time to /readyz and the writes it makes."""
    with running("restart", nodes) as (run, load):
        first = run.controller("controller-before-restart")
        try:
            first.seconds_to_ready()
            run.figures["launch"] = {**run.burst(first, claims), "controller": first.figures()}
            # Restarted once the claims are settled: those not yet labelled with their zone would be written by the
            # next controller, which is not what a restart costs.
            run.figures["launch"]["settled_after_all_ready_s"] = round(first.wait_idle(), 2)
        finally:
            first.stop()
        with run.plane.api_client() as client:
            core = kubernetes.client.CoreV1Api(client)
            mark = int(core.list_node(limit=1).metadata.resource_version)
            requests_before = len(run.sim.requests)
            controller = run.controller()
            try:
                ready_s = controller.seconds_to_ready()
                time.sleep(watch_s)
                run.figures["after_restart"] = {
                    "controller_ready_s": round(ready_s, 2), "writes_counted_for_s": watch_s,
                    "arm_requests": run.arm_requests(requests_before),
                    **objects_written_since(client, mark), "controller": controller.figures()}
                run.figures["deletion"] = run.delete_all(controller)
                figures = run.finish(load, controller)
            finally:
                controller.stop()
    report("restart", figures)


@app.command()
def floor(claims: Annotated[int, typer.Option(help="How many claims at once.")] = 200,
          writes: Annotated[bool, typer.Option(help="Make the contract's writes too, and wait for Ready.")] = False,
          ) -> None:
    """No controller: a stand-in PUTs each claim's pool on sight and writes nothing to Kubernetes. The simulator's
    timing with only its own writes and the client's in the API server: what this machine allows any controller.
    With --writes it also makes the contract's writes (finalizer, Node, Ready status) at once: what this machine
    allows Ready."""
    name = f"floor-{claims}{'-writes' if writes else ''}"
    with running(name) as (run, load):
        launcher = Launcher(run.identities.controller, run.sim, run.workdir, writes)
        try:
            run.figures["launch"] = run.floor(launcher, claims, writes)
            figures = run.finish(load)
        finally:
            launcher.stop()
    report(name, figures)


def objects_written_since(client: kubernetes.client.ApiClient, resource_version: int) -> dict[str, int]:
    """How many claims, Nodes and Events were written since `resource_version` (etcd's revision)."""
    core = kubernetes.client.CoreV1Api(client)
    custom = kubernetes.client.CustomObjectsApi(client)
    newer = lambda items: sum(int(item["metadata"]["resourceVersion"]) > resource_version  # noqa: E731
                              for item in items)
    claims = custom.list_cluster_custom_object(GROUP, CLAIM_API.version, CLAIM_API.plural)["items"]
    nodes = json.loads(core.list_node(_preload_content=False).data)["items"]
    events = json.loads(core.list_event_for_all_namespaces(_preload_content=False).data)["items"]
    return {"claims_written": newer(claims), "nodes_written": newer(nodes), "events_written": newer(events)}


@app.command("all")
def all_scenarios() -> None:
    """burst (200), big-cluster, restart and floor (200, without and with the contract's writes) with their
    defaults."""
    burst()
    big_cluster()
    restart()
    floor()
    floor(writes=True)


# the README's tables -------------------------------------------------------------------------


@app.command()
def table() -> None:
    """The README's table, from the results in .artifacts/bench/ (or $BENCH_RESULTS)."""
    order = {"burst": 0, "big-cluster": 1, "restart": 2}
    results = sorted((json.loads(path.read_text()) for path in results_dir().glob("*.json")),
                     key=lambda r: (order.get(r["scenario"].split("-")[0], order.get(r["scenario"], 9)),
                                    r["launch"]["claims"]))
    floors = [r for r in results if "controller" not in r]
    results = [r for r in results if "controller" in r]
    print("| scenario (UTC) | claims, foreign Nodes | claim created (its create answered) -> PUT, p50 / p95 "
          "| PUT -> node GPU-ready (simulator, scheduled 3.5 s), p50 / p95 / max "
          "| node GPU-ready -> claim Ready, p50 / p95 / p99 / max (its parts, p50 / p99: the Node's event reaching "
          "the controller, the API server's; the controller's own time, its queue and work; its writes in the API "
          "server; the claim's Ready reaching a watch, the API server's) "
          "| all Ready | all deleted (the client's DELETEs) | ARM requests | the controller's Kubernetes requests "
          f"(watches aside) | controller peak RSS / CPU | {LOAD_HEADING} "
          "| API server: most Node events held / watches it closed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        launch, deletion, machine = r["launch"], r["deletion"], r["machine"]
        controller = launch.get("controller", r["controller"])  # restart: the controller that made them Ready
        up, nominal = launch["put_to_gpu_ready_s"], launch["put_to_gpu_ready_nominal_s"]
        arm = _requests(r["arm_requests"])
        print(f"| {r['scenario']} ({r['date'][11:16]}) | {launch['claims']}, {r['foreign_nodes']} "
              f"| {launch['created_to_put_s']['p50']:.2f} / {launch['created_to_put_s']['p95']:.2f} s "
              f"| {up['p50']:.2f} / {up['p95']:.2f} / {up['max']:.2f} s (lag {up['p50'] - nominal:.2f} / "
              f"{up['p95'] - nominal:.2f} / {up['max'] - nominal:.2f} s; its own p95 "
              f"{launch['simulator_own_lag_s']['p95']:.2f} s) "
              f"| {shown(launch['gpu_ready_to_claim_ready_s'])} (Node event "
              f"{_p50_p99(launch['gpu_ready_to_node_event_s'])}; controller's own "
              f"{_p50_p99(launch.get('controller_own_s'))}; its writes "
              f"{_p50_p99(launch.get('controller_writes_in_api_server_s'))}; Ready event "
              f"{_p50_p99(launch.get('ready_write_to_claim_ready_s'))}) | {launch['all_ready_s']:.1f} s "
              f"| {deletion['all_deleted_s']:.1f} s (client {deletion['deletes_sent_s']:.1f} s) "
              f"| {r['arm_requests_per_claim']} a claim ({arm}) "
              f"| {r['controller_kubernetes_requests_per_claim']} a claim "
              f"| {controller['peak_rss_mib']:.0f} MiB / {controller['cpu_s']:.1f} s "
              f"| {_load(launch, machine)} "
              f"| {machine['kube-apiserver_watch_backlog_max'].get('nodes', 0)} / "
              f"{sum(machine['kube-apiserver_watches_closed'].values())} |")
    for r in results:
        if after := r.get("after_restart"):
            print(f"\nrestart ({r['launch']['claims']} Ready claims, {r['foreign_nodes']} foreign Nodes; the row above "
                  "is the first controller making them Ready, stopped once idle "
                  f"{r['launch'].get('settled_after_all_ready_s', 0):.2f} s after, and its deletion the restarted "
                  "one's): /readyz "
                  f"{after['controller_ready_s']:.2f} s after the start; in the {after['writes_counted_for_s']:.0f} s "
                  f"after it: ARM requests {_requests(after['arm_requests']) or 'none'}, claims written "
                  f"{after['claims_written']}, Nodes written {after['nodes_written']}, Events "
                  f"{after['events_written']}; controller peak RSS {after['controller']['peak_rss_mib']:.0f} MiB, "
                  f"CPU {after['controller']['cpu_s']:.1f} s")
    if floors:
        print("\n| floor: no controller (UTC) | claims | claim created (its create answered) -> PUT, p50 / p95 "
              "| PUT -> node GPU-ready (simulator, scheduled 3.5 s), p50 / p95 / max | node GPU-ready -> its Node's "
              "event, p50 / p99 | with the contract's writes: node GPU-ready -> claim Ready, p50 / p95 / p99 / max "
              "(the stand-in's own time, p50 / p99; its writes in the API server) | all GPU-ready (all Ready) "
              f"| {LOAD_HEADING} | API server: CPU, requests, a request "
              "| API server: most Node events held / watches it closed |")
        print("|---|---|---|---|---|---|---|---|---|---|")
    for r in floors:
        launch, machine = r["launch"], r["machine"]
        up, nominal = launch["put_to_gpu_ready_s"], launch["put_to_gpu_ready_nominal_s"]
        ready = "-"
        if "gpu_ready_to_claim_ready_s" in launch:
            ready = (f"{shown(launch['gpu_ready_to_claim_ready_s'])} (own {_p50_p99(launch.get('controller_own_s'))}; "
                     f"writes {_p50_p99(launch.get('controller_writes_in_api_server_s'))})")
        done = f"{launch['all_ready_s']:.1f} s" if "all_ready_s" in launch else f"{launch['all_gpu_ready_s']:.1f} s"
        print(f"| {r['scenario']} ({r['date'][11:16]}) | {launch['claims']} "
              f"| {launch['created_to_put_s']['p50']:.2f} / {launch['created_to_put_s']['p95']:.2f} s "
              f"| {up['p50']:.2f} / {up['p95']:.2f} / {up['max']:.2f} s (lag {up['p50'] - nominal:.2f} / "
              f"{up['p95'] - nominal:.2f} / {up['max'] - nominal:.2f} s; its own p95 "
              f"{launch['simulator_own_lag_s']['p95']:.2f} s) "
              f"| {_p50_p99(launch['gpu_ready_to_node_event_s'])} | {ready} | {done} "
              f"| {_load(launch, machine)} "
              f"| {machine['kube-apiserver_cpu_s']:.1f} s, {machine['kube-apiserver_requests']}, "
              f"{machine['kube-apiserver_cpu_ms_a_request']:.1f} ms "
              f"| {machine['kube-apiserver_watch_backlog_max'].get('nodes', 0)} / "
              f"{sum(machine['kube-apiserver_watches_closed'].values())} |")


LOAD_HEADING = ("the machine: busy cores from the first create to all Ready (all GPU-ready) / in its busiest second; "
                "load average, mean / max")


def _load(launch: dict[str, Any], machine: dict[str, Any]) -> str:
    busy = f"{launch['busy_cores']:.2f} / {machine['busy_cores_max']:.2f}" if "busy_cores" in launch else "-"
    return f"{busy}; {machine['load_1m_mean']:.1f} / {machine['load_1m_max']:.1f}"


def _p50_p99(distribution: dict[str, float] | None) -> str:
    return "-" if distribution is None else f"{distribution['p50']:.2f} / {distribution['p99']:.2f} s"


def _requests(by_operation: dict[str, int]) -> str:
    return ", ".join(f"{n} {op.removeprefix('agentpools.')}" for op, n in by_operation.items())


if __name__ == "__main__":
    app()
