"""`gpu-provisioner simulate-aks`: the AKS simulator on its own, for a controller started by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import kubernetes
import typer
from rich.console import Console

from gpu_provisioner.signals import wait_for_interrupt
from gpu_provisioner.sim.scenario import PRESETS, Scenario


def simulate_aks(
    kubeconfig: Annotated[Path | None, typer.Option(help="Cluster where Nodes join; without it none does.")] = None,
    scenario: Annotated[str, typer.Option(help=f"Preset: {', '.join(PRESETS)}. AKS_SIM_* variables override fields.")]
    = "default",
    port: Annotated[int, typer.Option(help="HTTPS port on 127.0.0.1 (0: any free port).")] = 0,
    env_file: Annotated[Path | None, typer.Option(help="Also write the controller's environment here.")] = None,
) -> None:
    from gpu_provisioner.sim.server import AksSimulator  # not for the other commands: see sim/__init__.py

    console = Console()
    if scenario not in PRESETS:
        raise typer.BadParameter(f"choose one of {', '.join(PRESETS)}", param_hint="--scenario")
    kube_api = kubernetes.config.new_client_from_config(config_file=str(kubeconfig)) if kubeconfig else None
    simulator = AksSimulator(Scenario.named(scenario), kube_api=kube_api)
    simulator.start(port)
    try:
        environment = simulator.azure_environment()
        console.print(f"AKS simulator ({scenario}) at {simulator.endpoint}")
        console.print("environment for `gpu-provisioner run`:")
        for name, value in environment.items():
            console.print(f"  {name}={value}", soft_wrap=True)
        if env_file is not None:
            env_file.write_text("".join(f"{name}={value}\n" for name, value in environment.items()))
        wait_for_interrupt()
    finally:
        simulator.stop()
        if kube_api is not None:
            kube_api.close()
