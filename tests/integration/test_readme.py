"""Every command in the README's shell blocks is run, here or by the test named for it, so the README
cannot rot."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

from tests.integration.harness import CLEAN_ENV

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
# Commands other tests run exactly as the README shows them.
RUN_ELSEWHERE = {
    "make test": ".ci/run (CI runs it on every change)",
    ".venv/bin/gpu-provisioner devenv up": "test_controlplane.py::test_devenv_up_serves_until_interrupted_and_...",
}


def readme_commands() -> list[str]:
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", README, re.DOTALL):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split("  #", 1)[0].strip()
            if command:
                commands.append(" ".join(command.split()))
    return commands


def test_readme_has_the_two_setup_commands_first():
    assert readme_commands()[:2] == ["make sandbox", "make test"]
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_every_readme_command_is_covered():
    covered = {"make sandbox", "helm install"} | set(RUN_ELSEWHERE)
    uncovered = [c for c in readme_commands() if not any(c.startswith(prefix) for prefix in covered)]
    assert uncovered == []


def test_make_sandbox_runs(tmp_path):
    result = subprocess.run(["make", "sandbox", "ARGS=--exit-when-ready --api nodeclaim --claims 3"],
                            cwd=REPO, capture_output=True, text=True, timeout=600, env=CLEAN_ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "all 3 claim(s) Ready" in result.stdout


def test_readme_helm_install_works_against_a_real_api_server(control_plane, unique_name):
    command = next(c for c in readme_commands() if c.startswith("helm install"))
    namespace = f"readme-{unique_name}"
    placeholders = {"<cluster>": "kaito", "<identity client id>": "11111111-2222-3333-4444-555555555555",
                    "<tenant id>": "66666666-7777-8888-9999-000000000000",
                    "<subscription id>": "sub", "<cluster resource group>": "rg", "<region>": "eastus"}
    for placeholder, value in placeholders.items():
        command = command.replace(placeholder, value)
    argv = shlex.split(command)
    argv[0] = str(control_plane.tools.helm)
    argv[argv.index("--namespace") + 1] = namespace
    argv += ["--kubeconfig", str(control_plane.kubeconfig), "--wait=false"]
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "STATUS: deployed" in result.stdout
    subprocess.run([str(control_plane.tools.helm), "uninstall", "gpu-provisioner", "--namespace", namespace,
                    "--kubeconfig", str(control_plane.kubeconfig)], capture_output=True, timeout=120, check=True)



def test_make_bench_prints_its_figures_and_the_readme_table(tmp_path):
    env = {**CLEAN_ENV, "BENCH_RESULTS": str(tmp_path), "POOL_REFRESH_INTERVAL_SECONDS": "1"}
    result = subprocess.run(["make", "bench", "ARGS=burst --claims 2"], cwd=REPO, capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads((tmp_path / "burst-2.json").read_text())
    assert figures["launch"]["gpu_ready_to_claim_ready_s"]["n"] == 2
    assert figures["arm_requests"]["agentpools.create"] == 2 and figures["controller"]["cpu_s"] > 0
    assert "simulator_lag_by_step_s" in figures["launch"] and "pool_gone_to_claim_gone_s" in figures["deletion"]
    assert "ARM requests:" in result.stdout and "lag of gpus-published" in result.stdout
    table = subprocess.run(["make", "bench", "ARGS=table"], cwd=REPO, capture_output=True, text=True, timeout=120,
                           env=env)
    assert table.stdout.count("| burst-2 (") == 1
    assert "make bench" in README and "| scenario (UTC) |" in README


def test_make_chaos_passes_its_args_to_the_chaos_run():
    # The run itself is tests/integration/test_chaos.py; this is the README's `make chaos ARGS=...`.
    result = subprocess.run(["make", "chaos", "ARGS=--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={**CLEAN_ENV, "COLUMNS": "200"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert all(option in result.stdout for option in ("--rounds", "--wave", "--burst", "--lease-s", "--seed"))
    assert 'make chaos ARGS="--rounds 30 --wave 12 --burst 40"' in README
