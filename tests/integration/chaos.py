"""Chaos run: what an operator would try before trusting the controller with GPUs, against local processes only
(a real kube-apiserver and etcd, the AKS simulator, two `gpu-provisioner run` replicas with leader election).

Each round creates a wave of Kaito claims (Machines and NodeClaims) and Karpenter's own claims beside them, then,
while the pools are being created, SIGKILLs the leader (even rounds) or restarts the API server hard (odd rounds);
waits for the wave to be Ready; creates and at once deletes a burst of claims while busy loops load every core;
and deletes the previous round's wave, SIGKILLing the leader during the deletes. The simulator answers with a
fault storm all along (5xx, dropped connections, 429 with a short Retry-After, PUTs carried out whose answers
are lost). At the end every Kaito claim is deleted and the run counts what must never happen.

`make chaos` runs the short version (the one CI runs as tests/integration/test_chaos.py);
`make chaos ARGS="--rounds 30 --wave 12 --burst 40"` the long one of the README.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, TypeVar

import kubernetes
import typer
from rich.console import Console
from rich.table import Table

from gpu_provisioner.api.claims import CLAIM_APIS, GROUP, MACHINE, NODECLAIM, READY, ClaimApi
from gpu_provisioner.devenv.controlplane import ControlPlane
from gpu_provisioner.devenv.tools import ensure_tools
from gpu_provisioner.runtime.leader import LEASE_NAME
from gpu_provisioner.sim import AksSimulator, Scenario
from tests.integration.harness import (
    UNREACHABLE,
    Claims,
    cpu_load,
    create_and_delete,
    kaito_claim,
    karpenter_machine,
    karpenter_nodeclaim,
    lease_holder,
    start_controller_process,
)

T = TypeVar("T")
NAMESPACE = "gpu-provisioner-chaos"
Key = tuple[ClaimApi, str]


@dataclass
class ChaosOptions:
    rounds: int = 2
    wave: int = 6  # Kaito claims a round, Machines and NodeClaims alternately
    burst: int = 16  # claims a round created and deleted at once under CPU load
    lost_answers: int = 2  # agent-pool PUTs a round carried out with their answers lost
    server_error_rate: float = 0.25
    drop_rate: float = 0.10
    throttle_rate: float = 0.20
    lease_s: int = 4  # LEASE_DURATION_SECONDS of the replicas
    ready_deadline_s: float = 120.0  # from a claim's creation
    gone_deadline_s: float = 120.0  # from a claim's deletion
    leak_grace_s: float = 30.0  # after the last claim is gone, for pools still being deleted
    max_minutes: float = 45.0  # no round starts after this
    seed: int = 0


@dataclass
class ChaosFigures:
    kills_during_create: int = 0
    kills_during_delete: int = 0
    apiserver_restarts: int = 0
    takeovers_s: list[float] = field(default_factory=list)
    replica_exits: list[str] = field(default_factory=list)  # exited by themselves (a lost Lease): replaced
    kaito_claims: int = 0
    burst_claims: int = 0
    foreign_claims: int = 0
    ready_s: list[float] = field(default_factory=list)
    # Every one of these must stay empty.
    leaked_pools: list[str] = field(default_factory=list)
    duplicate_creates: dict[str, int] = field(default_factory=dict)
    claims_stuck: list[str] = field(default_factory=list)
    claims_not_ready: list[str] = field(default_factory=list)
    foreign_touched: dict[str, str] = field(default_factory=dict)
    no_leader: int = 0  # times there was no leader to kill, or none other within the takeover bound
    # What else happened.
    arm_statuses: dict[int, int] = field(default_factory=dict)
    pool_puts: int = 0
    pools_created: int = 0
    lost_answers: int = 0
    crash_lines: int = 0
    load: list[tuple[float, float, float]] = field(default_factory=list)
    wall_s: float = 0.0
    logs: Path | None = None

    @property
    def kills(self) -> int:
        return self.kills_during_create + self.kills_during_delete

    def failures(self) -> dict[str, int]:
        """The counts that must be 0."""
        return {"leaked pools": len(self.leaked_pools), "duplicate creates": len(self.duplicate_creates),
                "claims stuck": len(self.claims_stuck), "claims not Ready": len(self.claims_not_ready),
                "foreign claims touched": len(self.foreign_touched),
                "leader missing or takeover timed out": self.no_leader}


def _tolerant(call: Callable[[], T], default: T) -> T:
    """`call()`, or `default` while the API server is down or restarting."""
    try:
        return call()
    except (kubernetes.client.ApiException, *UNREACHABLE):
        return default


class Replicas:
    """Two `gpu-provisioner run` replicas electing a leader; one that exits is replaced by a new one (a new pod
    name), as its Deployment would, and so is one killed here."""

    def __init__(self, sim: AksSimulator, kubeconfig: Path, workdir: Path, api_client: kubernetes.client.ApiClient,
                 lease_s: int, count: int = 2, max_exits: int = 100) -> None:
        self._sim, self._kubeconfig, self._workdir, self._api = sim, kubeconfig, workdir, api_client
        self._lease_s, self._count, self._max_exits = lease_s, count, max_exits
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._serial = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="chaos-replicas", daemon=True)
        self.exits: list[str] = []

    def __enter__(self) -> Replicas:
        with self._lock:
            for _ in range(self._count):
                self._spawn()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        with self._lock:
            for process in self._processes.values():
                process.kill()
                process.wait()
            self._processes.clear()

    def _spawn(self) -> None:
        self._serial += 1
        name = f"replica-{self._serial}"
        self._processes[name] = start_controller_process(
            self._sim, self._kubeconfig, self._workdir / f"{name}.log", LEADER_ELECT="true", POD_NAME=name,
            POD_NAMESPACE=NAMESPACE, LEASE_DURATION_SECONDS=str(self._lease_s), POOL_REFRESH_INTERVAL_SECONDS="1")

    def _supervise(self) -> None:
        # Processes started here die with this thread (PR_SET_PDEATHSIG), which lives as long as the run.
        while not self._stop.wait(0.5):
            with self._lock:
                for name, process in list(self._processes.items()):
                    if process.poll() is None:
                        continue
                    self.exits.append(f"{name} exited with code {process.returncode}")
                    del self._processes[name]
                    if len(self.exits) <= self._max_exits:
                        self._spawn()

    def kill_leader(self, timeout_s: float) -> tuple[bool, float | None]:
        """SIGKILL the Lease holder and start a replica in its place. Returns whether there was a live leader to
        kill within `timeout_s`, and how long until the Lease named another holder (None: not within `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        while True:
            holder = lease_holder(self._api, NAMESPACE)
            with self._lock:
                process = self._processes.get(holder or "")
                if process is not None and process.poll() is None:
                    process.send_signal(signal.SIGKILL)
                    process.wait()
                    killed_at = time.monotonic()
                    del self._processes[holder]
                    self._spawn()
                    break
            if time.monotonic() > deadline:
                return False, None
            time.sleep(0.1)
        while time.monotonic() < killed_at + timeout_s:
            if lease_holder(self._api, NAMESPACE) not in (None, holder):
                return True, time.monotonic() - killed_at
            time.sleep(0.05)
        return True, None


class Chaos:
    def __init__(self, plane: ControlPlane, api_client: kubernetes.client.ApiClient, options: ChaosOptions,
                 console: Console) -> None:
        self.plane, self.api_client, self.options, self.console = plane, api_client, options, console
        self.claims = Claims(api_client)
        self.rng = random.Random(options.seed)
        # Fresh names each run (a run may share its API server with others), valid as pool names.
        self.token = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(3))
        self.figures = ChaosFigures()
        self.created_at: dict[str, float] = {}
        self.lost_answers_asked = 0
        self.foreign: dict[Key, str] = {}  # claim -> its resourceVersion when made

    # the run ----------------------------------------------------------------------------------

    def run(self) -> ChaosFigures:
        options, figures = self.options, self.figures
        started = time.monotonic()
        _tolerant(lambda: kubernetes.client.CoreV1Api(self.api_client).create_namespace(
            {"metadata": {"name": NAMESPACE}}), None)
        scenario = Scenario(seed=options.seed, create_delay_s=2.0, delete_delay_s=2.0,
                            server_error_rate=options.server_error_rate, drop_rate=options.drop_rate,
                            throttle_rate=options.throttle_rate, retry_after_s=1)
        workdir = figures.logs = Path(tempfile.mkdtemp(prefix="gpu-provisioner-chaos-"))
        self._sample_load()
        try:
            self._rounds(scenario, workdir, started)
        except BaseException:
            self.console.print(f"controller logs kept in {workdir}")
            raise
        figures.crash_lines = sum(log.read_text(errors="replace").count("reconcile crashed")
                                  for log in workdir.glob("*.log"))
        _tolerant(lambda: kubernetes.client.CoordinationV1Api(self.api_client).delete_namespaced_lease(
            LEASE_NAME, NAMESPACE), None)
        self._sample_load()
        figures.wall_s = time.monotonic() - started
        if not any(figures.failures().values()):
            shutil.rmtree(workdir)
            figures.logs = None
        return figures

    def _rounds(self, scenario: Scenario, workdir: Path, started: float) -> None:
        options, figures = self.options, self.figures
        with AksSimulator(scenario, kube_api=self.api_client) as sim:
            self._make_foreign("s")  # there before the controller starts, as in a cluster running Karpenter
            with Replicas(sim, self.plane.kubeconfig, workdir, self.api_client, options.lease_s) as replicas:
                previous: list[Key] = []
                for round_ in range(options.rounds):
                    if time.monotonic() - started > options.max_minutes * 60:
                        self.console.print(f"time is up after {round_} rounds")
                        break
                    sim.update_scenario(lost_create_answers=sim.scenario.lost_create_answers + options.lost_answers)
                    self.lost_answers_asked += options.lost_answers
                    wave = self._create_wave(round_)
                    self._make_foreign(f"{round_:03d}")
                    time.sleep(self.rng.uniform(0.2, 2.0))  # into the PUTs, LISTs and registrations
                    if round_ % 2 == 0:
                        self._kill(replicas, "create")
                    else:
                        self.plane.restart_apiserver(down_s=self.rng.uniform(1.0, 3.0))
                        figures.apiserver_restarts += 1
                    self._wait_ready(wave)
                    self._burst(round_)
                    self._delete_with_kill(previous, replicas)
                    previous = wave
                    self._sample_load()
                    self._progress(round_, started)
                self._delete_with_kill(previous, replicas)
                self._count_leaks(sim)
                figures.replica_exits = list(replicas.exits)
            self._count_arm(sim)
            self._check_foreign(sim)

    # steps ------------------------------------------------------------------------------------

    def _name(self, kind: str, round_: int, index: int) -> str:
        return f"{kind}{self.token}{round_:03d}{index:03d}"  # a valid pool name: 10 characters

    def _create_wave(self, round_: int) -> list[Key]:
        wave = [(MACHINE if index % 2 else NODECLAIM, self._name("w", round_, index))
                for index in range(self.options.wave)]
        for api, name in wave:
            self.claims.create(api, kaito_claim(api, name))
            self.created_at[name] = time.monotonic()
        self.figures.kaito_claims += len(wave)
        return wave

    def _make_foreign(self, tag: str) -> None:
        for api, manifest in ((NODECLAIM, karpenter_nodeclaim(f"k{self.token}{tag}n")),
                              (MACHINE, karpenter_machine(f"k{self.token}{tag}m"))):
            made = self.claims.create(api, manifest)
            self.foreign[(api, made["metadata"]["name"])] = made["metadata"]["resourceVersion"]
        self.figures.foreign_claims = len(self.foreign)

    def _kill(self, replicas: Replicas, during: str) -> None:
        killed, took = replicas.kill_leader(timeout_s=self.options.lease_s * 4 + 30)
        if took is None:
            self.figures.no_leader += 1  # none to kill, or none after the kill
        else:
            self.figures.takeovers_s.append(took)
        if not killed:
            return
        if during == "create":
            self.figures.kills_during_create += 1
        else:
            self.figures.kills_during_delete += 1

    def _wait_ready(self, wave: list[Key]) -> None:
        waiting = {name for _, name in wave}
        while waiting:
            for api in {api for api, _ in wave}:
                for item in self._list(api):
                    name = item["metadata"]["name"]
                    conditions = (item.get("status") or {}).get("conditions") or []
                    if name in waiting and any(c["type"] == READY and c["status"] == "True" for c in conditions):
                        waiting.discard(name)
                        self.figures.ready_s.append(time.monotonic() - self.created_at[name])
            late = {n for n in waiting if time.monotonic() - self.created_at[n] > self.options.ready_deadline_s}
            self.figures.claims_not_ready.extend(sorted(late))
            waiting -= late
            time.sleep(0.3)

    def _burst(self, round_: int) -> None:
        """Claims created and deleted at once, spread over the moment the finalizer is added, every core busy."""
        names = [self._name("b", round_, index) for index in range(self.options.burst)]
        keys = [(MACHINE if index % 2 else NODECLAIM, name) for index, name in enumerate(names)]
        with cpu_load(processes=2 * (os.cpu_count() or 1), seconds=60), ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda key: create_and_delete(self.claims, key[0], key[1],
                                                        delay_s=self.rng.randrange(10) * 0.005), keys))
            self._sample_load()
            self._wait_gone(keys, time.monotonic())
        self.figures.burst_claims += len(keys)

    def _delete_with_kill(self, claims: list[Key], replicas: Replicas) -> None:
        if not claims:
            return
        deleted_at = time.monotonic()
        for api, name in claims:
            self.claims.delete(api, name)
        time.sleep(self.rng.uniform(0.1, 1.5))  # into the drains, pool DELETEs and the LISTs that confirm them
        self._kill(replicas, "delete")
        self._wait_gone(claims, deleted_at)

    def _wait_gone(self, claims: list[Key], deleted_at: float) -> None:
        waiting = set(claims)
        while waiting:
            present = {(api, item["metadata"]["name"]) for api in {api for api, _ in claims}
                       for item in self._list(api)}
            waiting &= present
            if waiting and time.monotonic() - deleted_at > self.options.gone_deadline_s:
                self.figures.claims_stuck.extend(sorted(f"{api.plural}/{name}" for api, name in waiting))
                return
            time.sleep(0.3)

    def _count_leaks(self, sim: AksSimulator) -> None:
        """Pools with no claim of their name, once every claim is gone and a pool DELETE had time to finish."""
        deadline = time.monotonic() + self.options.leak_grace_s
        while True:
            claimed = {item["metadata"]["name"] for api in CLAIM_APIS.values() for item in self._list(api)}
            unclaimed = sorted(set(sim.pools()) - claimed)
            if not unclaimed or time.monotonic() > deadline:
                self.figures.leaked_pools = unclaimed
                return
            time.sleep(0.5)

    def _count_arm(self, sim: AksSimulator) -> None:
        figures = self.figures
        arm = [r for r in sim.requests if r.operation not in ("token", "openid-configuration")]
        figures.arm_statuses = dict(sorted(Counter(r.status for r in arm).items()))
        figures.pool_puts = sum(1 for r in arm if r.operation == "agentpools.create")
        creations = sim.creations()
        figures.pools_created = sum(creations.values())
        figures.duplicate_creates = {name: n for name, n in creations.items() if n > 1}
        figures.lost_answers = self.lost_answers_asked - sim.scenario.lost_create_answers

    def _check_foreign(self, sim: AksSimulator) -> None:
        """Karpenter's claims: never written (same resourceVersion), no finalizer, status or Event, and not one
        ARM request for a pool of their name."""
        requested = Counter(r.path.rsplit("/", 1)[-1].lower() for r in sim.requests
                            if r.operation.startswith("agentpools.") and r.operation != "agentpools.list")
        for (api, name), version in self.foreign.items():
            claim = self.claims.get(api, name)
            what = []
            if claim is None:
                what.append("deleted")
            else:
                if claim["metadata"]["resourceVersion"] != version:
                    what.append("written")
                if claim["metadata"].get("finalizers"):
                    what.append(f"finalizers {claim['metadata']['finalizers']}")
                if claim.get("status"):
                    what.append("status")
            if events := self.claims.event_reasons(name):
                what.append(f"Events {sorted(events)}")
            if requested[name]:
                what.append(f"{requested[name]} agent-pool requests")
            if what:
                self.figures.foreign_touched[f"{api.plural}/{name}"] = ", ".join(what)

    # reading ----------------------------------------------------------------------------------

    def _list(self, api: ClaimApi) -> list[dict[str, Any]]:
        return _tolerant(lambda: self.claims.custom.list_cluster_custom_object(
            GROUP, api.version, api.plural, _request_timeout=10)["items"], [])

    def _sample_load(self) -> None:
        self.figures.load.append(os.getloadavg())

    def _progress(self, round_: int, started: float) -> None:
        f = self.figures
        self.console.print(
            f"round {round_ + 1}/{self.options.rounds} after {time.monotonic() - started:.0f}s: kills {f.kills}, "
            f"API-server restarts {f.apiserver_restarts}, Ready {len(f.ready_s)}/{f.kaito_claims}, "
            f"not Ready {len(f.claims_not_ready)}, stuck {len(f.claims_stuck)}, load {os.getloadavg()[0]:.1f}")


# reporting ------------------------------------------------------------------------------------------


def report(figures: ChaosFigures, options: ChaosOptions, console: Console) -> None:
    table = Table(title="chaos run", show_header=True)
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("must be", justify="right")
    takeovers = sorted(figures.takeovers_s)

    def row(name: str, value: object, must: str = "") -> None:
        table.add_row(name, str(value), must)

    row("SIGKILLs of the leader (during creates / deletes)",
        f"{figures.kills} ({figures.kills_during_create} / {figures.kills_during_delete})", "> 0")
    row("API-server restarts (during creates)", figures.apiserver_restarts)
    row("takeover after a kill: max / median",
        f"{takeovers[-1]:.1f}s / {statistics.median(takeovers):.1f}s" if takeovers else "-",
        f"< {options.lease_s * 4 + 30}s")
    row("replicas that exited by themselves (replaced)", len(figures.replica_exits))
    for name, count in figures.failures().items():
        row(name, count, "0")
    row("Kaito claims in waves / in bursts / Karpenter's claims",
        f"{figures.kaito_claims} / {figures.burst_claims} / {figures.foreign_claims}")
    if figures.ready_s:
        ready = sorted(figures.ready_s)
        row("created to Ready: p50 / max", f"{statistics.median(ready):.1f}s / {ready[-1]:.1f}s")
    row("agent-pool PUTs / pools created / answers lost",
        f"{figures.pool_puts} / {figures.pools_created} / {figures.lost_answers}")
    row("ARM requests by status (0: dropped)", ", ".join(f"{k}: {v}" for k, v in figures.arm_statuses.items()))
    row("'reconcile crashed' log lines", figures.crash_lines)
    loads = figures.load
    row("load average (1 min): max / at the end (1, 5, 15 min)",
        f"{max(load[0] for load in loads):.1f} / {', '.join(f'{x:.1f}' for x in loads[-1])}" if loads else "-")
    row("CPUs", os.cpu_count())
    row("wall time", f"{figures.wall_s:.0f}s")
    console.print(table)
    for label, items in (("leaked pools", figures.leaked_pools), ("duplicate creates", figures.duplicate_creates),
                         ("claims stuck", figures.claims_stuck), ("claims not Ready", figures.claims_not_ready),
                         ("foreign claims touched", figures.foreign_touched),
                         ("replica exits", figures.replica_exits)):
        if items:
            shown = items.items() if isinstance(items, dict) else items
            console.print(f"{label}: " + "; ".join(str(i) for i in _first(shown, 20)))
    if figures.logs:
        console.print(f"controller logs kept in {figures.logs}")


def _first(items: Iterable[Any], count: int) -> list[Any]:
    return [item for _, item in zip(range(count), items, strict=False)]


def main(
    rounds: Annotated[int, typer.Option(min=1, help="Rounds: a wave, a kill or an API-server restart, a burst.")
                      ] = ChaosOptions.rounds,
    wave: Annotated[int, typer.Option(min=1, help="Kaito claims a round.")] = ChaosOptions.wave,
    burst: Annotated[int, typer.Option(min=0, help="Claims a round created and deleted at once under CPU load.")
                     ] = ChaosOptions.burst,
    lost_answers: Annotated[int, typer.Option(min=0, help="PUT answers lost a round.")] = ChaosOptions.lost_answers,
    lease_s: Annotated[int, typer.Option(min=2, help="LEASE_DURATION_SECONDS of the replicas.")
                       ] = ChaosOptions.lease_s,
    max_minutes: Annotated[float, typer.Option(help="No round starts after this.")] = ChaosOptions.max_minutes,
    seed: Annotated[int, typer.Option(help="Seeds the simulator's faults and the moments of kills.")
                    ] = ChaosOptions.seed,
) -> None:
    """The chaos run against local processes; exits 1 when a count that must be 0 is not (or nothing was killed)."""
    options = ChaosOptions(rounds=rounds, wave=wave, burst=burst, lost_answers=lost_answers, lease_s=lease_s,
                           max_minutes=max_minutes, seed=seed)
    console = Console()
    console.print(f"chaos: {', '.join(f'{f.name}={getattr(options, f.name)}' for f in fields(options))}")
    with ControlPlane(ensure_tools()) as plane, plane.api_client() as client:
        figures = Chaos(plane, client, options, console).run()
    report(figures, options, console)
    if any(figures.failures().values()) or figures.kills == 0:
        raise typer.Exit(1)


if __name__ == "__main__":
    typer.run(main)
