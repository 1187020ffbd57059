"""The local sandbox: control plane + AKS simulator + controller + Kaito claims, shown live.

The controller runs as its own `gpu-provisioner run` process, configured only through the
environment, exactly as in a cluster; the simulator stands in for Azure.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes
import yaml
from rich.console import Console
from rich.live import Live
from rich.table import Table

from gpu_provisioner.api.claims import AZURE_SKU_LABEL, GROUP, INSTANCE_TYPE_LABEL, READY, Claim, ClaimApi
from gpu_provisioner.cloud.errors import INSUFFICIENT_CAPACITY_PHRASE
from gpu_provisioner.devenv.controlplane import REPO_CRDS, ControlPlane, die_with_parent, free_port, install_crds
from gpu_provisioner.devenv.tools import ensure_tools
from gpu_provisioner.lifecycle.launch import CLAIM_REFUSALS
from gpu_provisioner.signals import do_nothing, wait_for_interrupt
from gpu_provisioner.sim import AksSimulator, Scenario

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
POLL_S = 0.5
STAGES = ("Launched", "Registered", "Initialized", READY)


@dataclass
class ClaimProgress:
    name: str
    created: float
    reached: dict[str, float] = field(default_factory=dict)  # stage -> seconds after creation
    conditions: dict[str, dict[str, Any]] = field(default_factory=dict)
    gone: bool = False

    def waiting_for(self, api: ClaimApi) -> str:
        """The reason and message of the first phase not True, as Kaito shows them (a NodeClaim's Ready only lists
        the phases)."""
        if not self.conditions:
            return "no status yet"
        if self.conditions.get(READY, {}).get("status") == "True":
            return ""
        phase = next((c for t in api.phases if (c := self.conditions.get(t, {})).get("status") != "True"), {})
        return f"{phase.get('reason', '')}: {phase.get('message', '')}"

    def failure(self, api: ClaimApi) -> str | None:
        """Why this claim cannot become Ready on its own, or None while it still may."""
        if self.gone:
            return "the claim was deleted (see its Events: kubectl get events)"
        launched = self.conditions.get(api.launched, {})
        final = INSUFFICIENT_CAPACITY_PHRASE in launched.get("message", "") or (
            launched.get("reason") in CLAIM_REFUSALS
        )
        if launched.get("status") == "False" and final:
            return f"{launched.get('reason')}: {launched.get('message')}"
        return None


@functools.cache
def _example(api_name: str) -> dict[str, Any]:
    # Parsed once: a benchmark makes a thousand claims from it, and YAML parsing would be most of its client's CPU.
    return yaml.safe_load((EXAMPLES / f"kaito-{api_name}.yaml").read_text())


def kaito_claim(api: ClaimApi, name: str, instance_types: list[str] | None = None) -> dict[str, Any]:
    """Kaito's claim manifest for `api` (examples/), renamed, optionally for other instance types."""
    manifest = copy.deepcopy(_example(api.name))
    manifest["metadata"]["name"] = name
    if api.name == "machine":
        manifest["spec"]["machineTemplateRef"]["name"] = name
    if instance_types is not None:
        for requirement in manifest["spec"]["requirements"]:
            if requirement["key"] in (INSTANCE_TYPE_LABEL, AZURE_SKU_LABEL):
                requirement["values"] = list(instance_types)
    return manifest


# Ctrl-C, `kill` (and CI timeouts), a closed terminal: each tears down as Ctrl-C does, nothing may outlive the sandbox.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def ignore_stop_signals() -> None:
    """SIG_IGN, which (unlike a Python handler) stays through the interpreter's exit: a late SIGTERM must not turn a
    finished teardown's exit code into 143."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _interrupt(*_: object) -> None:
    # Only the first stops: a terminal's SIGHUP and a SIGTERM come together, and a second interrupt landing in the
    # first one's `except` escaped it (exit 130, "interrupted" never said). The rest do nothing, not SIG_IGN: one
    # already pending when its handler became SIG_IGN makes Python print "Signal 15 ignored due to race condition".
    for sig in STOP_SIGNALS:
        signal.signal(sig, do_nothing)
    raise KeyboardInterrupt


def stop_on_signals() -> None:
    """From now on the first of STOP_SIGNALS interrupts what runs, as Ctrl-C does, and the rest are ignored."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _interrupt)


def wait_until_stopped() -> None:
    """Until one of STOP_SIGNALS comes; then out as an interrupt at any other moment goes. Woken through the
    interpreter's wakeup fd, not by a handler raising inside Event.wait: under signals in quick succession (a closed
    terminal's SIGHUP and a SIGTERM) that wait's lock was left released, and the sandbox ended in a traceback
    ("release unlocked lock") instead of saying it was interrupted."""
    wait_for_interrupt(STOP_SIGNALS)
    raise KeyboardInterrupt


class Sandbox:
    def __init__(self, console: Console, api: ClaimApi, claims: int, instance_type: str | None, scenario: str,
                 kubeconfig: Path | None, timeout_s: float) -> None:
        self.console = console
        self.api = api
        self.names = [f"ws{secrets.token_hex(5)[:9]}" for _ in range(claims)]
        # Without one, the size Kaito itself asks for in the API's era (examples/).
        self.instance_type = instance_type or Claim(api, kaito_claim(api, "ws")).requirement_values(
            INSTANCE_TYPE_LABEL)[0]
        self.scenario = scenario
        self.kubeconfig = kubeconfig
        self.timeout_s = timeout_s
        self.workdir = Path(tempfile.mkdtemp(prefix="gpu-provisioner-sandbox-"))
        self.progress = {name: ClaimProgress(name, 0.0) for name in self.names}
        self.kubectl = "kubectl"  # the one built for the embedded cluster, once there is one

    # the whole run -------------------------------------------------------------------------------

    def run(self, exit_when_ready: bool) -> int:
        stop_on_signals()
        with self._environment() as (kubeconfig_path, metrics_port, controller):
            api_client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig_path))
            custom = kubernetes.client.CustomObjectsApi(api_client)
            kubectl = f"{self.kubectl} --kubeconfig {kubeconfig_path}"
            self._print_unwrapped(f"kubectl: {kubectl} get {self.api.plural}")
            # The claims' Warnings only: a fresh API server has Warnings of its own (ClusterIPNotAllocated).
            self._print_unwrapped(f"events:  {kubectl} get events "
                                  f"--field-selector type=Warning,involvedObject.kind={self.api.kind}")
            self._print_unwrapped(f"metrics: http://127.0.0.1:{metrics_port}/metrics")
            self._print_unwrapped(f"controller log: {self.workdir / 'controller.log'}")
            outcome: str | None = "interrupted"
            try:
                started = time.monotonic()
                for name in self.names:
                    custom.create_cluster_custom_object(
                        GROUP, self.api.version, self.api.plural, kaito_claim(self.api, name, [self.instance_type])
                    )
                    self.progress[name].created = time.monotonic()
                outcome = self._watch(custom, started, controller)
                if outcome is None:
                    self._summary(kubernetes.client.CoreV1Api(api_client), custom, started)
                    headline = "all claims Ready."
                else:
                    self.console.print(f"[red]not ready: {outcome}[/red]")
                    headline = "the kubectl commands above show why."
                if not exit_when_ready:
                    # Up until Ctrl-C either way: a failed claim is left as it is for kubectl to show.
                    self.console.print(f"{headline} Ctrl-C deletes the claims and tears everything down.")
                    self.console.file.flush()  # so an interrupt never lands in the middle of a write
                    wait_until_stopped()
            except KeyboardInterrupt:
                self.console.print("interrupted")
            finally:
                # A Ctrl-C must not cut the teardown short and leave pools or processes behind.
                ignore_stop_signals()
                if controller.poll() is None:
                    self._delete_claims(custom)
                api_client.close()
        if outcome is None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            self.console.print(f"controller log kept in {self.workdir / 'controller.log'}")
        return 0 if outcome is None else 1

    def _print_unwrapped(self, line: str) -> None:
        """A line to copy and paste (a command, a path): never wrapped, however narrow the terminal."""
        self.console.print(line, soft_wrap=True, markup=False, highlight=False)

    @contextlib.contextmanager
    def _environment(self) -> Iterator[tuple[Path, int, subprocess.Popen[bytes]]]:
        plane: ControlPlane | None = None
        with contextlib.ExitStack() as stack:
            if self.kubeconfig is None:
                tools = ensure_tools(self.console)
                self.kubectl = str(tools.kubectl)
                plane = ControlPlane(tools)
                with self.console.status("starting etcd and kube-apiserver ..."):
                    plane.start()
                stack.callback(plane.stop)
                kubeconfig_path = plane.kubeconfig
            else:
                kubeconfig_path = self.kubeconfig
            sim_client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig_path))
            stack.callback(sim_client.close)
            if plane is None:
                install_crds(sim_client, REPO_CRDS)
            sim = AksSimulator(Scenario.named(self.scenario), kube_api=sim_client)
            sim.start()
            stack.callback(sim.stop)
            self.console.print(f"AKS simulator ({self.scenario}) at {sim.endpoint}")
            metrics_port = free_port()
            controller = self._start_controller(kubeconfig_path, sim, metrics_port)
            stack.callback(self._stop_controller, controller)
            yield kubeconfig_path, metrics_port, controller

    def _start_controller(self, kubeconfig: Path, sim: AksSimulator, metrics_port: int) -> subprocess.Popen[bytes]:
        env = {
            **os.environ, **sim.azure_environment(),
            "KUBECONFIG": str(kubeconfig), "CLAIM_APIS": self.api.name,
            "METRICS_PORT": str(metrics_port), "HEALTH_PROBE_PORT": str(free_port()),
            "POOL_REFRESH_INTERVAL_SECONDS": "2",
        }
        log = open(self.workdir / "controller.log", "wb")  # noqa: SIM115 - handed to the child
        # Its own session: the terminal's Ctrl-C goes to the sandbox alone, which still needs the controller
        # to delete the claims' pools before it stops it.
        process = subprocess.Popen(
            [sys.executable, "-m", "gpu_provisioner", "run"], env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=die_with_parent,
        )
        log.close()
        return process

    @staticmethod
    def _stop_controller(process: subprocess.Popen[bytes]) -> None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()

    # progress ------------------------------------------------------------------------------------

    def _watch(self, custom: kubernetes.client.CustomObjectsApi, started: float,
               controller: subprocess.Popen[bytes]) -> str | None:
        """Show the claims until all are Ready (None) or one cannot be (its reason)."""
        deadline = started + self.timeout_s
        with Live(self._table(), console=self.console, refresh_per_second=4) as live:
            while time.monotonic() < deadline:
                if controller.poll() is not None:
                    log_tail = (self.workdir / "controller.log").read_text(errors="replace")[-2000:]
                    return f"the controller exited with code {controller.returncode}:\n{log_tail}"
                self._poll(custom)
                live.update(self._table())
                failures = [f"{p.name}: {f}" for p in self.progress.values() if (f := p.failure(self.api))]
                if failures:
                    return "; ".join(failures)
                if all(READY in p.reached for p in self.progress.values()):
                    return None
                time.sleep(POLL_S)
        waiting = "; ".join(f"{p.name}: {p.waiting_for(self.api)}" for p in self.progress.values()
                            if READY not in p.reached)
        return f"claims not Ready after {self.timeout_s:.0f}s ({waiting})"

    def _poll(self, custom: kubernetes.client.CustomObjectsApi) -> None:
        for progress in self.progress.values():
            try:
                claim = custom.get_cluster_custom_object(GROUP, self.api.version, self.api.plural, progress.name)
            except kubernetes.client.ApiException as error:
                progress.gone = error.status == 404
                continue
            for condition in (claim.get("status") or {}).get("conditions") or []:
                progress.conditions[condition["type"]] = condition
                stage = condition["type"].removeprefix("Machine")
                if condition["status"] == "True" and stage not in progress.reached:
                    progress.reached[stage] = time.monotonic() - progress.created

    def _table(self) -> Table:
        table = Table(title=f"{self.api.kind}s ({self.instance_type}, scenario {self.scenario})")
        table.add_column("claim")
        for stage in STAGES:
            table.add_column(stage)
        table.add_column("reason / message", overflow="fold")
        condition_types = dict(zip(STAGES, (*self.api.phases, READY), strict=True))
        for progress in self.progress.values():
            cells = []
            for stage in STAGES:
                condition = progress.conditions.get(condition_types[stage], {})
                seconds = progress.reached.get(stage)
                cells.append(f"[green]True[/green] {seconds:.1f}s" if seconds is not None
                             else condition.get("status", "-"))
            table.add_row(progress.name, *cells, progress.waiting_for(self.api))
        return table

    def _summary(self, core: kubernetes.client.CoreV1Api, custom: kubernetes.client.CustomObjectsApi,
                 started: float) -> None:
        self.console.print(f"\nall {len(self.names)} claim(s) Ready in {time.monotonic() - started:.1f}s")
        for name in self.names:
            claim = custom.get_cluster_custom_object(GROUP, self.api.version, self.api.plural, name)
            node = core.read_node(claim["status"]["nodeName"])
            labels = node.metadata.labels
            shown = {k: v for k, v in sorted(labels.items())
                     if k.startswith(("kaito.sh/", "karpenter.sh/", "kubernetes.azure.com/agentpool",
                                      "node.kubernetes.io/instance-type"))}
            taints = [f"{t.key}={t.value}:{t.effect}" for t in node.spec.taints or []]
            gpus = (node.status.capacity or {}).get("nvidia.com/gpu", "0")
            timings = ", ".join(f"{stage} {self.progress[name].reached[stage]:.1f}s" for stage in STAGES)
            self.console.print(f"node {node.metadata.name} (claim {name}): nvidia.com/gpu={gpus}, taints {taints}")
            self.console.print(f"  labels: {shown}")
            self.console.print(f"  stage timings from creation: {timings}")

    def _delete_claims(self, custom: kubernetes.client.CustomObjectsApi) -> None:
        self.console.print("deleting the claims (the controller drains and deletes their nodes and pools) ...")
        started = time.monotonic()
        for name in self.names:
            with contextlib.suppress(kubernetes.client.ApiException):
                custom.delete_cluster_custom_object(GROUP, self.api.version, self.api.plural, name)
        remaining = set(self.names)
        while remaining and time.monotonic() - started < 120:
            for name in list(remaining):
                try:
                    custom.get_cluster_custom_object(GROUP, self.api.version, self.api.plural, name)
                except kubernetes.client.ApiException as error:
                    if error.status == 404:
                        remaining.discard(name)
            time.sleep(POLL_S)
        if remaining:
            self.console.print(f"[yellow]still terminating after 120s: {sorted(remaining)}[/yellow]")
        else:
            self.console.print(f"claims, nodes and agent pools deleted in {time.monotonic() - started:.1f}s")

